"""Shared fixtures: a private lorahub home per test, an in-process CLI runner, the example library."""

from __future__ import annotations

import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from hubserver import hub, hub_env  # noqa: F401  (fixtures)
from tiny_models import make_lora_adapter, save_tiny_base

from lorahub_cli.cards.data import CardOptions
from lorahub_cli.registry import Store
from lorahub_cli.registry.cards import card_from_source
from lorahub_cli.registry.mirror import add_local
from lorahub_cli.settings import shipped_dir

EXAMPLES = shipped_dir() / "examples"


@pytest.fixture(autouse=True)
def lorahub_home(tmp_path, monkeypatch) -> Path:
    home = tmp_path / "lorahub-home"
    monkeypatch.setenv("LORAHUB_HOME", str(home))
    monkeypatch.setenv("NO_COLOR", "1")
    monkeypatch.setenv("COLUMNS", "200")
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    monkeypatch.delenv("LORAHUB_DEBUG", raising=False)
    return home


@pytest.fixture(params=["bf16", "fp32"])
def cpu_kind(request, monkeypatch) -> str:
    """Run a test as if on a CPU with fast bf16 (AMX / AVX512-BF16: `--dtype auto` is bf16) and as if on one
    without (AVX2 only: fp32), whatever CPU runs the suite; CPU runs only, so CUDA is hidden."""
    from lorahub_cli import models

    monkeypatch.setattr(models, "cpu_has_fast_bf16", lambda: request.param == "bf16")
    monkeypatch.setattr(models.torch.cuda, "is_available", lambda: False)
    return request.param


@dataclass
class Result:
    code: int
    stdout: str
    stderr: str


@pytest.fixture
def cli(capsys, monkeypatch):
    """Run `lorahub ARGS…` in this process through the real entry point (exit codes and error formatting included)."""
    from lorahub_cli.cli.app import main

    def run(*args: str) -> Result:
        capsys.readouterr()
        monkeypatch.setattr(sys, "argv", ["lorahub", *map(str, args)])
        try:
            main()
            code = 0
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
        captured = capsys.readouterr()
        return Result(code, captured.out, captured.err)

    return run


@pytest.fixture(scope="session")
def example_registry(tmp_path_factory) -> Path:
    """A registry home holding the eight example adapters with cards; built once, copied per test."""
    from lorahub_cli.examples.walkthrough import run
    from lorahub_cli.registry import Store

    home = tmp_path_factory.mktemp("examples-home")
    run(Store(home), "sentiment")
    return home


@pytest.fixture
def registry_with_examples(example_registry, lorahub_home) -> Path:
    shutil.copytree(example_registry, lorahub_home)
    return lorahub_home


LIBRARY_TASKS = ["capitals", "addition", "sentiment", "antonyms"]
SHOTS = EXAMPLES / "shots" / "capitals.jsonl"


def build_library(root, kind="t5", with_cards=True):
    """A tiny base model on disk and four adapters for it (non-zero B), registered with cards."""
    base_dir = root / f"base-{kind}"
    model = save_tiny_base(kind, base_dir)
    home = root / f"home-{kind}"
    store = Store(home)
    for seed, task in enumerate(LIBRARY_TASKS):
        folder = make_lora_adapter(model, root / kind / task, r=4, alpha=8, seed=seed, base_model_name=str(base_dir))
        add_local(store, folder, name=task)
        if with_cards:
            card_from_source(store, task, CardOptions(data=EXAMPLES / "data" / f"{task}.jsonl"))
    return home, base_dir


@pytest.fixture(scope="session")
def t5_library(tmp_path_factory):
    return build_library(tmp_path_factory.mktemp("t5-library"))


@pytest.fixture
def t5_home(t5_library, lorahub_home):
    shutil.copytree(t5_library[0], lorahub_home)
    return lorahub_home, t5_library[1]


@pytest.fixture
def task_dir(tmp_path):
    """Two small tasks of the example library, 12 examples each (evaluation grids)."""
    folder = tmp_path / "tasks"
    folder.mkdir()
    for task in ("capitals", "addition"):
        rows = (EXAMPLES / "data" / f"{task}.jsonl").read_text().splitlines(True)[:12]
        (folder / f"{task}.jsonl").write_text("".join(rows))
    return folder
