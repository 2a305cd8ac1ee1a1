"""The offline walk-through: registry and retrieval on the shipped example library, end to end."""

from __future__ import annotations

from pathlib import Path

from .. import retrieval
from ..cards.data import from_jsonl
from ..cards.embedder import load_embedder
from ..io import read_examples
from ..registry import Store
from ..registry.cards import attach_card
from ..registry.mirror import add_local
from ..settings import CARD_MAX_EXAMPLES, shipped_dir


def examples_dir() -> Path:
    return shipped_dir() / "examples"


def tasks() -> list[str]:
    return sorted(p.name for p in (examples_dir() / "adapters").iterdir() if p.is_dir())


def run(store: Store, task: str, k: int = 3, advance=lambda: None) -> dict:
    """Register every example adapter with its card, then retrieve for one task's shots and for mixed inputs."""
    root = examples_dir()
    embedder = load_embedder()
    for name in tasks():
        add_local(store, root / "adapters" / name, name=f"examples/{name}")
        examples, source = from_jsonl(root / "data" / f"{name}.jsonl", None, None, CARD_MAX_EXAMPLES)
        attach_card(store, f"examples/{name}", examples, embedder=embedder, source=source)
        advance()
    index = retrieval.CardIndex.from_store(store)
    shots = read_examples(root / "shots" / f"{task}.jsonl")
    mixed = {name: read_examples(root / "inputs" / f"{name}.jsonl", require_target=False) for name in tasks()}
    inputs = [e for name in tasks() for e in mixed[name]]
    truth = [f"examples/{name}" for name in tasks() for _ in mixed[name]]
    per_input = retrieval.per_input(index, embedder, inputs, k)
    hits = sum(row[0].id == want for row, want in zip(per_input.inputs, truth))
    return {
        "registry": str(store.home),
        "adapters": len(index.ids),
        "task": task,
        "task_level": retrieval.task_level(index, embedder, shots, k).to_json(),
        "instance_level": retrieval.instance_level(
            index, embedder, shots, k, read_examples(root / "inputs" / f"{task}.jsonl", require_target=False)
        ).to_json(),
        "per_input": {"inputs": len(inputs), "top1_correct": hits},
    }
