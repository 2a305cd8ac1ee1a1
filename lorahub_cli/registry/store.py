"""The registry's storage: one SQLite index and one content folder under the lorahub home.

Layout under `home`:
  registry.sqlite                       the index (WAL, so readers never block writers)
  adapters/<slug>/<key>-<nonce>/        one folder per stored adapter version (weights never change;
                                        the embedding card may be rebuilt in place)
  tmp/<pid>-<nonce>/                    staging folders, renamed into adapters/ when complete

An adapter becomes visible only when its complete folder has been renamed into
place *and* its index row committed, so a kill at any point leaves either the
old state or the new one. Each content folder also holds its own index row
(lorahub_adapter.json), so the index can always be rebuilt from the content
(`Store.rebuild`); a missing or damaged index is an error naming that command,
never a reason to delete content. `verify --prune` removes only staging folders
of dead processes and superseded versions of an id that is indexed elsewhere.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sqlite3
import time
import uuid
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from ..errors import InputError, IntegrityError, LorahubError, NotFoundError
from ..io import atomic_write_json, sha256_file

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
METADATA = "lorahub_adapter.json"  # a content folder's own copy of its index row
REBUILD_HINT = "Rebuild it from the stored adapters with: lorahub registry rebuild"
# A PEFT adapter folder's files; a pickle .bin is converted to safetensors when it is stored.
CONFIG_FILE = "adapter_config.json"
SAFETENSORS_FILE = "adapter_model.safetensors"
PICKLE_FILE = "adapter_model.bin"

# The Hub's repo id rules (NAMESPACE/NAME; letters, digits, '.', '_', '-'; no '--' or '..'; no leading or
# trailing '.' or '-'), or one such NAME for a local adapter: an id is also a folder name, so nothing else.
_PART = r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9])?"
ADAPTER_ID = re.compile(rf"{_PART}(?:/{_PART})?")


def check_id(adapter_id: str) -> str:
    """`adapter_id` if it is a safe registry id, else an InputError (before anything is written)."""
    if not ADAPTER_ID.fullmatch(adapter_id) or "--" in adapter_id or ".." in adapter_id:
        raise InputError(
            f"'{adapter_id}' is not a valid adapter id.",
            "Use NAMESPACE/NAME as on the Hub, or a name of letters, digits, '.', '_' and '-' "
            "(no '..' or '--', no leading or trailing '.' or '-'), e.g. --name my-adapter.",
        )
    return adapter_id


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
    """The registry index and content folder. Safe to use from several threads and processes.

    `readonly=True` never writes (no folder, no schema, SQLite opened read-only), so reading commands
    work on a read-only home or mount.
    """

    def __init__(self, home: Path, readonly: bool = False):
        self._locate(home, readonly)
        self._check_index()
        if not readonly:
            with self._connect() as db:
                db.executescript(SCHEMA)

    @classmethod
    def for_rebuild(cls, home: Path) -> Store:
        """A writable store whose index is not opened: `rebuild` replaces it, however damaged."""
        store = cls.__new__(cls)
        store._locate(home, readonly=False)
        return store

    def _locate(self, home: Path, readonly: bool) -> None:
        self.home = Path(home)
        self.readonly = readonly
        self.content = self.home / "adapters"
        self.tmp = self.home / "tmp"
        self.db_path = self.home / "registry.sqlite"
        if self.home.exists() and not self.home.is_dir():
            raise LorahubError(
                f"the lorahub home '{self.home}' is a file, not a folder.", "Point LORAHUB_HOME at a folder."
            )
        if not readonly:
            try:
                self.content.mkdir(parents=True, exist_ok=True)
                self.tmp.mkdir(parents=True, exist_ok=True)
            except OSError as error:
                raise self._not_writable(error.strerror or str(error)) from None

    def _not_writable(self, reason: str) -> LorahubError:
        return LorahubError(
            f"the registry at '{self.home}' is not writable ({reason}).",
            "Set LORAHUB_HOME to a writable folder; reading commands (list, show, retrieve, verify) work read-only.",
        )

    def _check_index(self) -> None:
        """A missing or empty index next to stored adapters is damage to report, not an empty registry to create."""
        if self.db_path.is_file() and self.db_path.stat().st_size > 0:
            return
        stored = len(self._content_folders())
        if stored:
            state = "empty (0 bytes)" if self.db_path.is_file() else "missing"
            raise IntegrityError(
                f"the registry index '{self.db_path}' is {state}, but {stored} stored adapter folder(s) exist.",
                REBUILD_HINT,
            )

    def _content_folders(self) -> list[Path]:
        if not self.content.is_dir():
            return []
        return sorted(
            folder
            for parent in self.content.iterdir()
            if parent.is_dir()
            for folder in parent.iterdir()
            if folder.is_dir()
        )

    def _index_error(self, error: sqlite3.DatabaseError) -> LorahubError:
        text = str(error)
        if "readonly" in text or "read-only" in text or "unable to open" in text:
            return (
                self._not_writable(text)
                if not self.readonly
                else LorahubError(
                    f"cannot open the registry index '{self.db_path}' ({text}).", "Check the folder's permissions."
                )
            )
        if "locked" in text or "busy" in text:
            return LorahubError(f"the registry index is busy ({text}).", "Another lorahub is writing; try again.")
        return IntegrityError(f"the registry index '{self.db_path}' is damaged ({text}).", REBUILD_HINT)

    @contextmanager
    def _connect(self):
        # One connection per operation: sqlite3 connections must not cross threads,
        # and sync runs many mirrors in parallel.
        try:
            db = (
                self._open_readonly()
                if self.readonly
                else sqlite3.connect(self.db_path, timeout=60, isolation_level=None)
            )
            try:
                if not self.readonly:
                    db.execute("PRAGMA journal_mode=WAL")
                db.execute("PRAGMA busy_timeout=60000")
                db.row_factory = sqlite3.Row
                yield db
            finally:
                db.close()
        except sqlite3.DatabaseError as error:
            raise self._index_error(error) from None

    def _open_readonly(self) -> sqlite3.Connection:
        if not self.db_path.is_file() or self.db_path.stat().st_size == 0:
            db = sqlite3.connect(":memory:", isolation_level=None)  # no registry yet: an empty one, nothing written
            db.executescript(SCHEMA)
            return db
        # On a folder we may not write, SQLite cannot create the WAL's shared-memory file: `immutable`
        # reads the database file alone (a read-only mount has no concurrent writer to miss).
        flags = "mode=ro" if os.access(self.home, os.W_OK) else "mode=ro&immutable=1"
        return sqlite3.connect(f"{self.db_path.resolve().as_uri()}?{flags}", uri=True, timeout=60, isolation_level=None)

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
        folder = self.tmp / f"{os.getpid()}-{uuid.uuid4().hex[:12]}"
        try:
            self._clean_stale_staging()
            folder.mkdir(parents=True)
        except OSError as error:
            raise self._not_writable(error.strerror or str(error)) from None
        try:
            yield folder
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    def _clean_stale_staging(self) -> None:
        """Remove staging folders left by processes that were killed."""
        for folder in self._dead_staging():
            shutil.rmtree(folder, ignore_errors=True)

    def commit(self, record: AdapterRecord, staged: Path, key: str) -> AdapterRecord:
        """Move a complete staged folder into the content folder and index it (replacing the id's old version)."""
        check_id(record.id)
        relative = f"{slug(record.id)}/{key[:16]}-{uuid.uuid4().hex[:8]}"
        final = self.content / relative
        record.folder, record.path = relative, final
        record.added_at = record.added_at or _now()
        _write_metadata(staged, record)
        final.parent.mkdir(parents=True, exist_ok=True)
        os.rename(staged, final)
        values = asdict(record)
        row = [json.dumps(values[c]) if c in JSON_COLUMNS and values[c] is not None else values[c] for c in COLUMNS]
        with self._connect() as db:
            db.execute("BEGIN IMMEDIATE")
            old = db.execute("SELECT folder FROM adapters WHERE id = ?", (record.id,)).fetchone()
            db.execute(
                f"INSERT OR REPLACE INTO adapters ({', '.join(COLUMNS)}) VALUES ({', '.join('?' * len(COLUMNS))})", row
            )
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
            record = self._record(db.execute("SELECT * FROM adapters WHERE id = ?", (adapter_id,)).fetchone())
            record.files, record.size, record.card_status, record.card_embedder = merged, size, status, embedder
            _write_metadata(record.path, record)
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

    def verify(self, prune: bool = False) -> tuple[list[dict], list[dict]]:
        """Re-hash every stored file and check the weights are finite. Returns (problems, leftovers).

        A leftover is {"path", "kind"}: "staging" (an add interrupted before its folder was stored),
        "superseded" (an older version of an indexed id, left by an interrupted replace) or "unindexed"
        (a stored adapter whose index row is missing: `rebuild` restores it). `prune` deletes the first
        two kinds only; an unindexed adapter is content, never deleted here.
        """
        records = self.list()
        problems = []
        for record in records:
            for name, expected in record.files.items():
                path = record.path / name
                if not path.is_file():
                    problems.append({"id": record.id, "file": name, "problem": "missing"})
                elif (actual := sha256_file(path)) != expected:
                    problems.append(
                        {"id": record.id, "file": name, "problem": f"sha256 {actual[:12]}… != {expected[:12]}…"}
                    )
                elif name == SAFETENSORS_FILE and (bad := nonfinite_tensors(path)):
                    problems.append({"id": record.id, "file": name, "problem": f"NaN or inf in {', '.join(bad[:3])}"})
        leftovers = [{"path": folder, "kind": "staging"} for folder in self._dead_staging()]
        indexed = {record.folder for record in records}
        parents = {folder.split("/", 1)[0] for folder in indexed}
        for folder in self._content_folders():
            relative = f"{folder.parent.name}/{folder.name}"
            if relative not in indexed and time.time() - folder.stat().st_mtime > 60:
                leftovers.append(
                    {"path": folder, "kind": "superseded" if folder.parent.name in parents else "unindexed"}
                )
        if prune:
            for leftover in leftovers:
                if leftover["kind"] != "unindexed":
                    shutil.rmtree(leftover["path"], ignore_errors=True)
        return problems, leftovers

    def _dead_staging(self) -> list[Path]:
        if not self.tmp.is_dir():
            return []
        return [
            folder
            for folder in self.tmp.iterdir()
            if (pid := folder.name.split("-", 1)[0]).isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid))
        ]

    def rebuild(self) -> tuple[list[AdapterRecord], Path | None]:
        """Re-create the index from the content folders. Returns (indexed records, where the old index was kept).

        The newest version of each id wins; the old index (and its WAL) is renamed aside, never deleted.
        Run it while no other lorahub writes to this registry.
        """
        if self.readonly:
            raise self._not_writable("opened read-only")
        chosen: dict[str, tuple[tuple, AdapterRecord]] = {}
        for folder in self._content_folders():
            record = _record_from_folder(self.content, folder)
            rank = (record.added_at, (folder / METADATA).stat().st_mtime_ns if (folder / METADATA).is_file() else 0)
            if record.id not in chosen or rank > chosen[record.id][0]:
                chosen[record.id] = (rank, record)
        fresh = self.home / f"registry.sqlite.rebuild-{uuid.uuid4().hex[:8]}"
        db = sqlite3.connect(fresh, isolation_level=None)
        try:
            db.executescript(SCHEMA)
            db.execute("BEGIN")
            for _, record in chosen.values():
                values = asdict(record)
                db.execute(
                    f"INSERT INTO adapters ({', '.join(COLUMNS)}) VALUES ({', '.join('?' * len(COLUMNS))})",
                    [
                        json.dumps(values[c]) if c in JSON_COLUMNS and values[c] is not None else values[c]
                        for c in COLUMNS
                    ],
                )
            db.execute("COMMIT")
        finally:
            db.close()
        kept = None
        if self.db_path.exists():
            kept = (
                self.home / f"registry.sqlite.damaged-{datetime.now(timezone.utc):%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:4]}"
            )
            os.replace(self.db_path, kept)
        for suffix in ("-wal", "-shm"):  # a stale WAL would be replayed into the new index
            side = self.home / f"registry.sqlite{suffix}"
            if side.exists():
                os.replace(side, self.home / f"{(kept or self.db_path).name}{suffix}")
        os.replace(fresh, self.db_path)
        return [record for _, record in sorted(chosen.values(), key=lambda item: item[1].id)], kept

    def check_file(self, record: AdapterRecord, name: str) -> Path:
        """The path of a stored file after checking its hash: a corrupted adapter is never used silently."""
        path = record.path / name
        if not path.is_file() or sha256_file(path) != record.files.get(name):
            raise IntegrityError(
                f"file '{name}' of adapter '{record.id}' is missing or corrupted.",
                f"Re-add it with: lorahub registry add {record.source}",
            )
        return path


def _write_metadata(folder: Path, record: AdapterRecord) -> None:
    data = asdict(record)
    data.pop("path")
    atomic_write_json(folder / METADATA, data)


def _record_from_folder(content: Path, folder: Path) -> AdapterRecord:
    """A content folder's index row: from its metadata file, or (folders stored before there was one)
    re-derived from its adapter_config.json, its files and its folder name."""
    relative = f"{folder.parent.name}/{folder.name}"
    try:
        data = json.loads((folder / METADATA).read_text(encoding="utf-8"))
        data.update(folder=relative)
        return AdapterRecord(**{k: v for k, v in data.items() if k in COLUMNS}, path=folder)
    except (OSError, ValueError, TypeError):
        pass
    from ..cards.card import CARD_FILES, Card

    try:
        config = json.loads((folder / CONFIG_FILE).read_text(encoding="utf-8"))
        targets = config["target_modules"]
        record_id = folder.parent.name.replace("--", "/")
        files = {p.name: sha256_file(p) for p in sorted(folder.iterdir()) if p.is_file() and p.name != METADATA}
        try:
            embedder = Card.load(folder, record_id).embedder_key if all(n in files for n in CARD_FILES) else None
        except LorahubError:
            embedder = None
        return AdapterRecord(
            id=record_id,
            source=f"unknown (index rebuilt from {relative})",
            source_type="local",
            revision=None,
            base_model=config["base_model_name_or_path"],
            peft_type="LORA",
            r=int(config["r"]),
            lora_alpha=float(config.get("lora_alpha", config["r"])),
            target_modules=sorted(targets) if isinstance(targets, list) else [str(targets)],
            task_type=config.get("task_type"),
            files=files,
            size=sum((folder / n).stat().st_size for n in files),
            folder=relative,
            card_status="ready" if embedder else "none",
            card_embedder=embedder,
            path=folder,
        )
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        raise IntegrityError(
            f"stored folder '{folder}' has no readable metadata or adapter_config.json ({error}).",
            "Move it out of the registry, then run: lorahub registry rebuild",
        ) from None


def nonfinite_tensors(path: Path) -> list[str]:
    """The names of the tensors in a safetensors file that hold NaN or inf."""
    import torch
    from safetensors import safe_open

    with safe_open(path, framework="pt") as handle:
        return [
            name
            for name in handle.keys()
            if (t := handle.get_tensor(name)).is_floating_point() and not bool(torch.isfinite(t).all())
        ]
