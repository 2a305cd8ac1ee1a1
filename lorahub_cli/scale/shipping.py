"""How the driver's files reach the workers: the registry (its index and the adapters of one base model)
and a local base-model folder.

shared-path   workers open the driver's paths: the same machine, or a filesystem every node mounts.
object-store  the driver packs each folder into one tar in Ray's object store; each node unpacks it once
              into Ray's session folder (keyed by its SHA-256) and its workers read that copy.
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
    blob: list | None = None  # [ObjectRef], nested so that Ray hands the actor the reference, not the bytes

    def local(self) -> Path:
        """Where this worker reads the folder (called on the worker)."""
        if self.blob is None:
            if not Path(self.path).is_dir():
                raise NotFoundError(f"'{self.path}' is not on worker {socket.gethostname()}.",
                                    "Use --ray-data object-store, or put it on a path every node mounts.")
            return Path(self.path)
        target = _cache_root() / self.digest
        if not target.is_dir():
            import ray

            _unpack(ray.get(self.blob[0]), target)
        return target


def _cache_root() -> Path:
    """Ray's session folder on this node (removed with Ray's temp files), or the system's temp folder."""
    try:
        import ray._private.worker as worker

        root = Path(worker.global_worker.node.get_session_dir_path())
    except Exception:  # noqa: BLE001 - a private API: any change falls back to the temp folder
        root = Path(tempfile.gettempdir())
    return root / "lorahub-shipped"


def _unpack(data: bytes, target: Path) -> None:
    """Extract beside `target`, then rename: workers on one node race to unpack, the first rename wins."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        with tarfile.open(fileobj=io.BytesIO(data)) as archive:
            archive.extractall(tmp, filter="data")
        os.rename(tmp, target)
    except OSError:
        if not target.is_dir():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _packed(fill) -> tuple[bytes, str]:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        fill(archive)
    data = buffer.getvalue()
    return data, hashlib.sha256(data).hexdigest()


def share(ray, path: Path, ship: bool, fill=None) -> Folder:
    """A folder for the workers: its path, or (ship) a tar of it (`fill(archive)` chooses the content) put in
    the object store."""
    if not ship:
        return Folder(str(path))
    data, digest = _packed(fill or (lambda archive: archive.add(path, arcname=".")))
    return Folder(str(path), digest, [ray.put(data)])


def registry_content(store, base_model: str | None):
    """What a worker's registry needs: a consistent copy of the index, the folders of `base_model`'s adapters."""

    def fill(archive: tarfile.TarFile) -> None:
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
            archive.add(copy, arcname="registry.sqlite")
        for record in store.list(base_model):
            archive.add(record.path, arcname=f"adapters/{record.folder}")

    return fill
