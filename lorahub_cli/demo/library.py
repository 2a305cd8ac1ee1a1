"""The shipped demo library at runtime: where it is, whether it is intact, what it holds, and mirroring it.

Layout of registry/demo/ (written by `python -m lorahub_cli.demo build`):
  base/                the instruction-tuned tiny T5 and its byte tokenizer
  adapters/<task>/     one LoRA per upstream task, with its embedding card
  data/<task>.jsonl    that LoRA's training data (the card's source)
  heldout/<task>.jsonl 100 examples of a held-out task, in the shots format
  manifest.json        sha256 and size of every file, the task list, the build's metrics and its demo runs
"""

from __future__ import annotations

from pathlib import Path

from ..errors import InputError, IntegrityError, NotFoundError
from ..io import Example, read_examples, read_json, sha256_file

BASE_MODEL = "lorahub-demo/tiny-flan-t5"
"""The name every demo adapter records as its base model; `base_model_path()` is where that model is."""
ID_PREFIX = "demo/"
MANIFEST = "manifest.json"
BASE_DIR, ADAPTERS_DIR, DATA_DIR, HELDOUT_DIR = "base", "adapters", "data", "heldout"
REBUILD = "python -m lorahub_cli.demo build"
THREADS = 1
"""Torch threads for running the demo model: it is too small to gain from more (see models.torch_threads)."""


def demo_dir() -> Path:
    from ..settings import shipped_dir

    return shipped_dir() / "demo"


def _root(path: Path | None) -> Path:
    return Path(path) if path is not None else demo_dir()


def manifest(path: Path | None = None) -> dict:
    root = _root(path)
    if not (root / MANIFEST).is_file():
        raise NotFoundError(f"'{root}' holds no demo library ({MANIFEST} is missing).", f"Build it with: {REBUILD}")
    return read_json(root / MANIFEST, f"Rebuild the demo library with: {REBUILD}")


def verify(path: Path | None = None) -> dict:
    """Check every file listed in the manifest against its sha256; returns the manifest."""
    root = _root(path)
    meta = manifest(root)
    for name, entry in sorted(meta["files"].items()):
        file = root / name
        if not file.is_file():
            raise IntegrityError(
                f"demo library file '{file}' is missing.", f"Reinstall lorahub or rebuild with: {REBUILD}"
            )
        if sha256_file(file) != entry["sha256"]:
            raise IntegrityError(
                f"demo library file '{file}' does not match its sha256 in {MANIFEST}.",
                f"Reinstall lorahub or rebuild with: {REBUILD}",
            )
    return meta


def base_model_path(path: Path | None = None) -> Path:
    return _root(path) / BASE_DIR


def upstream_tasks(path: Path | None = None) -> list[dict]:
    """{name, kind, description, templates} of each upstream skill, one LoRA each."""
    return [t for t in manifest(path)["tasks"] if t["kind"] == "upstream"]


def heldout_tasks(path: Path | None = None) -> list[dict]:
    """{name, kind, description, type, skills, new} of each held-out task (type: wording, format, mixed, chained)."""
    return [t for t in manifest(path)["tasks"] if t["kind"] == "held-out"]


def default_task(path: Path | None = None) -> str:
    """The held-out task `lorahub demo` runs by default: the build ran the demo on every held-out task (seed 1)
    and chose the one with the median gain over both baselines (manifest "demo")."""
    meta = manifest(path)
    if "demo" not in meta:
        raise NotFoundError("the demo library's manifest names no default task.", f"Rebuild it with: {REBUILD}")
    return meta["demo"]["default_task"]


def adapter_id(task: str) -> str:
    return ID_PREFIX + task


def heldout_examples(task: str, path: Path | None = None) -> list[Example]:
    names = [t["name"] for t in heldout_tasks(path)]
    if task not in names:
        raise InputError(f"'{task}' is not a held-out task of the demo library.", f"Choose one of: {', '.join(names)}.")
    return read_examples(_root(path) / HELDOUT_DIR / f"{task}.jsonl")


def mirror(store, progress=None, path: Path | None = None) -> list:
    """Add every demo adapter with its card to `store` as demo/<task>; adapters already there unchanged are skipped.

    `progress()` is called once per adapter. Returns one MirrorResult per adapter.
    """
    from ..registry.mirror import MirrorResult, add_local
    from ..registry.store import SAFETENSORS_FILE

    root = _root(path)
    meta = verify(root)
    results = []
    for task in upstream_tasks(root):
        folder = root / ADAPTERS_DIR / task["name"]
        wanted = meta["files"][f"{ADAPTERS_DIR}/{task['name']}/{SAFETENSORS_FILE}"]["sha256"]
        existing = store.find(adapter_id(task["name"]))
        if existing and existing.has_card and existing.files.get(SAFETENSORS_FILE) == wanted:
            results.append(MirrorResult(existing.id, "skipped", None, "already in the registry", existing))
        else:
            results.append(add_local(store, folder, name=adapter_id(task["name"]), base_model=BASE_MODEL))
        if progress:
            progress()
    return results


def load_suite(path: Path | None = None):
    """The held-out tasks as an evaluation suite (the demo's miniature BBH), after checking the library's hashes."""
    from ..eval.tasks import Suite

    verify(path)
    return Suite("demo", {t["name"]: heldout_examples(t["name"], path) for t in heldout_tasks(path)})
