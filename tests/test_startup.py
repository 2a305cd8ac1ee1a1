"""What a command imports: each heavy library only where the command uses it (issue 23's load time).

Every command runs in a fresh Python (an import, once made, cannot be undone in this one), through the real
entry point, and reports which of the heavy libraries it imported."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import SHOTS

HEAVY = ("peft", "sentence_transformers", "nevergrad", "fastapi", "uvicorn", "ray")

CHILD = """
import json, os, sys
sys.argv = ["lorahub", *json.loads(os.environ["LORAHUB_TEST_ARGS"])]
from lorahub_cli.cli.app import main
try:
    main()
    code = 0
except SystemExit as exit_:
    code = exit_.code
heavy = [name for name in json.loads(os.environ["LORAHUB_TEST_HEAVY"]) if name in sys.modules]
print(json.dumps({"code": code, "imported": heavy}), file=sys.stderr)
"""


def imported(*args, cwd) -> set[str]:
    """The heavy libraries `lorahub ARGS...` imported, run in a fresh interpreter."""
    env = {
        **os.environ,
        "LORAHUB_TEST_ARGS": json.dumps([str(a) for a in args]),
        "LORAHUB_TEST_HEAVY": json.dumps(HEAVY),
    }
    run = subprocess.run([sys.executable, "-c", CHILD], env=env, cwd=cwd, capture_output=True, text=True, timeout=600)
    report = json.loads(run.stderr.strip().splitlines()[-1])
    assert report["code"] == 0, run.stderr
    return set(report["imported"])


@pytest.fixture
def adapter_folder(t5_library):
    """A registered adapter's original PEFT folder (conftest.build_library writes it beside the base model)."""
    return t5_library[1].parent / "t5" / "capitals"


def test_generate_with_one_adapter_imports_none_of_them(t5_home, adapter_folder, tmp_path):
    inputs = tmp_path / "inputs.jsonl"
    inputs.write_text('{"input": "The capital of France is"}\n')
    args = ("generate", "--adapter", adapter_folder, "--inputs", inputs, "--max-new-tokens", "2")
    assert imported(*args, cwd=tmp_path) == set()


def test_retrieve_imports_the_embedder_and_not_the_search_or_the_server(t5_home, tmp_path):
    # sentence-transformers imports transformers.trainer_utils, which imports peft when it is installed.
    found = imported("retrieve", "--shots", SHOTS, "-k", "2", cwd=tmp_path)
    assert "sentence_transformers" in found and not found & {"nevergrad", "fastapi", "uvicorn", "ray"}


def test_compose_with_named_modules_and_a_gradient_search_imports_peft_only(t5_home, tmp_path):
    # peft writes the composition's adapter_config.json (its LoraConfig, every field as PEFT saves it).
    args = ("compose", "--shots", SHOTS, "--modules", "capitals,addition", "--optimizer", "adam", "--budget", "2")
    assert imported(*args, "--out", tmp_path / "out", cwd=tmp_path) == {"peft"}
