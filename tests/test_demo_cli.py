"""`lorahub demo` and `lorahub eval demo` end to end on the shipped demo library."""

from __future__ import annotations

import json
import os
import shlex

import pytest
from tiny_models import one_thread  # noqa: F401  (fixture)

from lorahub_cli.demo import library, tour
from lorahub_cli.settings import DEMO

pytestmark = pytest.mark.usefixtures("one_thread")


def test_demo_runs_the_whole_pipeline_offline(cli, tmp_path, lorahub_home, monkeypatch):
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
    # The registry stays, in the demo home beside the lorahub home, with the task's files for the next commands.
    home = lorahub_home.with_name(lorahub_home.name + "-demo")
    assert summary["home"] == str(home) and summary["registry"] == str(home / "registry")
    assert len(list((home / "registry" / "adapters").iterdir())) == len(library.upstream_tasks())
    few, test = tour.task_split(task, 1, 5)
    shots = [json.loads(line) for line in (home / "tasks" / task / "shots.jsonl").read_text().splitlines()]
    assert shots == [{"input": e.input, "target": e.target} for e in few]
    assert summary["next"][:3] == [f"cd {home}", 'export LORAHUB_HOME="$PWD/registry"', f"cd tasks/{task}"]


def test_the_demo_writes_nothing_into_the_working_folder(cli, tmp_path, lorahub_home, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    result = cli("demo", "--budget", "3")
    assert result.code == 0, result.stderr
    assert list(work.iterdir()) == []
    home = lorahub_home.with_name(lorahub_home.name + "-demo")
    assert (home / "compositions" / library.default_task() / "adapter_model.safetensors").is_file()


def test_running_the_demo_again_neither_duplicates_nor_replaces_what_the_user_changed(cli, tmp_path, lorahub_home):
    home = tmp_path / "demo-home"
    task = library.default_task()
    first = json.loads(cli("demo", "--home", home, "--budget", "3", "--json").stdout)
    shots = home / "tasks" / task / "shots.jsonl"
    mine = home / "tasks" / task / "my-notes.txt"
    mine.write_text("mine")
    (home / "tasks" / task / "inputs.jsonl").write_text('{"input": "my own question"}\n')  # the user's now
    result = cli("demo", "--home", home, "--budget", "3", "--seed", "2", "--json")
    assert result.code == 0, result.stderr
    second = json.loads(result.stdout)
    assert second["out"] == first["out"] == str(home / "compositions" / task)  # replaced, not -2
    assert sorted(p.name for p in (home / "compositions").iterdir()) == [task]
    assert len(list((home / "registry" / "adapters").iterdir())) == len(library.upstream_tasks())
    few, _ = tour.task_split(task, 2, 5)
    assert json.loads(shots.read_text().splitlines()[0])["input"] == few[0].input  # the demo's file: seed 2's
    assert (home / "tasks" / task / "inputs.jsonl").read_text() == '{"input": "my own question"}\n'
    assert second["files"]["kept"] == [str(home / "tasks" / task / "inputs.jsonl")] and mine.read_text() == "mine"
    recipe = json.loads((home / "compositions" / task / "lorahub_recipe.json").read_text())
    assert recipe["shots"]["seed"] == 2


def test_the_demo_never_writes_into_a_folder_it_did_not_make(cli, tmp_path, lorahub_home):
    foreign = tmp_path / "papers"
    foreign.mkdir()
    (foreign / "draft.txt").write_text("mine")
    result = cli("demo", "--home", foreign)
    assert result.code == 2 and "lorahub demo did not make it" in result.stderr
    assert sorted(p.name for p in foreign.iterdir()) == ["draft.txt"]
    taken = tmp_path / "taken"
    taken.mkdir()
    result = cli("demo", "--home", tmp_path / "demo-home", "--out", taken)
    assert result.code == 2 and "already exists" in result.stderr and not (tmp_path / "demo-home").exists()
    result = cli("demo", "--home", lorahub_home / "demo")
    assert result.code == 2 and "lorahub home" in result.stderr
    # Its own composition folder is replaced only while it holds nothing but what lorahub compose wrote.
    home = tmp_path / "demo-home"
    assert cli("demo", "--home", home, "--budget", "2").code == 0
    (home / "compositions" / library.default_task() / "notes.txt").write_text("mine")
    result = cli("demo", "--home", home, "--budget", "2")
    assert result.code == 2 and "notes.txt" in result.stderr


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
    assert cli("demo", "--home", home, "--budget", "3", "--json").code == 0
    monkeypatch.setenv("LORAHUB_HOME", str(home / "registry"))
    out = tmp_path / "composed"
    shots = home / "tasks" / library.default_task() / "shots.jsonl"
    result = cli("compose", "--shots", shots, "--out", out, "-n", "3", "--budget", "3", "--dtype", "float32")
    assert result.code == 0, result.stderr
    card = (out / "README.md").read_text()
    assert f'from_pretrained(local_model_path("{library.BASE_MODEL}"))' in card
    assert f'from_pretrained("{library.BASE_MODEL}")' not in card, "that name is not on the Hub"


@pytest.fixture(scope="module")
def reduced_library(tmp_path_factory):
    """The reduced demo build (the CI build of docs/demo.md), as a shipped data folder holding it as demo/."""
    from lorahub_cli.demo.build import build

    shipped = tmp_path_factory.mktemp("shipped")
    build(shipped / "demo", reduced=True, seed=0)
    return shipped


def test_the_commands_the_demo_prints_work_offline_on_its_registry(cli, reduced_library, tmp_path, monkeypatch):
    """Issue 23: from `lorahub demo` to composing and answering, by following what it prints (80 columns)."""
    from lorahub_cli import settings

    monkeypatch.setattr(settings, "shipped_dir", lambda: reduced_library)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("COLUMNS", "80")
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    result = cli("demo", "--budget", "4")
    assert result.code == 0, result.stderr
    lines = result.stdout.splitlines()
    home = str(tmp_path / "lorahub-home-demo")
    # Every line fits, but the one that names the demo home (as long as the test's temporary folder).
    assert [line for line in lines if len(line) > 80 and home not in line] == []
    printed = "\n".join(lines)
    for adapter in {f"demo/{t['name']}" for t in library.upstream_tasks(reduced_library / "demo")}:
        assert adapter in printed, f"{adapter} is broken or missing"
    for score in ("composed (the retrieved modules", "the base model alone (zero-shot)", "the most frequent answer"):
        assert sum(score in line for line in lines) == 1, score
    commands = [
        line.strip() for line in lines[lines.index("Next, offline, as with your own adapters and examples:") + 1 :]
    ]
    assert commands[:3] == [f"cd {home}", 'export LORAHUB_HOME="$PWD/registry"', f"cd tasks/{library.default_task()}"]
    assert [c.split()[:2] for c in commands[3:]] == [
        ["lorahub", "retrieve"],
        ["lorahub", "compose"],
        ["lorahub", "generate"],
    ]
    assert list(work.iterdir()) == [], "nothing in the working folder"
    answers = None
    for command in commands:
        words = [os.path.expanduser(w.replace("$PWD", os.getcwd())) for w in shlex.split(command)]
        if words[0] == "cd":
            monkeypatch.chdir(words[1])
        elif words[0] == "export":
            name, _, value = words[1].partition("=")
            monkeypatch.setenv(name, value)
        else:
            ran = cli(*words[1:], *(["--json"] if words[1] == "generate" else []))
            assert ran.code == 0, (command, ran.stderr)
            answers = ran.stdout
    assert len(json.loads(answers)["answers"]) == 5
    assert all(a["adapters"] == [{"id": "my-lora", "weight": 1.0}] for a in json.loads(answers)["answers"])


def _result(zero: float, composed: float, majority: float) -> dict:
    return {"exact_match": {"zero-shot": zero, "composed": composed}, "majority_answer": majority}


def test_the_verdict_above_both_baselines():
    text = tour.verdict(_result(3.2, 61.1, 8.4))
    assert text == (
        "Above both baselines, by 52.7 points over the better of the two:\n"
        "the retrieved modules carry a skill the base model lacks."
    )


def test_the_verdict_above_one_baseline_only():
    above_zero = tour.verdict(_result(27.4, 51.6, 55.8))
    assert above_zero.startswith("Above the base model but not above always giving the most frequent answer:")
    assert "learnt what answers are common here, not the skill" in above_zero
    above_majority = tour.verdict(_result(40.0, 30.0, 12.0))
    assert above_majority.startswith("Above always giving the most frequent answer, not above the base model alone")
    assert "did not add to what the base model already does" in above_majority


def test_the_verdict_below_both_baselines_and_ties_count_as_below():
    assert tour.verdict(_result(10.0, 5.0, 8.0)).startswith("Below both baselines: no retrieved module carries")
    assert tour.verdict(_result(10.0, 10.0, 10.0)).startswith("Below both baselines")
    for result in (_result(3.2, 61.1, 8.4), _result(27.4, 51.6, 55.8), _result(40.0, 30.0, 12.0), _result(1, 0, 2)):
        assert all(len(line) <= 80 for line in tour.verdict(result).splitlines())


def test_the_scores_are_one_a_line_each_named_in_words():
    lines = tour.scores(_result(3.2, 61.1, 8.4) | {"test": 95})
    assert lines == [
        "Exact match on the 95 test inputs (the share of answers equal to the target):",
        "   61.1%  composed (the retrieved modules with the searched weights)",
        "    3.2%  the base model alone (zero-shot)",
        "    8.4%  always giving the most frequent answer",
    ]


def test_the_demo_says_what_the_composition_did():
    result = {
        "weights": {"demo/a": 0.01, "demo/reverse_word": 1.21, "demo/b": -0.3, "demo/c": 0.0},
        "gained": 40,
        "lost": 2,
    }
    assert tour.explain(result) == (
        "The search leaned on demo/reverse_word (+1.21) and demo/b (-0.30); the other 2 modules had smaller weights. "
        "It answers 40 test inputs right that the base model got wrong, and 2 the other way round."
    )
    result["weights"] = {"demo/a": 0.01}
    assert tour.explain(result).startswith("The search left every module near weight 0")
