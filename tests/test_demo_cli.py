"""`lorahub demo` and `lorahub eval demo` end to end on the shipped demo library."""

from __future__ import annotations

import json

import pytest
from tiny_models import one_thread  # noqa: F401  (fixture)

from lorahub_cli.api import free_folder as _free
from lorahub_cli.demo import library
from lorahub_cli.settings import DEMO

pytestmark = pytest.mark.usefixtures("one_thread")


def test_demo_runs_the_whole_pipeline_offline(cli, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert DEMO["task"] is None  # the library's own default: the held-out task with the median gain
    task = library.default_task()
    result = cli("demo", "--out", tmp_path / "adapter", "--budget", "10", "--json")
    assert result.code == 0, result.stderr
    summary = json.loads(result.stdout)
    assert (
        summary["task"] == task and summary["shots"] == 5 and summary["test"] == len(library.heldout_examples(task)) - 5
    )
    assert len(summary["retrieved"]) == 5 and all(r["id"].startswith("demo/") for r in summary["retrieved"])
    assert set(summary["weights"]) == {r["id"] for r in summary["retrieved"]}
    assert set(summary["exact_match"]) == set(summary["option_letter"]) == {"zero-shot", "composed"}
    assert summary["type"] in ("wording", "format", "mixed", "chained") and summary["skills"]
    assert 0 <= summary["gained"] + summary["lost"] <= summary["test"]
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
    result = cli(
        "eval",
        "demo",
        "--tasks",
        task,
        "--methods",
        "zero-shot,batchcomp",
        "--seeds",
        "1",
        "--limit",
        "6",
        "--budget",
        "4",
        "--out",
        out,
        "--json",
    )
    assert result.code == 0, result.stderr
    summary = json.loads(result.stdout)
    assert list(summary["tasks"]) == [task] and set(summary["tasks"][task]) == {"zero-shot", "batchcomp"}
    assert (out / "report.md").is_file() and (out / "plot.png").is_file()


def test_the_demo_base_model_resolves_by_its_name_offline(monkeypatch):
    """Issue 11: the demo adapters name a base that is not on the Hub; lorahub must not ask the Hub for it."""
    from lorahub_cli.models import load_base_model, local_model_path

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert local_model_path(library.BASE_MODEL) == library.base_model_path()
    assert local_model_path("google/flan-t5-large") is None
    base = load_base_model(library.BASE_MODEL, dtype="float32", device="cpu")
    assert base.is_seq2seq and sum(p.numel() for p in base.model.parameters()) > 5e5


def test_compose_on_a_demo_registry_needs_no_model_flag(cli, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    home = tmp_path / "demo-home"
    assert cli("demo", "--home", home, "--out", tmp_path / "first", "--budget", "3", "--json").code == 0
    shots = tmp_path / "shots.jsonl"
    shots.write_text(
        "".join(
            json.dumps({"input": e.input, "target": e.target}) + "\n"
            for e in library.heldout_examples(library.default_task())[:5]
        )
    )
    monkeypatch.setenv("LORAHUB_HOME", str(home))
    out = tmp_path / "composed"
    result = cli("compose", "--shots", shots, "--out", out, "-n", "3", "--budget", "3", "--dtype", "float32")
    assert result.code == 0, result.stderr
    card = (out / "README.md").read_text()
    assert f'from_pretrained(local_model_path("{library.BASE_MODEL}"))' in card
    assert f'from_pretrained("{library.BASE_MODEL}")' not in card, "that name is not on the Hub"


def _result(zero: float, composed: float, majority: float) -> dict:
    return {"exact_match": {"zero-shot": zero, "composed": composed}, "majority_answer": majority}


def test_the_verdict_above_both_baselines():
    from lorahub_cli.demo.tour import verdict

    text = verdict(_result(3.2, 61.1, 8.4))
    assert text.startswith("Above both baselines: 61.1% against 3.2% for the base model alone and 8.4%")
    assert "52.7 points above the better of the two" in text


def test_the_verdict_above_one_baseline_only():
    from lorahub_cli.demo.tour import verdict

    above_zero = verdict(_result(27.4, 51.6, 55.8))
    assert above_zero.startswith("Above the base model (27.4% -> 51.6%) but not above always giving the most")
    assert "learnt what answers are common here, not the skill" in above_zero
    above_majority = verdict(_result(40.0, 30.0, 12.0))
    assert above_majority.startswith("Above always giving the most frequent answer (12.0%) but not above the base")
    assert "did not add to what the base already does" in above_majority


def test_the_verdict_below_both_baselines_and_ties_count_as_below():
    from lorahub_cli.demo.tour import verdict

    assert verdict(_result(10.0, 5.0, 8.0)).startswith("Below both baselines (5.0% against 10.0% zero-shot and 8.0%")
    assert verdict(_result(10.0, 10.0, 10.0)).startswith("Below both baselines")


def test_the_demo_says_what_the_composition_did():
    from lorahub_cli.demo.tour import explain

    result = {
        "weights": {"demo/a": 0.01, "demo/reverse_word": 1.21, "demo/b": -0.3, "demo/c": 0.0},
        "gained": 40,
        "lost": 2,
        "examples": [
            {"input": "Write the word backwards: egg", "target": "gge", "zero-shot": "gge", "composed": "gge"},
            {"input": "Write the word backwards: moon", "target": "noom", "zero-shot": "moon", "composed": "noom"},
        ],
    }
    assert explain(result) == (
        "The search leaned on demo/reverse_word (+1.21) and demo/b (-0.30); the other 2 modules had smaller weights. "
        "It answers 40 test inputs right that the base model got wrong, and 2 the other way round. "
        "For example 'Write the word backwards: moon': the base answers 'moon', the composition 'noom'."
    )
    result["weights"] = {"demo/a": 0.01}
    assert explain(result).startswith("The search left every module near weight 0")
