"""Task suites (named lists of examples) and the per-seed split into shots and test set."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import InputError, IntegrityError, NotFoundError
from ..io import Example, read_examples, read_json, sha256_file
from ..settings import shipped_dir


@dataclass
class Suite:
    name: str
    tasks: dict[str, list[Example]]
    notes: list[str] = field(default_factory=list)  # caveats the report repeats (malformed targets, ...)

    def select(self, names: str) -> Suite:
        """`all` or a comma-separated list of task names."""
        if names == "all":
            return self
        chosen = [n.strip() for n in names.split(",") if n.strip()]
        unknown = [n for n in chosen if n not in self.tasks]
        if unknown or not chosen:
            raise InputError(
                f"--tasks names tasks that {self.name} does not have: {', '.join(unknown) or names!r}.",
                f"Choose from: {', '.join(sorted(self.tasks))}.",
            )
        return Suite(self.name, {n: self.tasks[n] for n in chosen}, self.notes)


def split(examples: list[Example], seed: int, shots: int, limit: int | None = None) -> tuple[list[int], list[int]]:
    """Indices of the shots and of the test set: shuffle with `seed`, the first `shots` are the shots."""
    if len(examples) <= shots:
        raise InputError(
            f"a task has {len(examples)} examples, too few for {shots} shots and a test set.",
            "Give a smaller --shots or more examples.",
        )
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    test = order[shots:]
    return order[:shots], test[:limit] if limit else test


# --- BBH ------------------------------------------------------------------------------------------


BBH_TASKS, BBH_EXAMPLES = 27, 6511


def bbh_dir() -> Path:
    return shipped_dir() / "bbh"


def load_bbh() -> Suite:
    """The shipped BBH, after checking every file against the manifest (27 tasks, 6,511 examples)."""
    folder = bbh_dir()
    fix = "Reinstall lorahub: pip install --force-reinstall lorahub-cli"
    manifest = read_json(folder / "manifest.json", fix)
    entries = manifest["tasks"]
    if len(entries) != BBH_TASKS or sum(e["examples"] for e in entries.values()) != BBH_EXAMPLES:
        raise IntegrityError(
            f"the BBH manifest lists {len(entries)} tasks, not {BBH_TASKS} with {BBH_EXAMPLES} examples.", fix
        )
    tasks = {}
    for name, entry in sorted(entries.items()):
        path = folder / entry["file"]
        if not path.is_file() or sha256_file(path) != entry["sha256"]:
            raise IntegrityError(f"BBH file {path} is missing or differs from its recorded SHA-256.", fix)
        rows = read_json(path, fix)["examples"]
        tasks[name] = [Example(r["input"], r["target"]) for r in rows]
    malformed = ", ".join(f"{m['task']} #{m['index']}" for m in manifest["malformed_targets"])
    notes = [
        f"Three BBH targets are malformed and kept as published ({malformed}): they give option text where "
        "an option letter is expected, so exact match counts them wrong for any model that answers with a letter."
    ]
    return Suite("bbh", tasks, notes)


def load_task_dir(folder: Path) -> Suite:
    """`<task>.jsonl` files in the shots format, one task per file."""
    if not folder.is_dir():
        raise NotFoundError(f"task folder '{folder}' does not exist.", "Give a folder of <task>.jsonl files.")
    files = sorted(folder.glob("*.jsonl"))
    if not files:
        raise InputError(
            f"task folder '{folder}' has no .jsonl files.",
            'Put one <task>.jsonl per task, lines {"input": ..., "target": ...}.',
        )
    return Suite(folder.name, {p.stem: read_examples(p) for p in files})
