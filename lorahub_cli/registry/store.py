"""The registry's storage: one SQLite index and one content folder under the lorahub home.

Layout under `home`:
  registry.sqlite                       the index (WAL, so readers never block writers)
  adapters/<slug>/<key>-<nonce>/        one folder per stored adapter version (weights never change;
                                        the embedding and weight cards may be rebuilt in place)
  tmp/<pid>-<nonce>/                    staging folders, renamed into adapters/ when complete
  cache/                                what can be derived again (the stacked weight-card index)

An adapter becomes visible only when its complete folder has been renamed into
place *and* its index row committed, so a kill at any point leaves either the
old state or the new one. Each content folder also holds its own index row
(lorahub_adapter.json), so the index can always be rebuilt from the content
(`Store.rebuild`); a missing or damaged index is an error naming that command,
never a reason to delete content. `verify --prune` removes only staging folders
of dead processes and superseded versions of an id that is indexed elsewhere.

Everything read from the index or a metadata file is hostile until checked (anyone who can write the
home, or a copied or restored one, may have edited it): every row is checked like a command-line value
(`row_problem`), its folder must be `<slug of its id>/<version>` and resolve inside `adapters/`, its files
plain names that resolve inside that folder. A row or folder that fails is reported and never acted on.
"""

from __future__ import annotations

import json
import math
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
WAL_FILES = ("-wal", "-shm")  # SQLite's files beside the index
REBUILD_HINT = "Rebuild it from the stored adapters with: lorahub registry rebuild"
# A PEFT adapter folder's files; a pickle .bin is converted to safetensors when it is stored.
CONFIG_FILE = "adapter_config.json"
SAFETENSORS_FILE = "adapter_model.safetensors"
# What PEFT's LoraConfig assumes when a config omits lora_alpha; the index must record the scaling PEFT applies.
PEFT_DEFAULT_ALPHA = 8
PICKLE_FILE = "adapter_model.bin"
# The weight card (spectral/card.py): what retrieval and Arrow routing need from the weights, made at every add.
WEIGHT_CARD = "lorahub_weights.safetensors"
CARD_PREFIX = "lorahub_card."  # the embedding card's files (cards/card.py)

# The Hub's repo id rules (NAMESPACE/NAME; letters, digits, '.', '_', '-'; no '--' or '..'; no leading or
# trailing '.' or '-'), or one such NAME for a local adapter: an id is also a folder name, so nothing else.
_PART = r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9])?"
ADAPTER_ID = re.compile(rf"{_PART}(?:/{_PART})?")
# The one-component names lorahub gives stored files and version folders (never '.', '..' or a separator).
PLAIN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,254}")
# A version folder stored before lorahub_adapter.json existed: <key[:16]>-<nonce>, key a commit or a sha256.
LEGACY_VERSION = re.compile(r"[0-9a-f]{16}-[0-9a-f]{8}")
SHA256 = re.compile(r"[0-9a-f]{64}")
STAGING = re.compile(r"[0-9]+-[0-9a-f]{1,32}")  # tmp/<pid>-<nonce>
MAX_TEXT = 4096  # the longest text field a row may hold (a source path)
MAX_ROW_BYTES = 1 << 20  # a row or lorahub_adapter.json is a few kB: more is not one lorahub wrote
MAX_FILES = 64  # files one adapter folder may name (lorahub stores at most seven)


def shown(value, limit: int = 60) -> str:
    """A value from registry data as a one-line message may show it: quoted, escapes visible, cut short."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}…"


def id_problem(adapter_id) -> str | None:
    if not isinstance(adapter_id, str):
        return f"id {shown(adapter_id)} is not a string"
    if not ADAPTER_ID.fullmatch(adapter_id) or "--" in adapter_id or ".." in adapter_id:
        return f"{shown(adapter_id)} is not a valid adapter id"
    return None


def check_id(adapter_id: str) -> str:
    """`adapter_id` if it is a safe registry id, else an InputError (before anything is written)."""
    if id_problem(adapter_id):
        raise InputError(
            f"'{adapter_id}' is not a valid adapter id.",
            "Use NAMESPACE/NAME as on the Hub, or a name of letters, digits, '.', '_' and '-' "
            "(no '..' or '--', no leading or trailing '.' or '-'), e.g. --name my-adapter.",
        )
    return adapter_id


def _positive(value, integer: bool) -> bool:
    kinds = int if integer else (int, float)
    return isinstance(value, kinds) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def lora_config_problem(config: dict, targets_required: bool = True) -> str | None:
    """Why a PEFT config cannot be a LoRA adapter's, or None: peft_type LORA, r a positive integer, lora_alpha
    (when given) a positive number, target_modules (when required or given) a non-empty list of names or a
    non-empty regex string (PEFT takes both)."""
    peft_type = config.get("peft_type")
    if not isinstance(peft_type, str) or peft_type.upper() != "LORA":
        return f"peft_type is {shown(peft_type)}, not LORA"
    if not _positive(config.get("r"), integer=True):
        return f"r is {shown(config.get('r'))}, not a positive integer"
    if "lora_alpha" in config and not _positive(config["lora_alpha"], integer=False):
        return f"lora_alpha is {shown(config['lora_alpha'])}, not a positive number"
    targets = config.get("target_modules")
    if (isinstance(targets, str) and targets.strip()) or (targets is None and not targets_required):
        return None
    if not isinstance(targets, list) or not targets or not all(isinstance(t, str) and t for t in targets):
        return f"target_modules is {shown(targets)}, not a non-empty list of module names"
    return None


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

    @property
    def has_weight_card(self) -> bool:
        return WEIGHT_CARD in self.files

    def to_json(self) -> dict:
        data = asdict(self)
        data["path"] = str(self.path)
        data["has_card"] = self.has_card
        data["has_weight_card"] = self.has_weight_card
        return data


def slug(adapter_id: str) -> str:
    """A folder name for an id: '/' cannot appear in a path component."""
    return adapter_id.replace("/", "--").replace("\\", "--")


DEFAULTS = {"added_at": "", "converted_from": None, "card_status": "none", "card_embedder": None}
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def text_problem(name: str, value, optional: bool) -> str | None:
    if value is None and optional:
        return None
    if not isinstance(value, str):
        return f"{name} is {shown(value)}, not text"
    if _CONTROL.search(value):
        return f"{name} {shown(value)} holds control characters"
    if len(value) > MAX_TEXT:
        return f"{name} is {len(value):,} characters long (at most {MAX_TEXT:,})"
    if not value and name in ("source", "base_model", "base_model_name_or_path", "folder"):
        return f"{name} is empty"
    return None


def row_problem(values: dict) -> str | None:
    """Why an index row (or a folder's copy of it, lorahub_adapter.json) cannot be trusted, or None.

    Its folder must be `<slug of its id>/<version>`, so a row can only ever name its own id's folders; that the
    folder also resolves inside the content folder is checked where the path is made (`Store._version_path`)."""
    if missing := [c for c in COLUMNS if c not in values]:
        return f"has no {', '.join(missing)}"
    if problem := id_problem(values["id"]):
        return problem
    for name in ("source", "base_model", "folder", "added_at", "revision", "task_type", "card_embedder"):
        if problem := text_problem(name, values[name], optional=name in ("revision", "task_type", "card_embedder")):
            return problem
    version = values["folder"].partition(f"{slug(values['id'])}/")[2]
    if not values["folder"].startswith(f"{slug(values['id'])}/") or not PLAIN_NAME.fullmatch(version):
        return f"names folder {shown(values['folder'])}, not one of {slug(values['id'])}/<version> inside adapters/"
    for name, allowed in (("source_type", ("hub", "local")), ("card_status", ("ready", "none"))):
        if values[name] not in allowed:
            return f"{name} is {shown(values[name])}, not one of {', '.join(allowed)}"
    if problem := lora_config_problem({c: values[c] for c in ("peft_type", "r", "lora_alpha", "target_modules")}):
        return problem
    if not isinstance(values["target_modules"], list):
        return f"target_modules is {shown(values['target_modules'])}, not a list"
    files = values["files"]
    if not isinstance(files, dict) or not {CONFIG_FILE, SAFETENSORS_FILE} <= set(files) or len(files) > MAX_FILES:
        return f"files {shown(files)} do not name {CONFIG_FILE} and {SAFETENSORS_FILE} (or name over {MAX_FILES})"
    for name, digest in files.items():
        if (
            not PLAIN_NAME.fullmatch(name)
            or name == METADATA
            or not isinstance(digest, str)
            or not SHA256.fullmatch(digest)
        ):
            return f"files name {shown(name)} (sha256 {shown(digest, 20)}), not a file name with its sha256"
    if not isinstance(values["size"], int) or isinstance(values["size"], bool) or values["size"] < 0:
        return f"size is {shown(values['size'])}, not a number of bytes"
    if values["converted_from"] is not None and not isinstance(values["converted_from"], dict):
        return f"converted_from is {shown(values['converted_from'])}, not an object"
    return None


def _contained(path: Path, root: Path) -> bool:
    """Whether `path`, once every symbolic link is followed, is inside `root` (also resolved)."""
    return path.resolve().is_relative_to(root.resolve())


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


class _Untrusted(ValueError):
    """A row or folder that failed its check: the text says why (it follows a phrase naming the row or folder)."""


class Store:
    """The registry index and content folder. Safe to use from several threads and processes.

    `readonly=True` never writes (no folder, no schema, SQLite opened read-only), so reading commands
    work on a read-only home or mount.

    `weight_card(folder, adapter_id, weights_sha256) -> {file: sha256}` writes an adapter's weight card into
    its staged folder at every add, so the card is committed with the adapter (api.open_store gives
    spectral/card.py's; without one, adds store no weight card and retrieval builds it when needed).
    """

    def __init__(self, home: Path, readonly: bool = False, weight_card=None):
        self.weight_card = weight_card
        self._locate(home, readonly)
        self._check_index()
        if not readonly:
            with self._connect() as db:
                db.executescript(SCHEMA)

    @classmethod
    def for_rebuild(cls, home: Path) -> Store:
        """A writable store whose index is not opened: `rebuild` replaces it, however damaged."""
        store = cls.__new__(cls)
        store.weight_card = None
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
        # Everything lorahub reads, writes or deletes is under these: a link would take all of it elsewhere.
        for path in (self.content, self.tmp, self.db_path, *(self.home / f"registry.sqlite{s}" for s in WAL_FILES)):
            if path.is_symlink():
                raise LorahubError(
                    f"'{path}' is a symbolic link (to '{os.readlink(path)}'); lorahub follows no link inside its home.",
                    "Put the folder or file itself there, or set LORAHUB_HOME to the folder that holds it.",
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
        """A missing or empty index next to stored adapters is damage to report, not an empty registry to create;
        so is an index that is not lorahub's (a valid SQLite file without lorahub's table)."""
        state = "missing"
        if self.db_path.is_file():
            tables = self._tables() if self.db_path.stat().st_size > 0 else {}
            if "adapters" in tables:
                columns = tables["adapters"]
                missing = [c for c in COLUMNS if c not in columns]
                if not missing and [c for c, key in columns.items() if key] == ["id"]:
                    return
                what = (
                    f"its adapters table lacks {', '.join(missing)}" if missing else "its adapters are not keyed by id"
                )
                raise IntegrityError(f"the registry index '{self.db_path}' is not lorahub's ({what}).", REBUILD_HINT)
            if tables:
                names = ", ".join(shown(name, 30) for name in list(tables)[:5])
                raise IntegrityError(
                    f"the registry index '{self.db_path}' is not lorahub's (it holds table(s) {names}, no adapters).",
                    REBUILD_HINT,
                )
            state = "empty (0 bytes)" if self.db_path.stat().st_size == 0 else "empty (no tables)"
        if stored := len(self._scan_content()[0]):
            raise IntegrityError(
                f"the registry index '{self.db_path}' is {state}, but {stored} stored adapter folder(s) exist.",
                REBUILD_HINT,
            )

    def _tables(self) -> dict[str, dict[str, int]]:
        """{table: {column: its place in the primary key (0: not in it)}} of the index file, read before anything
        is written to it (not even the journal mode): it may be another program's database."""
        with self._connect(readonly=True) as db:
            names = [row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
            return {
                name: {
                    row["name"]: row["pk"] for row in db.execute("SELECT name, pk FROM pragma_table_info(?)", (name,))
                }
                for name in names
            }

    def _scan_content(self) -> tuple[list[Path], list[Path]]:
        """(the version folders adapters/<slug>/<version>, the links found there): links are never followed."""
        if not self.content.is_dir():
            return [], []
        folders, links = [], []
        for parent in sorted(self.content.iterdir()):
            if parent.is_symlink():
                links.append(parent)
            elif parent.is_dir():
                for folder in sorted(parent.iterdir()):
                    if folder.is_symlink():
                        links.append(folder)
                    elif folder.is_dir():
                        folders.append(folder)
        return folders, links

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
    def _connect(self, readonly: bool | None = None):
        # One connection per operation: sqlite3 connections must not cross threads,
        # and sync runs many mirrors in parallel.
        readonly = self.readonly if readonly is None else readonly
        try:
            db = self._open_readonly() if readonly else sqlite3.connect(self.db_path, timeout=60, isolation_level=None)
            try:
                if not readonly:
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

    # --- checking what the index and the folders say ------------------------------------

    def _record(self, row: sqlite3.Row) -> AdapterRecord:
        """An index row as a record, once checked; an IntegrityError naming the row and the rebuild if it fails."""
        try:
            return self._row_record(row)
        except _Untrusted as problem:
            raise IntegrityError(
                f"the registry index's row for {shown(row['id'])} {problem}; nothing was done with it.", REBUILD_HINT
            ) from None

    def _row_record(self, row: sqlite3.Row, files: bool = True) -> AdapterRecord:
        values = {name: row[name] for name in COLUMNS}
        for name in JSON_COLUMNS:
            try:
                if isinstance(values[name], str | bytes) and len(values[name]) > MAX_ROW_BYTES:
                    raise ValueError("too long")
                values[name] = json.loads(values[name]) if values[name] is not None else None
            except (TypeError, ValueError, RecursionError):
                raise _Untrusted(f"holds {name} {shown(values[name])}, which is not JSON") from None
        return self._checked(values, files)

    def _checked(self, values: dict, files: bool = True) -> AdapterRecord:
        """The record of checked values; with `files`, none of its files may link outside its folder either, so
        whatever reads a record's files (compose, cards) reads only inside the registry."""
        if problem := row_problem(values):
            raise _Untrusted(problem)
        record = AdapterRecord(**values, path=self._version_path(values["folder"]))
        for name in record.files if files else ():
            try:
                self._stored_file(record, name)
            except _Untrusted as problem:
                raise _Untrusted(f"names file {shown(name)}, which {problem}") from None
        return record

    def _version_path(self, folder: str) -> Path:
        """The path of a version folder named by checked data: never a link, always resolving inside adapters/."""
        path = self.content / folder
        if path.is_symlink() or path.parent.is_symlink() or not _contained(path, self.content):
            raise _Untrusted(f"names folder {shown(folder)}, which is a link or resolves outside adapters/")
        return path

    def _own_version(self, adapter_id: str, folder) -> Path | None:
        """The path of `folder` if it is one of `adapter_id`'s version folders, else None (it is left alone)."""
        prefix = f"{slug(adapter_id)}/"
        if (
            not isinstance(folder, str)
            or not folder.startswith(prefix)
            or not PLAIN_NAME.fullmatch(folder[len(prefix) :])
        ):
            return None
        try:
            return self._version_path(folder)
        except _Untrusted:
            return None

    def _stored_file(self, record: AdapterRecord, name: str) -> Path:
        path = record.path / name
        if not _contained(path, record.path):
            raise _Untrusted(f"is a link to '{path.resolve()}', outside the adapter's folder")
        return path

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
        """Every adapter (of `base_model`); one row that fails its check is an error for all (see: verify)."""
        return [self._record(row) for row in self._rows(base_model)]

    def _rows(self, base_model: str | None = None) -> list[sqlite3.Row]:
        query, args = "SELECT * FROM adapters", ()
        if base_model:
            query, args = query + " WHERE base_model = ?", (base_model,)
        with self._connect() as db:
            return db.execute(query + " ORDER BY id", args).fetchall()

    def count(self) -> int:
        with self._connect() as db:
            return db.execute("SELECT COUNT(*) FROM adapters").fetchone()[0]

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
        values = asdict(record)
        if problem := row_problem(values):
            raise InputError(f"adapter '{record.id}': {problem}.", "Re-save the adapter with PEFT.")
        if final.parent.is_symlink() or not _contained(final.parent, self.content):
            raise IntegrityError(
                f"'{final.parent}' is a link to '{final.parent.resolve()}'; lorahub stores nothing through a link.",
                f"Move the link out of '{self.content}', then add again.",
            )
        _write_metadata(staged, record)
        final.parent.mkdir(parents=True, exist_ok=True)
        os.rename(staged, final)
        row = [json.dumps(values[c]) if c in JSON_COLUMNS and values[c] is not None else values[c] for c in COLUMNS]
        with self._connect() as db:
            db.execute("BEGIN IMMEDIATE")
            old = db.execute("SELECT folder FROM adapters WHERE id = ?", (record.id,)).fetchone()
            db.execute(
                f"INSERT OR REPLACE INTO adapters ({', '.join(COLUMNS)}) VALUES ({', '.join('?' * len(COLUMNS))})", row
            )
            db.execute("COMMIT")
        # The old row named a folder: only one of this id's own version folders is ever removed.
        if old and old["folder"] != relative and (stale := self._own_version(record.id, old["folder"])):
            shutil.rmtree(stale, ignore_errors=True)
        return record

    def update_card(self, adapter_id: str, files: dict[str, str], embedder: str | None) -> AdapterRecord:
        """Record a card's files and embedder on an adapter's row (after the card files were written)."""
        status = "ready" if embedder else "none"
        columns = {"card_status": status, "card_embedder": embedder}
        return self.replace_files(adapter_id, files, lambda name: name.startswith(CARD_PREFIX), columns)

    def set_weight_card(self, adapter_id: str, files: dict[str, str]) -> AdapterRecord:
        """Record a weight card written into an adapter's folder (after the file was written)."""
        return self.replace_files(adapter_id, files, lambda name: name == WEIGHT_CARD)

    def replace_files(self, adapter_id: str, files: dict[str, str], replaced, columns: dict | None = None):
        """Record `files` (written into the adapter's folder) in place of the recorded files whose name
        `replaced(name)` is true, with new values of `columns` (card_status, card_embedder): one step for
        both kinds of card, in the index and the folder's own copy of its row."""
        columns = columns or {}
        assert set(columns) <= {"card_status", "card_embedder"}, columns
        with self._connect() as db:
            db.execute("BEGIN IMMEDIATE")
            row = db.execute("SELECT * FROM adapters WHERE id = ?", (adapter_id,)).fetchone()
            if row is None:
                db.execute("ROLLBACK")
                raise NotFoundError(f"adapter '{adapter_id}' is not in the registry.", "See: lorahub registry list")
            record = self._record(row)
            merged = {k: v for k, v in record.files.items() if not replaced(k)}
            merged.update(files)
            size = sum(path.lstat().st_size for name in merged if (path := record.path / name).exists())
            record.files, record.size = merged, size
            for name, value in columns.items():
                setattr(record, name, value)
            _write_metadata(record.path, record)
            assignments = "".join(f", {name} = ?" for name in columns)
            db.execute(
                f"UPDATE adapters SET files = ?, size = ?{assignments} WHERE id = ?",
                (json.dumps(merged), size, *columns.values(), adapter_id),
            )
            db.execute("COMMIT")
        return self.get(adapter_id)

    def remove(self, adapter_id: str) -> AdapterRecord:
        record = self.get(adapter_id)  # checked: its folder is one of its own, inside adapters/
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

        A problem is {"id", "file", "problem"}; "file" is None for an index row that fails its check (it is
        reported, never used). A leftover is {"path", "kind"}: "staging" (an add interrupted before its folder
        was stored), "superseded" (an older version of an indexed id, left by an interrupted replace),
        "unindexed" (a stored adapter whose index row is missing: `rebuild` restores it) or "foreign" (a folder
        or link lorahub did not store there). `prune` deletes the first two kinds only.
        """
        records, problems = self.trusted()
        for record in records:
            for name, expected in record.files.items():
                try:
                    path = self._stored_file(record, name)
                except _Untrusted as problem:
                    problems.append({"id": record.id, "file": name, "problem": f"{problem}; not read"})
                    continue
                if not path.is_file():
                    problems.append({"id": record.id, "file": name, "problem": "missing"})
                elif (actual := sha256_file(path)) != expected:
                    problems.append(
                        {"id": record.id, "file": name, "problem": f"sha256 {actual[:12]}… != {expected[:12]}…"}
                    )
                elif name == SAFETENSORS_FILE and (bad := nonfinite_tensors(path)):
                    problems.append({"id": record.id, "file": name, "problem": f"NaN or inf in {', '.join(bad[:3])}"})
        leftovers = [{"path": folder, "kind": "staging"} for folder in self._dead_staging()]
        indexed, ids = {record.folder for record in records}, {record.id for record in records}
        folders, links = self._scan_content()
        leftovers += [{"path": link, "kind": "foreign"} for link in links]
        for folder in folders:
            relative = f"{folder.parent.name}/{folder.name}"
            if relative not in indexed and time.time() - folder.stat().st_mtime > 60:
                owner = self._owner(folder)
                kind = "foreign" if owner is None else "superseded" if owner in ids else "unindexed"
                leftovers.append({"path": folder, "kind": kind})
        if prune:
            for leftover in leftovers:
                if leftover["kind"] in ("staging", "superseded"):
                    shutil.rmtree(leftover["path"], ignore_errors=True)
        return problems, leftovers

    def trusted(self) -> tuple[list[AdapterRecord], list[dict]]:
        """The records whose index rows pass their checks (their files are not checked here), and a problem
        {"id", "file": None, "problem"} for each row that does not (it is never used)."""
        problems, records = [], []
        for row in self._rows():
            try:
                records.append(self._row_record(row, files=False))
            except _Untrusted as problem:
                shown_id = row["id"] if isinstance(row["id"], str) else shown(row["id"])
                problems.append({"id": shown_id, "file": None, "problem": f"index row {problem}; not used"})
        return records, problems

    def _dead_staging(self) -> list[Path]:
        if not self.tmp.is_dir():
            return []
        return [
            folder
            for folder in self.tmp.iterdir()
            if STAGING.fullmatch(folder.name)
            and folder.is_dir()
            and not folder.is_symlink()
            and (pid := int(folder.name.split("-", 1)[0])) != os.getpid()
            and not _pid_alive(pid)
        ]

    def rebuild(self) -> tuple[list[AdapterRecord], Path | None, list[dict]]:
        """Re-create the index from the content folders. Returns (indexed records, where the old index was kept,
        skipped): a skipped {"path", "problem"} is a folder or link that failed its check; it is left as it is.

        The newest version of each id wins; the old index (and its WAL) is renamed aside, never deleted.
        Run it while no other lorahub writes to this registry.
        """
        if self.readonly:
            raise self._not_writable("opened read-only")
        chosen: dict[str, tuple[tuple, AdapterRecord]] = {}
        folders, links = self._scan_content()
        skipped = [{"path": link, "problem": "is a symbolic link; links are not followed"} for link in links]
        for folder in folders:
            try:
                record = self._record_from_folder(folder)
            except _Untrusted as problem:
                skipped.append({"path": folder, "problem": str(problem)})
                continue
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
        for suffix in WAL_FILES:  # a stale WAL would be replayed into the new index
            side = self.home / f"registry.sqlite{suffix}"
            if side.exists():
                os.replace(side, self.home / f"{(kept or self.db_path).name}{suffix}")
        os.replace(fresh, self.db_path)
        records = [record for _, record in sorted(chosen.values(), key=lambda item: item[1].id)]
        return records, kept, skipped

    def check_file(self, record: AdapterRecord, name: str) -> Path:
        """The path of a stored file after checking its hash: a corrupted adapter is never used silently."""
        try:
            path = self._stored_file(record, name)
        except _Untrusted as problem:
            raise IntegrityError(f"file '{name}' of adapter '{record.id}' {problem}; not read.", REBUILD_HINT) from None
        if not path.is_file() or sha256_file(path) != record.files.get(name):
            raise IntegrityError(
                f"file '{name}' of adapter '{record.id}' is missing or corrupted.",
                f"Re-add it with: lorahub registry add {record.source}",
            )
        return path

    # --- reading a version folder --------------------------------------------------------

    def _metadata(self, folder: Path) -> dict | None:
        """A version folder's copy of its row as row values, or None when it has none (stored before there was one)."""
        path = folder / METADATA
        if not path.exists() and not path.is_symlink():
            return None
        if not _contained(path, folder):
            raise _Untrusted(f"{METADATA} is a link to outside its folder")
        try:
            if path.stat().st_size > MAX_ROW_BYTES:
                raise ValueError(f"{path.stat().st_size:,} bytes")
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError, RecursionError) as error:
            raise _Untrusted(f"{METADATA} cannot be read ({type(error).__name__}: {shown(str(error), 80)})") from None
        if not isinstance(data, dict):
            raise _Untrusted(f"{METADATA} is not a JSON object")
        return {
            **DEFAULTS,
            **{k: v for k, v in data.items() if k in COLUMNS},
            "folder": f"{folder.parent.name}/{folder.name}",
        }

    def _owner(self, folder: Path) -> str | None:
        """The id of a version folder lorahub stored; None for anything else (a composition, a copy by hand)."""
        try:
            values = self._metadata(folder)
        except _Untrusted:
            return None
        if values is not None:
            return values["id"] if row_problem(values) is None else None
        if not LEGACY_VERSION.fullmatch(folder.name) or not (folder / CONFIG_FILE).is_file():
            return None
        owner = folder.parent.name.replace("--", "/")
        return None if id_problem(owner) else owner

    def _record_from_folder(self, folder: Path) -> AdapterRecord:
        """A version folder's index row: from its metadata file, or (folders stored before there was one)
        re-derived from its adapter_config.json, its files and its folder name. Checked like an index row."""
        if (values := self._metadata(folder)) is not None:
            try:
                return self._checked(values)
            except _Untrusted as problem:
                raise _Untrusted(f"{METADATA}: {problem}") from None
        if not LEGACY_VERSION.fullmatch(folder.name):
            raise _Untrusted(f"has no {METADATA}: lorahub did not store it (a composition, or files put there by hand)")
        from ..cards.card import CARD_FILES, Card

        try:
            config = json.loads((folder / CONFIG_FILE).read_text(encoding="utf-8"))
        except (OSError, ValueError, RecursionError) as error:
            raise _Untrusted(f"has no {METADATA} and no readable {CONFIG_FILE} ({type(error).__name__})") from None
        if not isinstance(config, dict) or (problem := lora_config_problem(config)):
            raise _Untrusted(f"{CONFIG_FILE}: {problem if isinstance(config, dict) else 'not a JSON object'}")
        record_id, relative = folder.parent.name.replace("--", "/"), f"{folder.parent.name}/{folder.name}"
        files = {}
        for path in sorted(folder.iterdir()):
            if not _contained(path, folder):
                raise _Untrusted(f"holds '{path.name}', a link to outside its folder")
            if path.is_file() and path.name != METADATA:
                files[path.name] = sha256_file(path)
        try:
            embedder = Card.load(folder, record_id).embedder_key if all(n in files for n in CARD_FILES) else None
        except LorahubError:
            embedder = None
        targets = config["target_modules"]
        return self._checked(
            {
                "id": record_id,
                "source": f"unknown (index rebuilt from {relative})",
                "source_type": "local",
                "revision": None,
                "base_model": config.get("base_model_name_or_path"),
                "peft_type": "LORA",
                "r": config["r"],
                "lora_alpha": float(config.get("lora_alpha", PEFT_DEFAULT_ALPHA)),
                "target_modules": sorted(targets) if isinstance(targets, list) else [targets],
                "task_type": config.get("task_type"),
                "files": files,
                "size": sum((folder / n).stat().st_size for n in files),
                "folder": relative,
                "added_at": "",
                "converted_from": None,
                "card_status": "ready" if embedder else "none",
                "card_embedder": embedder,
            }
        )


def _write_metadata(folder: Path, record: AdapterRecord) -> None:
    data = asdict(record)
    data.pop("path")
    atomic_write_json(folder / METADATA, data)


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
