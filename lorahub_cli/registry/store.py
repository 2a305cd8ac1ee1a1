"""The registry's storage: one SQLite index and one content folder under the lorahub home.

Layout under `home`:
  registry.sqlite                       the index (WAL, so readers never block writers)
  adapters/<slug>/<key>-<nonce>/        one folder per stored adapter version (weights never change;
                                        the embedding card may be rebuilt in place)
  tmp/<pid>-<nonce>/                    staging folders, renamed into adapters/ when complete

An adapter becomes visible only when its complete folder has been renamed into
place *and* its index row committed, so a kill at any point leaves either the
old state or the new one. A folder that was renamed but never indexed is an
orphan: invisible, reported by `verify`, removed by `verify --prune`.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import time
import uuid
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from ..errors import IntegrityError, NotFoundError
from ..io import sha256_file

SCHEMA = """
CREATE TABLE IF NOT EXISTS adapters (
    id              TEXT PRIMARY KEY,
    source          TEXT NOT NULL,
    source_type     TEXT NOT NULL CHECK (source_type IN ('hub', 'local')),
    revision        TEXT,
    base_model      TEXT NOT NULL,
    peft_type       TEXT NOT NULL,
    r               INTEGER NOT NULL,
    lora_alpha      REAL NOT NULL,
    target_modules  TEXT NOT NULL,
    task_type       TEXT,
    files           TEXT NOT NULL,
    converted_from  TEXT,
    size            INTEGER NOT NULL,
    folder          TEXT NOT NULL,
    added_at        TEXT NOT NULL,
    card_status     TEXT NOT NULL DEFAULT 'none',
    card_embedder   TEXT
);
CREATE INDEX IF NOT EXISTS adapters_base_model ON adapters (base_model);
"""

COLUMNS = (
    "id source source_type revision base_model peft_type r lora_alpha target_modules task_type "
    "files converted_from size folder added_at card_status card_embedder"
).split()
JSON_COLUMNS = {"target_modules", "files", "converted_from"}


@dataclass
class AdapterRecord:
    """One index row. `files` maps each stored file name to its sha256."""

    id: str
    source: str
    source_type: str
    revision: str | None
    base_model: str
    peft_type: str
    r: int
    lora_alpha: float
    target_modules: list[str]
    task_type: str | None
    files: dict[str, str]
    size: int
    folder: str
    added_at: str = ""
    converted_from: dict | None = None
    card_status: str = "none"
    card_embedder: str | None = None
    path: Path = field(default=Path(), compare=False)

    @property
    def has_card(self) -> bool:
        return self.card_status == "ready"

    def to_json(self) -> dict:
        data = asdict(self)
        data["path"] = str(self.path)
        data["has_card"] = self.has_card
        return data


def slug(adapter_id: str) -> str:
    """A folder name for an id: '/' cannot appear in a path component."""
    return adapter_id.replace("/", "--").replace("\\", "--")


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Store:
    """The registry index and content folder. Safe to use from several threads and processes."""

    def __init__(self, home: Path):
        self.home = Path(home)
        self.content = self.home / "adapters"
        self.tmp = self.home / "tmp"
        self.db_path = self.home / "registry.sqlite"
        self.content.mkdir(parents=True, exist_ok=True)
        self.tmp.mkdir(parents=True, exist_ok=True)
        with self._connect() as db:
            db.executescript(SCHEMA)

    @contextmanager
    def _connect(self):
        # One connection per operation: sqlite3 connections must not cross threads,
        # and sync runs many mirrors in parallel.
        db = sqlite3.connect(self.db_path, timeout=60, isolation_level=None)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA busy_timeout=60000")
            db.row_factory = sqlite3.Row
            yield db
        finally:
            db.close()

    def _record(self, row: sqlite3.Row) -> AdapterRecord:
        values = {name: row[name] for name in COLUMNS}
        for name in JSON_COLUMNS:
            values[name] = json.loads(values[name]) if values[name] is not None else None
        return AdapterRecord(**values, path=self.content / values["folder"])

    # --- reading -------------------------------------------------------------------------

    def get(self, adapter_id: str) -> AdapterRecord:
        record = self.find(adapter_id)
        if record is None:
            raise NotFoundError(
                f"adapter '{adapter_id}' is not in the registry.",
                f"Add it with: lorahub registry add {adapter_id}   (see: lorahub registry list)",
            )
        return record

    def find(self, adapter_id: str) -> AdapterRecord | None:
        with self._connect() as db:
            row = db.execute("SELECT * FROM adapters WHERE id = ?", (adapter_id,)).fetchone()
        return self._record(row) if row else None

    def list(self, base_model: str | None = None) -> list[AdapterRecord]:
        query, args = "SELECT * FROM adapters", ()
        if base_model:
            query, args = query + " WHERE base_model = ?", (base_model,)
        with self._connect() as db:
            rows = db.execute(query + " ORDER BY id", args).fetchall()
        return [self._record(row) for row in rows]

    # --- writing -------------------------------------------------------------------------

    @contextmanager
    def staging(self):
        """A fresh folder to assemble an adapter in; removed on exit unless `commit` moved it."""
        self._clean_stale_staging()
        folder = self.tmp / f"{os.getpid()}-{uuid.uuid4().hex[:12]}"
        folder.mkdir(parents=True)
        try:
            yield folder
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    def _clean_stale_staging(self) -> None:
        """Remove staging folders left by processes that were killed."""
        for folder in self.tmp.iterdir():
            pid = folder.name.split("-", 1)[0]
            if pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
                shutil.rmtree(folder, ignore_errors=True)

    def commit(self, record: AdapterRecord, staged: Path, key: str) -> AdapterRecord:
        """Move a complete staged folder into the content folder and index it (replacing the id's old version)."""
        relative = f"{slug(record.id)}/{key[:16]}-{uuid.uuid4().hex[:8]}"
        final = self.content / relative
        final.parent.mkdir(parents=True, exist_ok=True)
        os.rename(staged, final)
        record.folder, record.path = relative, final
        record.added_at = record.added_at or _now()
        values = asdict(record)
        row = [json.dumps(values[c]) if c in JSON_COLUMNS and values[c] is not None else values[c] for c in COLUMNS]
        with self._connect() as db:
            db.execute("BEGIN IMMEDIATE")
            old = db.execute("SELECT folder FROM adapters WHERE id = ?", (record.id,)).fetchone()
            db.execute(f"INSERT OR REPLACE INTO adapters ({', '.join(COLUMNS)}) VALUES ({', '.join('?' * len(COLUMNS))})", row)
            db.execute("COMMIT")
        if old and old["folder"] != relative:
            shutil.rmtree(self.content / old["folder"], ignore_errors=True)
        return record

    def update_card(self, adapter_id: str, files: dict[str, str], embedder: str | None) -> AdapterRecord:
        """Record a card's files and embedder on an adapter's row (after the card files were written)."""
        status = "ready" if embedder else "none"
        with self._connect() as db:
            db.execute("BEGIN IMMEDIATE")
            row = db.execute("SELECT files, folder FROM adapters WHERE id = ?", (adapter_id,)).fetchone()
            if row is None:
                db.execute("ROLLBACK")
                raise NotFoundError(f"adapter '{adapter_id}' is not in the registry.", "See: lorahub registry list")
            merged = {k: v for k, v in json.loads(row["files"]).items() if not k.startswith("lorahub_card.")}
            merged.update(files)
            size = sum((self.content / row["folder"] / name).stat().st_size for name in merged)
            db.execute(
                "UPDATE adapters SET files = ?, size = ?, card_status = ?, card_embedder = ? WHERE id = ?",
                (json.dumps(merged), size, status, embedder, adapter_id),
            )
            db.execute("COMMIT")
        return self.get(adapter_id)

    def remove(self, adapter_id: str) -> AdapterRecord:
        record = self.get(adapter_id)
        with self._connect() as db:
            db.execute("DELETE FROM adapters WHERE id = ?", (adapter_id,))
        shutil.rmtree(record.path, ignore_errors=True)
        parent = record.path.parent
        if parent.is_dir() and not any(parent.iterdir()):
            parent.rmdir()
        return record

    # --- checking ------------------------------------------------------------------------

    def verify(self, prune: bool = False) -> tuple[list[dict], list[Path]]:
        """Re-hash every stored file. Returns (problems, orphan folders); prunes orphans if asked."""
        problems = []
        for record in self.list():
            for name, expected in record.files.items():
                path = record.path / name
                if not path.is_file():
                    problems.append({"id": record.id, "file": name, "problem": "missing"})
                elif (actual := sha256_file(path)) != expected:
                    problems.append({"id": record.id, "file": name, "problem": f"sha256 {actual[:12]}… != {expected[:12]}…"})
        indexed = {record.folder for record in self.list()}
        orphans = [
            folder
            for parent in self.content.iterdir() if parent.is_dir()
            for folder in parent.iterdir()
            if f"{parent.name}/{folder.name}" not in indexed and time.time() - folder.stat().st_mtime > 60
        ]
        if prune:
            for folder in orphans:
                shutil.rmtree(folder, ignore_errors=True)
        return problems, orphans

    def check_file(self, record: AdapterRecord, name: str) -> Path:
        """The path of a stored file after checking its hash: a corrupted adapter is never used silently."""
        path = record.path / name
        if not path.is_file() or sha256_file(path) != record.files.get(name):
            raise IntegrityError(
                f"file '{name}' of adapter '{record.id}' is missing or corrupted.",
                f"Re-add it with: lorahub registry add {record.source}",
            )
        return path
