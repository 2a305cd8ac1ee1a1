"""Building an adapter's embedding card and recording it in the registry."""

from __future__ import annotations

from dataclasses import dataclass

from ..cards.card import Card, TextRecipe, build_card
from ..cards.data import CardOptions, load_training_data
from ..cards.embedder import Embedder, load_embedder
from ..io import Example
from .store import AdapterRecord, Store


def attach_card(
    store: Store,
    adapter_id: str,
    examples: list[Example],
    *,
    embedder: Embedder,
    text_recipe: TextRecipe | None = None,
    source: dict | None = None,
    progress=None,
) -> tuple[AdapterRecord, Card]:
    """Embed an adapter's training examples, write its card next to its weights, and index it."""
    record = store.get(adapter_id)
    card = build_card(examples, embedder, text_recipe or TextRecipe(), source=source, progress=progress)
    files = card.save(record.path)
    return store.update_card(adapter_id, files, card.embedder_key), card


@dataclass
class CardJob:
    """A card ready to be built: its training examples and embedder are loaded (so they are known to be good)."""

    examples: list[Example]
    source: dict
    text_recipe: TextRecipe
    embedder: Embedder
    progress_factory: object = None

    def build(self, adapter_id: str) -> Card:
        if self.progress_factory is None:
            return build_card(self.examples, self.embedder, self.text_recipe, source=self.source)
        with self.progress_factory(
            f"Embedding {len(self.examples)} examples of {adapter_id}", len(self.examples)
        ) as advance:
            return build_card(self.examples, self.embedder, self.text_recipe, source=self.source, progress=advance)


def prepare_card(options: CardOptions, progress_factory=None) -> CardJob:
    """Load and check everything a card needs, before any adapter is touched.
    `progress_factory(description, total)` may return a progress context."""
    examples, source = load_training_data(options)
    return CardJob(examples, source, options.text_recipe, load_embedder(options.embedder), progress_factory)


def card_from_source(
    store: Store, adapter_id: str, options: CardOptions, progress_factory=None
) -> tuple[AdapterRecord, Card]:
    """Card for a stored adapter from a JSONL file or a Hub dataset."""
    record = store.get(adapter_id)
    card = prepare_card(options, progress_factory).build(adapter_id)
    return store.update_card(adapter_id, card.save(record.path), card.embedder_key), card
