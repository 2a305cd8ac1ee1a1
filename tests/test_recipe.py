"""The typed recipe, rebuilding from it (every formula, bit for bit), and where `compose --out` may write."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import SHOTS
from tiny_models import make_adapters, one_thread, tiny_t5  # noqa: F401  (fixture)

from lorahub_cli.compose.adapters import load_adapter
from lorahub_cli.compose.formulas import FORMULAS, combine
from lorahub_cli.compose.recipe import RECIPE_FILE, Recipe
from lorahub_cli.errors import InputError

pytestmark = pytest.mark.usefixtures("one_thread")

FORMULA_OPTIONS = {
    "elementwise": [],
    "linear": [],
    "fusion": [],
    "ties": ["--density", "0.5"],
    "dare_linear": ["--density", "0.5"],
    "svd": ["--svd-rank", "3"],
}


def test_every_registered_formula_is_covered():
    assert set(FORMULA_OPTIONS) == set(FORMULAS)


# --- Recipe: load and save ---------------------------------------------------------------------


def _task_recipe() -> dict:
    module = {"id": "a", "source": "a", "revision": None, "sha256": "0" * 64, "weight": 0.5}
    return {
        "format": 1,
        "level": "task",
        "base_model": "m",
        "formula": "elementwise",
        "modules": [module],
        "search": None,
        "loss": 1.25,
    }


def test_recipe_round_trips(tmp_path):
    recipe = Recipe.from_json(_task_recipe())
    recipe.save(tmp_path)
    again = Recipe.load(tmp_path)
    assert again == recipe and again.weights == {"a": 0.5}
    assert list(json.loads((tmp_path / RECIPE_FILE).read_text()))[:4] == [
        "format",
        "lorahub_version",
        "created_at",
        "level",
    ]


@pytest.mark.parametrize(
    "change, field",
    [
        (lambda r: r.pop("modules"), "'modules' is missing"),
        (lambda r: r.update(loss="low"), "'loss' has the wrong type"),
        (lambda r: r["modules"][0].pop("sha256"), "'modules[0].sha256' is missing"),
        (lambda r: r["modules"][0].update(weight=True), "'modules[0].weight' has the wrong type"),
        (lambda r: r.update(level="batch"), "'level' is 'batch'"),
        (lambda r: r.update(format=2), "recipe format 2"),
        (lambda r: r.update(level="instance"), "'compositions' is missing"),
        (lambda r: r.update(search={"evaluations": 3, "stop": "tired"}), "'search.stop' is 'tired'"),
        (lambda r: r.update(search={"evaluations": "3"}), "'search.evaluations' has the wrong type"),
        (lambda r: r.update(search={"evaluations": 3, "start": [0.1]}), "'search.start' has the wrong type"),
    ],
)
def test_a_bad_recipe_names_its_field(tmp_path, change, field):
    data = _task_recipe()
    change(data)
    (tmp_path / RECIPE_FILE).write_text(json.dumps(data))
    with pytest.raises(InputError, match=re.escape(field)):
        Recipe.load(tmp_path)


def test_from_recipe_with_a_bad_field_is_one_line(cli, t5_home, tmp_path):
    data = _task_recipe()
    del data["modules"][0]["weight"]
    path = tmp_path / "recipe.json"
    path.write_text(json.dumps(data))
    result = cli("compose", "--from-recipe", path, "--out", tmp_path / "x")
    assert result.code == 2 and result.stderr.strip().splitlines() == [
        f"Error: {path}: field 'modules[0].weight' is missing. Give a lorahub_recipe.json written by lorahub compose "
        "(or compose again)."
    ]


# --- rebuilding every formula bit for bit -------------------------------------------------------


@pytest.mark.parametrize("formula", sorted(FORMULA_OPTIONS))
def test_from_recipe_rebuilds_every_formula_bit_for_bit(cli, t5_home, tmp_path, formula):
    out, rebuilt = tmp_path / "a", tmp_path / "b"
    result = cli(
        "compose",
        "--shots",
        SHOTS,
        "--modules",
        "capitals,addition,sentiment",
        "--formula",
        formula,
        *FORMULA_OPTIONS[formula],
        "--budget",
        "3",
        "--dtype",
        "float32",
        "--out",
        out,
    )
    assert result.code == 0, result.stderr
    recipe = Recipe.load(out)
    if formula == "dare_linear":
        assert recipe.formula_options == {"density": 0.5, "seed": 42}, "the seed of the random drop is recorded"
    torch.manual_seed(1234)  # the rebuild must not depend on the global generator's state
    assert cli("compose", "--from-recipe", out / RECIPE_FILE, "--out", rebuilt).code == 0
    for name in ("adapter_model.safetensors", "adapter_config.json", RECIPE_FILE, "README.md"):
        assert (out / name).read_bytes() == (rebuilt / name).read_bytes(), name


def test_dare_linear_depends_on_its_seed_only(tmp_path):
    adapters = [load_adapter(p) for p in make_adapters(tiny_t5(), tmp_path, 3)]
    merge = lambda seed: combine(adapters, [0.5, 0.3, 0.2], "dare_linear", density=0.5, seed=seed).modules  # noqa: E731
    first = merge(7)
    torch.manual_seed(99)
    state = torch.get_rng_state()
    assert all(torch.equal(a, b) for m in first for a, b in zip(first[m], merge(7)[m]))
    assert torch.equal(state, torch.get_rng_state()), "the caller's generator is left as it was"
    assert any(not torch.equal(first[m][0], merge(8)[m][0]) for m in first)


# --- where --out may be written (issue 11: --overwrite deleted the working directory and the home) ---


def _compose(cli, out, *extra):
    return cli(
        "compose",
        "--shots",
        SHOTS,
        "--modules",
        "capitals,addition",
        "--weights",
        "capitals=0.5,addition=0.5",
        "--out",
        out,
        *extra,
    )


def test_overwrite_replaces_a_folder_compose_wrote(cli, t5_home, tmp_path):
    out = tmp_path / "mine"
    assert _compose(cli, out).code == 0
    assert _compose(cli, out).code == 2, "without --overwrite an existing folder is kept"
    assert _compose(cli, out, "--overwrite").code == 0


def test_overwrite_refuses_the_working_directory_and_its_parents(cli, t5_home, tmp_path, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    shots = work / "shots.jsonl"
    shots.write_bytes(SHOTS.read_bytes())
    monkeypatch.chdir(work)
    for out in (".", ".."):
        result = cli(
            "compose", "--shots", shots, "--modules", "capitals", "--weights", "capitals=1", "--out", out, "--overwrite"
        )
        assert result.code == 2 and "refusing to replace" in result.stderr and "working directory" in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1
    assert shots.read_bytes() == SHOTS.read_bytes()


def test_overwrite_refuses_the_home(cli, t5_home, tmp_path):
    home = t5_home[0]
    before = sorted(p.relative_to(home) for p in home.rglob("*"))
    result = _compose(cli, home, "--overwrite")
    assert result.code == 2 and "lorahub home" in result.stderr
    assert sorted(p.relative_to(home) for p in home.rglob("*")) == before


def test_overwrite_refuses_a_folder_holding_the_inputs_or_foreign_files(cli, t5_home, tmp_path):
    out = tmp_path / "mine"
    assert _compose(cli, out).code == 0
    (out / "notes.txt").write_text("mine")
    result = _compose(cli, out, "--overwrite")
    assert result.code == 2 and "'notes.txt', which lorahub did not write" in result.stderr
    assert (out / "notes.txt").read_text() == "mine"
    (out / "notes.txt").unlink()
    shots = out / "shots.jsonl"
    shots.write_bytes(SHOTS.read_bytes())
    result = cli(
        "compose", "--shots", shots, "--modules", "capitals", "--weights", "capitals=1", "--out", out, "--overwrite"
    )
    assert result.code == 2 and "holds the input" in result.stderr and shots.is_file()
    plain = tmp_path / "plain"
    plain.mkdir()
    result = _compose(cli, plain, "--overwrite")
    assert result.code == 2 and f"has no {RECIPE_FILE}" in result.stderr


def test_an_unwritable_out_fails_before_the_search(cli, lorahub_home, tmp_path):
    """The registry here is empty: a check made after the search would report that instead."""
    result = cli("compose", "--shots", SHOTS, "--out", "/sys/lorahub-cannot-write-here")
    assert result.code == 2 and "cannot write '/sys/lorahub-cannot-write-here'" in result.stderr, result.stderr
    blocker = tmp_path / "file"
    blocker.write_text("x")
    result = cli("compose", "--shots", SHOTS, "--out", blocker / "sub")
    assert result.code == 2 and "is a file, not a folder" in result.stderr


# Runs the real entry point with one change: the first step of the "Searching weights" progress display writes a
# byte on the pipe whose descriptor is in LORAHUB_TEST_SEARCHING_FD, so the test knows the search is running.
SIGNAL_SEARCH = """
import contextlib, os, signal, sys
from lorahub_cli.cli import _output

# Ctrl-C as in a terminal, even when the suite runs in a background job (which starts with SIGINT ignored).
signal.signal(signal.SIGINT, signal.default_int_handler)

fd, shown = int(os.environ.pop("LORAHUB_TEST_SEARCHING_FD")), _output.progress

@contextlib.contextmanager
def progress(description, total):
    with shown(description, total) as advance:
        def signalling(*args, **kwargs):
            global fd
            advance(*args, **kwargs)
            if fd is not None and description.startswith("Searching"):
                os.write(fd, b"s")
                os.close(fd)
                fd = None
        yield signalling

_output.progress = progress  # before the commands import it
from lorahub_cli.cli.app import main

sys.argv[0] = "lorahub"
main()
"""


def cpu_seconds(pid: int) -> float:
    """The CPU time (user + system) a process has used: unlike wall-clock time, a busy machine does not stretch it."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_sigint_during_compose_says_interrupted_and_writes_nothing(t5_home, tmp_path):
    """Ctrl-C once the search is running (a synchronisation point, not a delay: the machine may be as loaded as it
    likes). The process must then end without computing on; its CPU time bounds that, not the clock."""
    out = tmp_path / "never"
    searching, signal_end = os.pipe()
    env = {**os.environ, "LORAHUB_HOME": str(t5_home[0]), "LORAHUB_TEST_SEARCHING_FD": str(signal_end)}
    args = ["compose", "--shots", SHOTS, "--out", out, "-n", "4", "--budget", "100000", "--dtype", "float32"]
    with open(tmp_path / "stderr", "w+") as stderr:  # a file, not a pipe: nothing can block on a full pipe
        process = subprocess.Popen(
            [sys.executable, "-c", SIGNAL_SEARCH, *map(str, args)],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            pass_fds=(signal_end,),
        )
        os.close(signal_end)  # the child holds the only write end: its exit ends the read below
        try:
            started = os.read(searching, 1)  # blocks until the search's first evaluation (or the child's end)
            assert started == b"s", f"the search never started: {stderr.seek(0) or stderr.read()}"
            process.send_signal(signal.SIGINT)
            # A budget of 100,000 does not end by itself: a process that ignored the interrupt would compute on.
            interrupted_at = cpu_seconds(process.pid)
            while process.poll() is None:
                with contextlib.suppress(FileNotFoundError):
                    assert cpu_seconds(process.pid) - interrupted_at < 60, "still computing after SIGINT"
                time.sleep(0.1)
        finally:
            os.close(searching)
            if process.poll() is None:  # a failed check above must not leave a search running for hours
                process.kill()
                process.wait()
        stderr.seek(0)
        messages = stderr.read()
    # 130 from sys.exit, or -2 when the interpreter ends itself by SIGINT after the message (CPython does that
    # for an interrupt it sees late); a shell reports both as exit status 130.
    assert process.returncode in (130, -signal.SIGINT), messages
    assert messages.strip().splitlines()[-1] == "Interrupted."
    assert not out.exists() and [p.name for p in tmp_path.iterdir() if p.name.startswith(".never")] == []


def test_the_home_is_the_user_data_folder_unless_an_old_cache_home_exists(tmp_path, monkeypatch):
    from lorahub_cli.settings import home

    monkeypatch.delenv("LORAHUB_HOME")
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert home() == tmp_path / "data" / "lorahub"
    (tmp_path / "cache" / "lorahub").mkdir(parents=True)
    (tmp_path / "cache" / "lorahub" / "registry.sqlite").write_bytes(b"")
    assert home() == tmp_path / "cache" / "lorahub", "a registry made by an earlier version stays in use"
    (tmp_path / "data" / "lorahub").mkdir(parents=True)
    assert home() == tmp_path / "data" / "lorahub"
    monkeypatch.setenv("LORAHUB_HOME", str(tmp_path / "mine"))
    assert home() == tmp_path / "mine"


@pytest.mark.parametrize(
    "args, registry",
    [
        (["compose", "--formula", "list"], "FORMULAS"),
        (["compose", "--optimizer", "list"], "OPTIMIZERS"),
        (["eval", "demo", "--methods", "list"], "RUNNERS"),
    ],
)
def test_choices_come_from_the_registries(cli, args, registry, monkeypatch):
    from lorahub_cli.compose import formulas, search
    from lorahub_cli.eval import methods

    entries = {"FORMULAS": formulas.FORMULAS, "OPTIMIZERS": search.OPTIMIZERS, "RUNNERS": methods.RUNNERS}[registry]
    monkeypatch.setitem(entries, "newly_registered", next(iter(entries.values())))
    result = cli(*args)
    assert result.code == 0 and list(json.loads(result.stdout)) == list(entries)
    assert all(json.loads(result.stdout).values()), "every entry has a summary"
    bad = (
        cli(*args[:-1], "nope", "--out", "x", "--shots", str(SHOTS))
        if args[0] == "compose"
        else cli(*args[:-1], "zero-shot,nope")
    )
    assert bad.code == 2 and "nope" in bad.stderr and "newly_registered" in bad.stderr, (
        "the library checks against the registry"
    )
