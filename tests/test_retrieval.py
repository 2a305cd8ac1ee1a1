"""Retrieval ranks by cosine, most similar first, and finds the right adapter on clearly different tasks."""

import numpy as np
import pytest
import torch
from conftest import EXAMPLES

from lorahub_cli import retrieval
from lorahub_cli.cards.card import Card
from lorahub_cli.cards.embedder import Embedder
from lorahub_cli.errors import InputError, NotFoundError
from lorahub_cli.io import read_examples
from lorahub_cli.registry import Store

TASKS = sorted(p.name for p in (EXAMPLES / "adapters").iterdir())


def test_top_k_is_descending_cosine():
    generator = torch.Generator().manual_seed(0)
    keys = retrieval.normalise(torch.randn(50, 8, generator=generator))
    queries = retrieval.normalise(torch.randn(3, 8, generator=generator))
    scores, indices = retrieval.top_k(queries, keys, 5)
    cosine = queries.numpy() @ keys.numpy().T
    for q in range(3):
        expected = np.argsort(-cosine[q])[:5]
        assert indices[q].tolist() == expected.tolist()
        np.testing.assert_allclose(scores[q].numpy(), cosine[q][expected], atol=1e-6)
        # The released iLoraComp code sorted ascending and took the least similar: ours never does.
        assert indices[q, 0] == cosine[q].argmax() and scores[q].tolist() == sorted(scores[q].tolist(), reverse=True)
    assert retrieval.top_k(queries, keys[:2], 5)[1].shape == (3, 2), "k larger than the library returns everything"


@pytest.fixture
def index(registry_with_examples):
    return retrieval.CardIndex.from_store(Store(registry_with_examples))


def test_task_level_ranks_the_own_task_first(index):
    embedder = index.embedder()
    for task in TASKS:
        answer = retrieval.task_level(index, embedder, read_examples(EXAMPLES / "shots" / f"{task}.jsonl"), k=8)
        ids = [m.id for m in answer.results]
        assert ids[0] == f"examples/{task}", (task, answer.results[:3])
        assert len(ids) == 8 and answer.level == "task"


def test_instance_level_retrieves_per_shot_and_routes_inputs(index, tmp_path):
    embedder = index.embedder()
    # Shots from three tasks in one file: each shot finds its own task, each input its own task's shot.
    mixed = ["addition", "capitals", "sentiment"]
    shots = [e for t in mixed for e in read_examples(EXAMPLES / "shots" / f"{t}.jsonl")[:2]]
    inputs = [e for t in mixed for e in read_examples(EXAMPLES / "inputs" / f"{t}.jsonl", require_target=False)[:4]]
    answer = retrieval.instance_level(index, embedder, shots, k=3, inputs=inputs)
    assert [s[0].id for s in answer.shots] == [f"examples/{t}" for t in mixed for _ in range(2)]
    routed_task = [mixed[r.shot // 2] for r in answer.routes]
    assert routed_task == [t for t in mixed for _ in range(4)]


def test_per_input_retrieval(index):
    embedder = index.embedder()
    for task in TASKS:
        inputs = read_examples(EXAMPLES / "inputs" / f"{task}.jsonl", require_target=False)
        answer = retrieval.per_input(index, embedder, inputs, k=3)
        assert all(row[0].id == f"examples/{task}" for row in answer.inputs), task


def test_cards_from_other_embedders_are_never_compared(index, registry_with_examples):
    store = Store(registry_with_examples)
    cards = {r.id: Card.load(r.path) for r in store.list()}
    cards["examples/addition"].embedder_revision = "other"
    with pytest.raises(InputError, match="different embedders"):
        retrieval.CardIndex.from_cards(cards, "m")
    stranger = Embedder("someone/else", "abc", model=None)
    with pytest.raises(InputError, match="the cards were made with sentence-transformers/all-MiniLM-L6-v2"):
        from unittest import mock

        with mock.patch.object(retrieval, "load_embedder", return_value=stranger):
            index.embedder("someone/else")


def test_base_model_filter(registry_with_examples):
    store = Store(registry_with_examples)
    with pytest.raises(NotFoundError, match="for base model 'google/flan-t5-large'"):
        retrieval.CardIndex.from_store(store, "google/flan-t5-large")
    assert len(retrieval.CardIndex.from_store(store, "lorahub-examples/tiny-t5").ids) == 8
