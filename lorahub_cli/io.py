"""Shots and inputs files: JSONL, one {"input": ..., "target": ...} object per line.

Every problem is reported as `file:line: what is wrong` so a user can go
straight to the bad line. `output` and `completion` are accepted for `target`.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .errors import InputError

TARGET_ALIASES = ("target", "output", "completion")
# Shots and inputs are a handful of examples: the caps stop a stray file from taking the machine's memory
# (a 60 MB line once took 5 GB through tokenisation) long before any model could use the text.
MAX_FILE_BYTES = 64 << 20
MAX_EXAMPLE_CHARS = 1 << 20


@dataclass(frozen=True)
class Example:
    input: str
    target: str | None = None


def read_jsonl(path: str | Path) -> list[tuple[int, dict]]:
    """Parse a JSONL file into (line number, object) pairs; blank lines are skipped."""
    path = Path(path)
    if path.is_dir():
        raise InputError(f"'{path}' is a directory, not a file.", "Give the JSONL file itself.")
    if not path.is_file():
        raise InputError(f"file '{path}' does not exist.", "Check the path.")
    if (size := path.stat().st_size) > MAX_FILE_BYTES:
        raise InputError(
            f"{path} is {size / 2**20:.0f} MiB; a shots or inputs file may hold at most {MAX_FILE_BYTES >> 20} MiB.",
            "Keep the examples you need, or split the file.",
        )
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise InputError(
            f"{path}:{line}: the file is not valid UTF-8 (byte {err.object[err.start]:#04x}).",
            "Re-save it as UTF-8.",
        ) from None
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        if len(line) > MAX_EXAMPLE_CHARS:
            raise InputError(
                f"{path}:{number}: the line has {len(line):,} characters; one example may have at most "
                f"{MAX_EXAMPLE_CHARS:,}.",
                "Shorten the example.",
            )
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            raise InputError(
                f"{path}:{number}: not valid JSON ({err.msg} at column {err.colno}).",
                'Each line must be one JSON object like {"input": "...", "target": "..."}.',
            ) from None
        except RecursionError:
            raise InputError(
                f"{path}:{number}: the JSON is nested too deeply.",
                'Each line must be one flat JSON object like {"input": "...", "target": "..."}.',
            ) from None
        if not isinstance(obj, dict):
            raise InputError(
                f"{path}:{number}: expected a JSON object, got {type(obj).__name__}.",
                'Each line must be one JSON object like {"input": "...", "target": "..."}.',
            )
        rows.append((number, obj))
    if not rows:
        raise InputError(f"{path} is empty.", 'Add one {"input": ..., "target": ...} object per line.')
    return rows


def _field(path: Path, number: int, obj: dict, names: tuple[str, ...], required: bool) -> str | None:
    for name in names:
        if name in obj:
            value = obj[name]
            if not isinstance(value, str):
                raise InputError(
                    f"{path}:{number}: field '{name}' must be a string, got {type(value).__name__}.",
                    "Quote the value.",
                )
            try:
                value.encode("utf-8")
            except UnicodeEncodeError as error:
                raise InputError(
                    f"{path}:{number}: field '{name}' holds a lone surrogate (\\u{ord(value[error.start]):04x}), "
                    "which is not text.",
                    "Fix or remove that \\u escape.",
                ) from None
            return value
    if required:
        wanted = " or ".join(f"'{n}'" for n in names)
        raise InputError(
            f"{path}:{number}: missing field {wanted}; the line has {sorted(obj) or 'no fields'}.",
            'Each line must look like {"input": "...", "target": "..."}.',
        )
    return None


def read_examples(
    path: str | Path,
    *,
    require_target: bool = True,
    input_field: str = "input",
    target_field: str | None = None,
) -> list[Example]:
    """Read shots (target required) or inputs (target optional) from a JSONL file."""
    path = Path(path)
    targets = (target_field,) if target_field else TARGET_ALIASES
    examples = []
    for number, obj in read_jsonl(path):
        text = _field(path, number, obj, (input_field,), required=True)
        if not text.strip():
            raise InputError(f"{path}:{number}: field '{input_field}' is empty.", "Give every line some input text.")
        target = _field(path, number, obj, targets, required=require_target)
        examples.append(Example(text, target))
    return examples


def read_json(path: str | Path, hint: str, shown: str | None = None):
    """A JSON file's content; an unreadable or malformed file is a one-line InputError with `hint`.

    `shown` names the file in the message when `path` is a copy (a staging folder) the user never saw.
    """
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as error:
        reason = (
            "nested too deeply"
            if isinstance(error, RecursionError)
            else str(error).replace(str(path), shown or str(path))
        )
        raise InputError(f"{shown or path} is not valid JSON ({reason}).", hint) from None


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write `data` to `path` so that a reader sees the old file or the new one, never a part."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: str | Path, obj) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, ensure_ascii=False) + "\n").encode("utf-8"))
