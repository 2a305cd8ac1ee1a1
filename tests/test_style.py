"""The tree is formatted and linted as pyproject.toml's [tool.ruff] says (line length 120)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def ruff(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ruff", *args], cwd=ROOT, capture_output=True, text=True)


def test_the_tree_is_formatted():
    result = ruff("format", "--check", ".")
    assert result.returncode == 0, f"run `ruff format .`:\n{result.stdout}{result.stderr}"


def test_the_tree_passes_the_linter():
    result = ruff("check", ".")
    assert result.returncode == 0, f"run `ruff check .`:\n{result.stdout}{result.stderr}"
