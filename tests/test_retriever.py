"""`lorahub retriever train` on a tiny registry: the tuned embedder retrieves unseen tasks better, and cards use it.

The twelve tasks come in minimal pairs ("count the vowels" / "count the consonants") over one
shared pool of contents, so the untuned embedder, which weighs content heavily, confuses the
two tasks of a pair; training on other pairs teaches it to weigh the instruction.
"""

from __future__ import annotations

import json
import random

import pytest
from conftest import EXAMPLES
from tiny_models import one_thread  # noqa: F401  (fixture)

from lorahub_cli.cards.data import CardOptions
from lorahub_cli.examples.tasks import ANIMALS, CAPITALS, SUBJECTS, WORDS
from lorahub_cli.registry import Store
from lorahub_cli.registry.cards import card_from_source
from lorahub_cli.registry.mirror import add_local
from lorahub_cli.settings import LORARETRIEVER_INSTRUCTION

pytestmark = pytest.mark.usefixtures("one_thread")

PAIRS = [
    ("Sort these words alphabetically: {}", "Sort these words by length: {}"),
    ("Count the vowels in: {}", "Count the consonants in: {}"),
    ("What is the first word of: {}", "What is the last word of: {}"),
    ("Translate into French: {}", "Translate into German: {}"),
    ("Write in capital letters: {}", "Write in small letters: {}"),
    ("How many words are in: {}", "How many letters are in: {}"),
]
CONTENTS = [
    lambda rng: ", ".join(rng.sample(WORDS, rng.randint(3, 6))),
    lambda rng: f"The {rng.choice(SUBJECTS)} of the film was about {rng.choice(sorted(ANIMALS))}s.",
    lambda rng: f"{rng.choice(sorted(CAPITALS))} is a country where the {rng.choice(sorted(ANIMALS))} lives.",
    lambda rng: " ".join(str(rng.randint(2, 999)) for _ in range(rng.randint(3, 6))),
]
EXAMPLES_PER_TASK = 16
MARGIN = 0.1  # seeded runs (seeds 42 and 7): untuned top-1 0.85-0.86, tuned 1.0


def write_task(path, template: str, seed: int) -> None:
    rng = random.Random(seed)
    rows = [{"input": template.format(rng.choice(CONTENTS)(rng)), "target": ""} for _ in range(EXAMPLES_PER_TASK)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture
def paired_registry(lorahub_home, tmp_path):
    """Twelve adapters (one weights folder, twelve names) with inputs-only LoraRetriever cards."""
    store = Store(lorahub_home)
    for t, template in enumerate(t for pair in PAIRS for t in pair):
        name = f"task{t:02d}"
        data = tmp_path / f"{name}.jsonl"
        write_task(data, template, seed=t)
        add_local(store, EXAMPLES / "adapters" / "sentiment", name=name)
        card_from_source(store, name, CardOptions(data=data, inputs_only=True, instruction=LORARETRIEVER_INSTRUCTION))
    return store


def test_training_improves_retrieval_of_held_out_tasks_and_cards_record_the_embedder(cli, paired_registry, tmp_path):
    out = tmp_path / "retriever"
    result = cli(
        "retriever",
        "train",
        "--out",
        out,
        "--tasks-fraction",
        "0.5",
        "--batch-size",
        "8",
        "--lr",
        "5e-5",
        "--max-examples",
        str(EXAMPLES_PER_TASK),
        "--eval-queries",
        "6",
        "--json",
    )
    assert result.code == 0, result.stderr
    report = json.loads(result.stdout)
    assert len(report["train_adapters"]) == 6 and not set(report["train_adapters"]) & set(report["held_out_adapters"])
    assert report["untuned"]["queries"] == 36
    assert report["training"]["loss_last"] < report["training"]["loss_first"]
    assert report["tuned"]["top1"] >= report["untuned"]["top1"] + MARGIN, report
    assert report["tuned"]["top3"] >= report["untuned"]["top3"]
    assert json.loads((out / "lorahub_retriever.json").read_text())["tuned"] == report["tuned"]

    # The trained folder is an embedder: cards rebuilt with it record it, and retrieval then uses it.
    for record in paired_registry.list():
        built = cli(
            "card",
            "build",
            record.id,
            "--data",
            tmp_path / f"{record.id}.jsonl",
            "--inputs-only",
            "--instruction",
            LORARETRIEVER_INSTRUCTION,
            "--embedder",
            out,
            "--json",
        )
        assert built.code == 0, built.stderr
    card = json.loads(built.stdout)
    assert card["embedder"]["id"] == str(out.resolve()) and card["embedder"]["revision"].startswith("local-")
    answer = cli("retrieve", "--query", "Count the consonants in: apple, river, candle", "-k", "1", "--json")
    assert answer.code == 0, answer.stderr
    assert json.loads(answer.stdout)["results"][0]["id"] == "task03"


def test_a_bad_fraction_is_a_one_line_error(cli, tmp_path):
    result = cli("retriever", "train", "--out", tmp_path / "r", "--tasks-fraction", "1.5")
    assert result.code == 2 and "--tasks-fraction 1.5 must be between 0 and 1" in result.stderr
