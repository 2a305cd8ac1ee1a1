"""`lorahub demo` and `lorahub eval demo` end to end on the shipped demo library."""

from __future__ import annotations

import json

import pytest

from lorahub_cli.api import free_folder as _free
from lorahub_cli.demo import library
from lorahub_cli.settings import DEMO
from tiny_models import one_thread  # noqa: F401  (fixture)

pytestmark = pytest.mark.usefixtures("one_thread")


def test_demo_runs_the_whole_pipeline_offline(cli, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    task = DEMO["task"]
    result = cli("demo", "--out", tmp_path / "adapter", "--budget", "10", "--json")
    assert result.code == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["task"] == task and summary["shots"] == 5 and summary["test"] == len(library.heldout_examples(task)) - 5
    assert len(summary["retrieved"]) == 5 and all(r["id"].startswith("demo/") for r in summary["retrieved"])
    assert set(summary["weights"]) == {r["id"] for r in summary["retrieved"]}
    assert set(summary["exact_match"]) == set(summary["option_letter"]) == {"zero-shot", "composed"}
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "adapter" / "lorahub_recipe.json").is_file()


def test_demo_never_replaces_an_existing_folder(tmp_path):
    (tmp_path / "lorahub-demo-x").mkdir()
    (tmp_path / "lorahub-demo-x-2").mkdir()
    assert _free(tmp_path / "lorahub-demo-x") == tmp_path / "lorahub-demo-x-3"
    assert _free(tmp_path / "new") == tmp_path / "new"


def test_demo_refuses_an_unknown_task(cli):
    result = cli("demo", "--task", "no-such-task")
    assert result.code != 0 and "no-such-task" in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_eval_demo_on_one_task(cli, tmp_path):
    task = library.heldout_tasks()[0]["name"]
    out = tmp_path / "run"
    result = cli("eval", "demo", "--tasks", task, "--methods", "zero-shot,batchcomp", "--seeds", "1", "--limit", "6",
                 "--budget", "4", "--out", out, "--json")
    assert result.code == 0, result.stderr
    summary = json.loads(result.stdout)
    assert list(summary["tasks"]) == [task] and set(summary["tasks"][task]) == {"zero-shot", "batchcomp"}
    assert (out / "report.md").is_file() and (out / "plot.png").is_file()
