"""Building an adapter's embedding card and recording it in the registry."""

from __future__ import annotations

from pathlib import Path

from ..cards.card import Card, Recipe, build_card
from ..cards.data import load_training_data
from ..cards.embedder import Embedder, load_embedder
from ..errors import InputError
from ..io import Example
from .store import AdapterRecord, Store


def attach_card(
    store: Store,
    adapter_id: str,
    examples: list[Example],
    *,
    embedder: Embedder,
    recipe: Recipe = Recipe(),
    source: dict | None = None,
    progress=None,
) -> tuple[AdapterRecord, Card]:
    """Embed an adapter's training examples, write its card next to its weights, and index it."""
    record = store.get(adapter_id)
    card = build_card(examples, embedder, recipe, source=source, progress=progress)
    files = card.save(record.path)
    return store.update_card(adapter_id, files, card.embedder_key), card


def card_from_source(
    store: Store,
    adapter_id: str,
    *,
    data: Path | None = None,
    dataset: str | None = None,
    filters: list[str] | None = None,
    input_field: str | None = None,
    target_field: str | None = None,
    max_examples: int = 1000,
    embedder: str | None = None,
    inputs_only: bool = False,
    instruction: str = "",
    progress_factory=None,
) -> tuple[AdapterRecord, Card]:
    """Card from a JSONL file or a Hub dataset. `progress_factory(description, total)` may return a progress context."""
    if instruction and not inputs_only:
        raise InputError("--instruction goes with --inputs-only (LoraRetriever's recipe).", "Add --inputs-only.")
    store.get(adapter_id)
    examples, source = load_training_data(data, dataset, filters, input_field, target_field, max_examples)
    recipe = Recipe("input" if inputs_only else "input+target", instruction)
    model = load_embedder(embedder)
    if progress_factory is None:
        return attach_card(store, adapter_id, examples, embedder=model, recipe=recipe, source=source)
    with progress_factory(f"Embedding {len(examples)} examples of {adapter_id}", len(examples)) as advance:
        return attach_card(store, adapter_id, examples, embedder=model, recipe=recipe, source=source, progress=advance)
