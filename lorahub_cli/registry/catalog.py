"""Catalogues of published LoRA libraries, and mirroring many adapters at once.

A catalogue (registry/catalogs/NAME.json) names the Hub repos of a library,
its base model and where each module's training data lives, so that
`registry sync --catalog NAME --cards` can also build every card.
"""

from __future__ import annotations

import json
import threading
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

from ..errors import HubUnreachableError, InputError, LorahubError
from ..settings import shipped_dir
from .mirror import MirrorResult, add_hub


@dataclass(frozen=True)
class CatalogEntry:
    repo_id: str
    task: str | None = None


@dataclass
class Catalog:
    name: str
    base_model: str | None
    entries: list[CatalogEntry]
    dataset: str | None = None  # Hub dataset with every module's training data
    task_field: str = "task"  # the dataset field that names a module's task

    @classmethod
    def load(cls, name: str) -> Catalog:
        path = Path(name)
        if not path.is_file():
            path = catalogs_dir() / f"{name}.json"
        if not path.is_file():
            raise InputError(f"catalogue '{name}' does not exist.", f"Available: {', '.join(available()) or 'none'}.")
        data = json.loads(path.read_text(encoding="utf-8"))
        training = data.get("training_data") or {}
        return cls(
            name=data.get("name", path.stem),
            base_model=data.get("base_model"),
            entries=[CatalogEntry(m["repo_id"], m.get("task")) for m in data["modules"]],
            dataset=training.get("hub_dataset"),
            task_field=training.get("task_field", "task"),
        )


def catalogs_dir() -> Path:
    return shipped_dir() / "catalogs"


def available() -> list[str]:
    return sorted(p.stem for p in catalogs_dir().glob("*.json"))


def list_author(author: str, search: str | None = None) -> list[CatalogEntry]:
    """Every model repo of an author (optionally matching a search text) as catalogue entries."""
    from ..hub import api, hub_errors

    with hub_errors(author):
        return [CatalogEntry(m.id) for m in api().list_models(author=author, search=search)]


def sync(
    store,
    entries: list[CatalogEntry],
    *,
    base_model: str | None = None,
    workers: int = 4,
    on_result=None,
    warn=lambda m: None,
) -> list[MirrorResult]:
    """Mirror every entry in parallel; one failure never stops the others, but an unreachable Hub stops them all.

    `on_result(result)` runs in the caller's thread as each entry finishes (progress). Raises
    HubUnreachableError when the Hub cannot be reached at all, after the entries already started end.
    """
    unreachable: list[HubUnreachableError] = []
    stop = threading.Event()

    def one(entry: CatalogEntry) -> MirrorResult | None:
        if stop.is_set():
            return None
        try:
            return add_hub(store, entry.repo_id, base_model=base_model, warn=warn)
        except HubUnreachableError as error:
            unreachable.append(error)
            stop.set()
            return None
        except LorahubError as error:
            return MirrorResult(entry.repo_id, "failed", message=str(error))
        except Exception as error:  # noqa: BLE001 - a bug in one mirror must not end the sync
            return MirrorResult(entry.repo_id, "failed", message=f"{type(error).__name__}: {error}")

    results = []
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        futures = [pool.submit(one, entry) for entry in entries]
        for future in as_completed(futures):
            if (result := future.result()) is None:
                continue
            results.append(result)
            if on_result:
                on_result(result)
    if unreachable:
        raise unreachable[0]
    order = {entry.repo_id: i for i, entry in enumerate(entries)}
    return sorted(results, key=lambda r: order.get(r.id, len(order)))
