"""Where a command may write its output, checked before any work, and the writes themselves, all or nothing.

Every command that writes a file or a folder (`compose`, `generate --out`, `eval`, `retriever train`,
`demo`) asks `check_destination` (or, for a folder it writes into and resumes, `check_output`) first:

- never inside the lorahub home: its folders are the registry's content (a composition written into
  `adapters/` would be indexed as an adapter by `registry rebuild`);
- never a name the file system cannot hold, or a place that cannot be written: a one-line error now,
  not an OSError after an hour of work;
- an existing destination only with `--overwrite`, and then never the working directory or a folder above
  it, one holding the lorahub home or the command's own inputs, and only what the caller's `replaceable`
  accepts (compose: a folder lorahub compose wrote, compose/folder.py).

The writes build the output beside the destination and rename it into place, so Ctrl-C or a crash leaves the
previous output or none; an OS error while writing is one line naming the destination.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from .errors import InputError, LorahubError
from .io import atomic_write_bytes
from .settings import home

# A name needs room for the temporary name it is written under first: ".NAME." + 8 random characters + ".tmp".
TEMP_NAME_EXTRA = 14
_HINT = "Choose another --out."


def check_output(out: str | Path, *, into: bool = False) -> Path:
    """What every destination needs, whatever is there now: outside the lorahub home, a name this file system
    can hold, and a place that can be written (with `into`, an existing folder that the command writes into:
    an eval run it resumes, the folder of a batch of compositions). Returns `out` resolved."""
    out = Path(out).expanduser().resolve()
    ancestor = out if into and _is_dir(out) else _existing_ancestor(out)
    _check_names(out, ancestor)
    lorahub_home = home().expanduser().resolve()
    if out.is_relative_to(lorahub_home):
        raise InputError(
            f"refusing to write '{out}': it is the lorahub home ({lorahub_home}) or inside it, "
            "where lorahub keeps its registry.",
            "Choose an --out outside it (lorahub registry path prints the home).",
        )
    if not ancestor.is_dir():
        raise InputError(f"cannot write '{out}': '{ancestor}' is a file, not a folder.", _HINT)
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".lorahub-probe-", dir=ancestor))
    except OSError as error:
        # Permission bits alone miss read-only mounts and a root user: only creating something tells.
        raise InputError(
            f"cannot write '{out}': {error.strerror} in '{ancestor}'.", "Choose a folder you can write to."
        ) from None
    return out


def check_destination(
    out: str | Path,
    overwrite: bool = False,
    *,
    file: bool = False,
    inputs: tuple[Path, ...] = (),
    replaceable: Callable[[Path], None] | None = None,
) -> Path:
    """Refuse, before any work, a destination (a folder, or with `file` a file) that check_output refuses, that
    exists (without `overwrite`), or that may not be replaced: the working directory or a folder above it, one
    holding the lorahub home or one of `inputs`, the other kind of thing, or what `replaceable(out)` refuses
    (it raises InputError). Returns `out` resolved."""
    out = check_output(out)
    try:
        exists = out.exists()
    except OSError as error:
        raise InputError(f"cannot write '{out}': {error.strerror or error}.", _HINT) from None
    if not exists:
        return out
    if not overwrite:
        raise InputError(f"'{out}' already exists.", "Choose another --out, or pass --overwrite to replace it.")
    what = "the file" if file else "the folder"
    hint = f"--overwrite replaces only {what} lorahub wrote; choose another --out."
    if file and not out.is_file():
        raise InputError(f"'{out}' is not a file.", _HINT)
    if not file and not out.is_dir():
        raise InputError(f"'{out}' is a file, not a folder.", _HINT)
    if Path.cwd().resolve().is_relative_to(out):
        raise InputError(f"refusing to replace '{out}': it is the working directory or one of its parents.", hint)
    lorahub_home = home().expanduser().resolve()
    if lorahub_home.is_relative_to(out):
        raise InputError(f"refusing to replace '{out}': it holds the lorahub home ({lorahub_home}).", hint)
    for path in inputs:
        if Path(path).resolve().is_relative_to(out):
            held = "is" if file else "holds"
            raise InputError(f"refusing to replace '{out}': it {held} the input '{path}'.", hint)
    if replaceable is not None:
        replaceable(out)
    return out


def _is_dir(path: Path) -> bool:
    try:
        return path.is_dir()
    except OSError:
        return False


def _existing_ancestor(out: Path) -> Path:
    ancestor = out.parent
    while True:
        try:
            if ancestor.exists():
                return ancestor
        except OSError:  # a component too long to look up: its parent is checked below
            pass
        ancestor = ancestor.parent


def _check_names(out: Path, ancestor: Path) -> None:
    """Every name still to be created below `ancestor` fits the file system (the last with its temporary name)."""
    try:
        limit = os.pathconf(ancestor, "PC_NAME_MAX")
    except (OSError, ValueError):
        limit = 255
    names = out.relative_to(ancestor).parts
    for i, name in enumerate(names):
        room = limit - (TEMP_NAME_EXTRA if i == len(names) - 1 else 0)
        if len(os.fsencode(name)) > room:
            raise InputError(
                f"cannot write '{out}': the name '{name[:24]}…' is {len(os.fsencode(name))} bytes long, "
                f"and at most {room} fit here.",
                "Choose a shorter --out.",
            )


# --- the writes -------------------------------------------------------------------------------------


def write_file(out: str | Path, data: bytes) -> Path:
    """`data` as the file `out` (checked by check_destination before the work), atomically."""
    out = Path(out).resolve()
    try:
        atomic_write_bytes(out, data)
    except OSError as error:
        raise _write_error(out, error) from None
    return out


def write_folder(out: str | Path, fill, *, overwrite: bool = False) -> Path:
    """Build a folder with `fill(tmp)` beside `out`, then rename it into place: all or nothing.

    Ctrl-C or a crash leaves either no output or the previous one, never a half-written folder.
    Where `out` may go was checked before the work that fills it (check_destination); an `out` that
    appeared since is still never replaced without `overwrite`."""
    out = Path(out).resolve()
    if out.exists() and not overwrite:
        raise InputError(f"'{out}' already exists.", "Choose another --out, or pass --overwrite to replace it.")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    except OSError as error:
        raise _write_error(out, error) from None
    try:
        fill(tmp)
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.rename(out, old)
            os.rename(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, out)
    except BaseException as error:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(error, OSError):
            raise _write_error(out, error) from None
        raise
    return out


def _write_error(out: Path, error: OSError) -> LorahubError:
    return LorahubError(
        f"could not write '{out}': {error.strerror or error}.",
        "Nothing was written there; free some space, or choose another --out.",
    )
