"""`lorahub eval`: scoring, BBH integrity, splits, every method on a tiny model, resume, the report."""

from __future__ import annotations

import copy
import dataclasses
import json
import shutil

import pytest
from conftest import EXAMPLES
from tiny_models import one_thread  # noqa: F401  (fixture)

from lorahub_cli.errors import InputError, IntegrityError
from lorahub_cli.eval import methods as methods_module
from lorahub_cli.eval import report, scoring, tasks
from lorahub_cli.eval.methods import METHODS, Context, EvalConfig
from lorahub_cli.eval.runner import cell_path, run_grid
from lorahub_cli.io import Example
from lorahub_cli.registry import Store

pytestmark = pytest.mark.usefixtures("one_thread")


# --- scoring ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "prediction, target, expected",
    [
        ("Paris", "paris", True),
        ("  Paris. ", "Paris", True),
        ("(A)", "(A)", True),
        ("(a).", "(A)", True),
        ("Pari", "Paris", False),
        ("A", "(A)", False),
        ("", "Yes", False),
        ("3.5", "35", True),  # every '.' goes
    ],
)
def test_exact_match_is_the_references_normalisation(prediction, target, expected):
    assert scoring.exact_match(prediction, target) is expected


QUESTION = "Which is a city?\nOptions:\n(A) Paris\n(B) Blue\n(C) Seven"


@pytest.mark.parametrize(
    "prediction, expected",
    [
        ("(A)", True),
        ("A", True),
        ("a.", True),
        ("(A) Paris", True),
        ("Paris", True),
        ("paris.", True),
        ("(B)", False),
        ("Blue", False),
        ("Lyon", False),
        ("", False),
        ("Apples", False),
    ],
)
def test_option_letter_reads_a_letter_or_the_options_text(prediction, expected):
    assert scoring.option_letter_match(prediction, "(A)", QUESTION) is expected


INLINE = "The cast was dull. The tone is: (A) negative (B) positive"


@pytest.mark.parametrize(
    "prediction, expected",
    [
        ("(A)", True),
        ("negative", True),
        ("A", True),
        ("positive", False),
        ("(B) positive", False),
        ("neg", False),
    ],
)
def test_options_listed_inline_are_read_too(prediction, expected):
    assert scoring.options(INLINE) == {"A": "negative", "B": "positive"}
    assert scoring.option_letter_match(prediction, "(A)", INLINE) is expected


def test_an_answer_that_is_an_options_text_is_not_read_as_a_letter():
    question = "Which is a mammal?\nOptions:\n(A) a trout\n(B) a whale"
    assert scoring.option_letter_match("a whale", "(B)", question)
    assert not scoring.option_letter_match("a whale", "(A)", question)


def test_malformed_bbh_targets_are_kept_and_scored_as_text():
    bbh = tasks.load_bbh()
    malformed = [bbh.tasks["movie_recommendation"][163], bbh.tasks["ruin_names"][99], bbh.tasks["ruin_names"][144]]
    assert [e.target for e in malformed] == ["Monsters, Inc", "dearth, wind, & fire", "rita, sue and bob poo"]
    # A model that answers with the right option's letter is wrong on both metrics: the target is no letter.
    assert not scoring.exact_match("(A)", malformed[0].target)
    assert not scoring.option_letter_match("(A)", malformed[0].target, malformed[0].input)
    assert scoring.option_letter_match("Monsters, Inc.", malformed[0].target, malformed[0].input)
    assert any("malformed" in note for note in bbh.notes)


# --- data ------------------------------------------------------------------------------------------


def test_bbh_is_shipped_whole():
    bbh = tasks.load_bbh()
    assert len(bbh.tasks) == 27 and sum(map(len, bbh.tasks.values())) == 6511
    assert len(bbh.tasks["causal_judgement"]) == 187 and all(e.target for t in bbh.tasks.values() for e in t)
    assert (tasks.bbh_dir() / "LICENSE").read_text().startswith("MIT")


def test_a_changed_bbh_file_is_refused(tmp_path, monkeypatch, cli):
    copy = tmp_path / "bbh"
    shutil.copytree(tasks.bbh_dir(), copy)
    path = copy / "navigate.json"
    path.write_bytes(path.read_bytes().replace(b"Take 1 step", b"Take 2 step", 1))
    monkeypatch.setattr(tasks, "bbh_dir", lambda: copy)
    with pytest.raises(IntegrityError, match="navigate.json"):
        tasks.load_bbh()
    result = cli("eval", "bbh", "--methods", "zero-shot")
    assert result.code != 0 and "navigate.json" in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_split_is_deterministic_and_disjoint():
    examples = [Example(str(i), str(i)) for i in range(30)]
    shots, test = tasks.split(examples, seed=1, shots=5)
    assert (shots, test) == tasks.split(examples, seed=1, shots=5)
    assert shots != tasks.split(examples, seed=2, shots=5)[0]
    assert len(shots) == 5 and sorted(shots + test) == list(range(30))
    assert tasks.split(examples, seed=1, shots=5, limit=4) == (shots, test[:4])
    with pytest.raises(InputError, match="too few"):
        tasks.split(examples[:5], seed=1, shots=5)


def test_task_selection_names_unknown_tasks(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"input": "x", "target": "y"}\n')
    suite = tasks.load_task_dir(tmp_path)
    assert list(suite.select("a").tasks) == ["a"]
    with pytest.raises(InputError, match="'b'|b"):
        suite.select("b")


# --- methods end to end ----------------------------------------------------------------------------


QUICK = ["--seeds", "1,2", "-n", "2", "--budget", "3", "--limit", "3", "--max-new-tokens", "3", "--dtype", "float32"]


def test_every_method_runs_and_writes_the_report(cli, t5_home, task_dir, tmp_path):
    _, base_dir = t5_home
    out = tmp_path / "run"
    result = cli(
        "eval",
        "tasks",
        task_dir,
        "--base-model",
        base_dir,
        "--methods",
        ",".join(METHODS),
        "--out",
        out,
        *QUICK,
        "--json",
    )
    assert result.code == 0, result.stderr
    summary = json.loads(result.stdout)
    assert set(summary["tasks"]) == {"capitals", "addition"}
    for task in summary["tasks"].values():
        assert list(task) == list(METHODS) and all(s["n"] == 2 and 0 <= s["mean"] <= 100 for s in task.values())
    assert set(summary["average"]) == set(METHODS)
    cells = sorted(out.glob("cells/*/seed-*/*.json"))
    assert len(cells) == 2 * 2 * len(METHODS)
    cell = json.loads(cell_path(out, "capitals", 1, "batchcomp").read_text())
    assert len(cell["predictions"]) == 3 and len(cell["detail"]["modules"]) == 2 and cell["detail"]["evaluations"] == 3
    instance = json.loads(cell_path(out, "capitals", 1, "instance").read_text())
    assert len(instance["detail"]["routes"]) == 3 and len(instance["detail"]["compositions"]) == 5
    assert (out / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = (out / "report.md").read_text()
    assert "| capitals |" in text and "Wins and losses" in text and "Cost per cell" in text
    results = json.loads((out / "results.json").read_text())
    assert results["tasks"] == summary["tasks"] and "batchcomp vs zero-shot" in results["win_loss"]


def test_composing_leaves_the_shared_base_model_unchanged(t5_home, task_dir):
    home, base_dir = t5_home
    suite = tasks.load_task_dir(task_dir)
    ctx = Context(
        EvalConfig(base_model=str(base_dir), num_modules=2, budget=3, max_new_tokens=4, dtype="float32"), Store(home)
    )
    shots, inputs = suite.tasks["capitals"][:5], [e.input for e in suite.tasks["capitals"][5:9]]
    before = methods_module.zero_shot(ctx, shots, inputs, 1).predictions
    for method in ("single-best", "uniform", "lorahub", "batchcomp", "instance"):
        methods_module.RUNNERS[method](ctx, shots, inputs, 1)
    assert methods_module.zero_shot(ctx, shots, inputs, 1).predictions == before
    assert not any(type(m).__name__ == "BankedLayer" for m in ctx.base.model.modules())


def _retrieved(ctx, shots):
    from lorahub_cli import retrieval

    index = retrieval.CardIndex.from_store(ctx.store, ctx.config.base_model)
    ranked = retrieval.task_level(index, index.embedder(), shots, ctx.config.num_modules).results
    return [ctx.store.get(m.id) for m in ranked]


def _generate_merged(ctx, inputs, deltas: dict) -> list[str]:
    """Greedy answers of a copy of the base model with W + delta written into its weights."""
    import torch

    from lorahub_cli.generation import generate

    merged = copy.deepcopy(ctx.base.model)
    with torch.no_grad():
        for module, delta in deltas.items():
            merged.get_submodule(module).weight += delta.to(torch.float32)
    base = dataclasses.replace(ctx.base, model=merged, _fp32=None)
    return generate(base, inputs, max_new_tokens=ctx.config.max_new_tokens)


def test_single_best_is_the_retrieved_module_with_the_lowest_loss_alone(t5_home, task_dir):
    import torch
    from peft import PeftModel

    from lorahub_cli.compose.adapters import load_adapter
    from lorahub_cli.models import encode

    home, base_dir = t5_home
    suite = tasks.load_task_dir(task_dir)
    ctx = Context(EvalConfig(base_model=str(base_dir), num_modules=3, max_new_tokens=4, dtype="float32"), Store(home))
    shots, inputs = suite.tasks["addition"][:5], [e.input for e in suite.tasks["addition"][5:10]]
    answer = methods_module.single_best(ctx, shots, inputs, 1)
    records = _retrieved(ctx, shots)
    # Each module's loss on its own, through PEFT (not the bank): Hugging Face's mean over all target tokens.
    batch = encode(ctx.base, shots)
    losses = {}
    for record in records:
        model = PeftModel.from_pretrained(copy.deepcopy(ctx.base.model), str(record.path)).eval()
        with torch.no_grad():
            losses[record.id] = float(model(**batch.inputs, labels=batch.labels).loss)
    assert answer.detail["losses"] == pytest.approx(losses, abs=1e-4)
    best = min(losses, key=losses.get)
    assert answer.detail["chosen"] == best and answer.detail["evaluations"] == 3
    assert len(set(losses.values())) == 3, "the modules must differ for the argmin to mean anything"
    adapter = load_adapter(ctx.store.get(best).path)
    assert answer.predictions == _generate_merged(ctx, inputs, {m: adapter.delta(m) for m in adapter.modules})


def test_uniform_is_the_elementwise_formula_at_one_over_n(t5_home, task_dir):
    import torch

    from lorahub_cli.compose.adapters import load_adapter

    home, base_dir = t5_home
    suite = tasks.load_task_dir(task_dir)
    ctx = Context(EvalConfig(base_model=str(base_dir), num_modules=3, max_new_tokens=4, dtype="float32"), Store(home))
    shots, inputs = suite.tasks["capitals"][:5], [e.input for e in suite.tasks["capitals"][5:10]]
    answer = methods_module.RUNNERS["uniform"](ctx, shots, inputs, 1)
    records = _retrieved(ctx, shots)
    assert answer.detail["modules"] == {r.id: pytest.approx(1 / 3, abs=1e-6) for r in records}
    assert answer.detail["evaluations"] == 0  # no search
    # The formula by hand: A = sum_i A_i / N, B = sum_i B_i / N, delta = s * B @ A.
    adapters = [load_adapter(r.path) for r in records]
    deltas = {}
    for module in adapters[0].modules:
        A = torch.stack([a.modules[module][0].double() for a in adapters]).mean(0)
        B = torch.stack([a.modules[module][1].double() for a in adapters]).mean(0)
        deltas[module] = adapters[0].scaling * (B @ A)
    assert answer.predictions == _generate_merged(ctx, inputs, deltas)


def test_the_report_has_a_most_frequent_answer_line(tmp_path):
    examples = {"t": [Example(str(i), "yes" if i < 7 else "No.") for i in range(10)]}
    cells = [
        {**cell("t", 1, "zero-shot", 10.0), "test": [0, 1, 7, 8, 9]},  # yes, yes, no, no, no: 60%
        {**cell("t", 2, "zero-shot", 20.0), "test": [0, 1, 2, 3, 9]},  # four yes: 80%
    ]
    summary = report.write_report(tmp_path, "T", {}, cells, [], examples)
    assert summary["most_frequent"]["tasks"]["t"] == {"mean": 70.0, "std": pytest.approx(14.14, abs=0.01), "n": 2}
    text = (tmp_path / "report.md").read_text()
    assert "| task | zero-shot | most frequent |" in text and "| t | 15.0 ± 7.1 | 70.0 ± 14.1 |" in text
    assert "Most frequent answer: always giving each test set's most frequent target scores 70.0 ± 14.1" in text


def test_a_killed_run_resumes_from_the_finished_cells(t5_home, task_dir, tmp_path, monkeypatch):
    _, base_dir = t5_home
    suite = tasks.load_task_dir(task_dir)
    config = EvalConfig(base_model=str(base_dir), limit=3, max_new_tokens=3, dtype="float32")
    calls, kill = [], [True]
    real = methods_module.RUNNERS["zero-shot"]

    def counted(ctx, shots, inputs, seed):
        calls.append(seed)
        if len(calls) == 3 and kill:
            kill.clear()
            raise KeyboardInterrupt  # killed in the middle of the third cell
        return real(ctx, shots, inputs, seed)

    monkeypatch.setitem(methods_module.RUNNERS, "zero-shot", counted)
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        run_grid(suite, ["zero-shot", "icl"], [1, 2], Context(config), out)
    finished = sorted(p.relative_to(out).as_posix() for p in out.glob("cells/**/*.json"))
    # Killed in capitals' first cell: both of addition's seeds are done, nothing of capitals, nothing partial.
    assert finished == [
        "cells/addition/seed-1/icl.json",
        "cells/addition/seed-1/zero-shot.json",
        "cells/addition/seed-2/icl.json",
        "cells/addition/seed-2/zero-shot.json",
    ]
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()) == finished + ["run.json"]
    calls.clear()
    cells = run_grid(suite, ["zero-shot", "icl"], [1, 2], Context(config), out)
    assert len(cells) == 8 and len(calls) == 2  # only the missing zero-shot cells ran
    fresh = run_grid(suite, ["zero-shot", "icl"], [1, 2], Context(config), tmp_path / "fresh")
    assert [c["predictions"] for c in cells] == [c["predictions"] for c in fresh]
    with pytest.raises(InputError, match="other settings \\(limit\\)"):
        run_grid(suite, ["zero-shot"], [1], Context(dataclasses.replace(config, limit=4)), out)


# --- the report ------------------------------------------------------------------------------------


def cell(task, seed, method, em):
    return {
        "task": task,
        "seed": seed,
        "method": method,
        "exact_match": em,
        "option_letter": em,
        "seconds": 1.0,
        "detail": {},
    }


def test_summary_statistics_by_hand():
    cells = [
        cell("t1", 1, "a", 50.0),
        cell("t1", 2, "a", 70.0),
        cell("t1", 1, "b", 40.0),
        cell("t1", 2, "b", 40.0),
        cell("t2", 1, "a", 5.0),
        cell("t2", 2, "a", 0.0),
        cell("t2", 1, "b", 9.0),
        cell("t2", 2, "b", 1.0),
    ]
    summary = report.summarize(cells)
    assert summary["tasks"]["t1"]["a"] == {"mean": 60.0, "std": 14.14, "n": 2}
    assert summary["average"]["a"]["mean"] == pytest.approx((60 + 2.5) / 2)
    # Per-seed averages of a: (50 + 5) / 2 = 27.5 and (70 + 0) / 2 = 35: std 5.3.
    assert summary["average"]["a"]["std"] == 5.3
    assert summary["excluded_from_average_3"] == ["t2"] and summary["average_3"]["b"]["mean"] == 40.0
    assert report.win_loss(summary)["a vs b"] == {"win": 1, "loss": 1, "tie": 0}


def test_eval_bbh_reports_the_malformed_targets(cli, t5_home, tmp_path):
    _, base_dir = t5_home
    out = tmp_path / "bbh"
    result = cli(
        "eval",
        "bbh",
        "--base-model",
        base_dir,
        "--tasks",
        "navigate,ruin_names",
        "--methods",
        "zero-shot,icl",
        "--seeds",
        "3",
        "--limit",
        "2",
        "--max-new-tokens",
        "2",
        "--out",
        out,
    )
    assert result.code == 0, result.stderr
    text = (out / "report.md").read_text()
    assert "| navigate |" in text and "| ruin_names |" in text and "ruin_names #99" in text
    cell = json.loads(cell_path(out, "navigate", 3, "icl").read_text())
    shots, test = tasks.split(tasks.load_bbh().tasks["navigate"], 3, 5, 2)
    assert (cell["shots"], cell["test"]) == (shots, test)


def test_composing_methods_need_enough_adapters_before_any_model_loads(cli, tmp_path):
    result = cli(
        "eval",
        "tasks",
        EXAMPLES / "shots",
        "--base-model",
        "no/such-model",
        "--methods",
        "batchcomp",
        "--out",
        tmp_path / "run",
    )
    assert result.code == 2 and "the registry has 0 adapters for base model 'no/such-model'" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
