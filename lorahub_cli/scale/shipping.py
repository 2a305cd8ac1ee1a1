"""How the driver's files reach the workers: the registry (its index and the adapters of one base model)
and a local base-model folder.

shared-path   workers open the driver's paths: the same machine, or a filesystem every node mounts.
object-store  the driver packs the folders into tars in Ray's object store (the index, then one per
              adapter); each node unpacks them once into Ray's session folder (keyed by their SHA-256)
              and its workers read that copy.
auto          shared-path on a one-node cluster, object-store on several.

Either way workers never reach the Hub for adapters the driver's registry holds.
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import socket
import sqlite3
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ..errors import NotFoundError


@dataclass
class Folder:
    """A folder of the driver's, as a worker finds it: at its path, or packed in the object store."""

    path: str
    digest: str | None = None
    parts: list | None = None  # ObjectRefs of tars, in a list so that Ray hands the actor references, not bytes

    def local(self) -> Path:
        """Where this worker reads the folder (called on the worker)."""
        if self.parts is None:
            if not Path(self.path).is_dir():
                raise NotFoundError(
                    f"'{self.path}' is not on worker {socket.gethostname()}.",
                    "Use --ray-data object-store, or put it on a path every node mounts.",
                )
            return Path(self.path)
        target = _cache_root() / self.digest
        if not target.is_dir():
            _unpack(self.parts, target)
        return target


def _cache_root() -> Path:
    """Ray's session folder on this node (removed with Ray's temp files), or the system's temp folder."""
    try:
        import ray._private.worker as worker

        root = Path(worker.global_worker.node.get_session_dir_path())
    except Exception:  # noqa: BLE001 - a private API: any change falls back to the temp folder
        root = Path(tempfile.gettempdir())
    return root / "lorahub-shipped"


def _unpack(parts: list, target: Path) -> None:
    """Extract beside `target`, then rename: workers on one node race to unpack, the first rename wins."""
    import ray

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        for part in parts:  # one at a time: a worker holds one adapter's bytes, not the registry's
            with tarfile.open(fileobj=io.BytesIO(ray.get(part))) as archive:
                # The driver packed it; the "data" filter (Python 3.10.12+) still refuses links out of the folder.
                archive.extractall(tmp, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
        os.rename(tmp, target)
    except OSError:
        if not target.is_dir():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _tar(entries: list[tuple[Path, str]]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        for source, name in entries:
            archive.add(source, arcname=name)
    return buffer.getvalue()


def share(ray, path: Path, ship: bool, parts=None) -> Folder:
    """A folder for the workers: its path, or (ship) tars of it in the object store. `parts()` yields lists of
    (file or folder, name in the copy), one tar each; by default the whole folder is one tar."""
    if not ship:
        return Folder(str(path))
    digest, refs = hashlib.sha256(), []
    for entries in (parts or (lambda: [[(path, ".")]]))():
        data = _tar(entries)
        digest.update(hashlib.sha256(data).digest())
        refs.append(ray.put(data))
    return Folder(str(path), digest.hexdigest(), refs)


def registry_parts(store, base_model: str | None):
    """What a worker's registry needs: a consistent copy of the index, then each adapter folder of `base_model`."""

    def parts():
        with tempfile.TemporaryDirectory() as tmp:
            copy = Path(tmp) / "registry.sqlite"
            source, target = sqlite3.connect(store.db_path), sqlite3.connect(copy)
            try:
                source.backup(target)
                if base_model:
                    target.execute("DELETE FROM adapters WHERE base_model != ?", (base_model,))
                    target.commit()
            finally:
                source.close()
                target.close()
            yield [(copy, "registry.sqlite")]
        for record in store.list(base_model):
            yield [(record.path, f"adapters/{record.folder}")]

    return parts


def data_for_workers(ray, placement, options, store, base_model: str | None, model_path: str | None):
    """The registry and the local model folder, as the workers will find them (the modes above)."""
    ship = options.data == "object-store" or (options.data == "auto" and placement.ship)
    registry = share(ray, store.home, ship, registry_parts(store, base_model)) if store is not None else None
    model = share(ray, Path(model_path), ship) if model_path and Path(model_path).is_dir() else None
    return registry, model
