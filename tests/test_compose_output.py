"""What `lorahub compose` prints and returns: the modules it chose with their weights (largest |w| first), the
few-shot loss before (the base model alone) and after, how the search ran, the next commands; and tables at 80
columns that never break an id."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import SHOTS
from tiny_models import one_thread  # noqa: F401  (fixture)
from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

pytestmark = pytest.mark.usefixtures("one_thread")


def compose(cli, out, *extra):
    return cli("compose", "--shots", SHOTS, "-n", "3", "--budget", "6", "--dtype", "float32", "--out", out, *extra)


def base_loss(base_dir, shots) -> float:
    """The base model's mean target-token cross-entropy over the shots, computed by transformers alone."""
    model = AutoModelForSeq2SeqLM.from_pretrained(base_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    total, tokens = 0.0, 0
    for line in shots.read_text().splitlines():
        row = json.loads(line)
        labels = tokenizer([row["target"]], return_tensors="pt").input_ids
        with torch.no_grad():
            loss = model(**tokenizer([row["input"]], return_tensors="pt"), labels=labels).loss
        total, tokens = total + float(loss) * labels.shape[1], tokens + labels.shape[1]
    return total / tokens


def test_compose_prints_the_modules_and_weights_it_chose(cli, t5_home, tmp_path, monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    home, base_dir = t5_home
    out = tmp_path / "my-lora"
    result = compose(cli, out)
    assert result.code == 0, result.stderr
    recipe = json.loads((out / "lorahub_recipe.json").read_text())
    modules = sorted(recipe["modules"], key=lambda m: -abs(m["weight"]))
    rows = [line.split() for line in result.stdout.splitlines() if line.strip()[:1] in "+-"]
    assert [(r[0], r[1]) for r in rows] == [(f"{m['weight']:+.3f}", m["id"]) for m in modules]
    assert "3 modules, largest |weight| first" in result.stdout
    loss_line = next(line for line in result.stderr.splitlines() if line.startswith("Few-shot loss"))
    assert f"base model {base_loss(base_dir, SHOTS):.4f}" in loss_line and f"composed {recipe['loss']:.4f}" in loss_line
    assert f"ran {recipe['search']['evaluations']} of 6 evaluations" in result.stderr
    assert f"lorahub generate --adapter {out} --inputs requests.jsonl" in result.stderr
    assert f"lorahub push {out} --repo YOU/NAME" in result.stderr


def test_compose_json_carries_the_same(cli, t5_home, tmp_path):
    home, base_dir = t5_home
    out = tmp_path / "my-lora"
    result = compose(cli, out, "--json")
    assert result.code == 0, result.stderr
    summary = json.loads(result.stdout)
    recipe = json.loads((out / "lorahub_recipe.json").read_text())
    assert [m["id"] for m in summary["modules"]] == [
        m["id"] for m in sorted(recipe["modules"], key=lambda m: -abs(m["weight"]))
    ]
    assert all(m["score"] == recipe["selection"]["scores"][m["id"]] for m in summary["modules"])
    assert summary["loss"] == recipe["loss"] and summary["shots"] == 5
    assert summary["base_loss"] == pytest.approx(base_loss(base_dir, SHOTS), abs=1e-5)
    search = summary["search"]
    assert search["evaluations"] == recipe["search"]["evaluations"] and search["budget"] == 6
    # Why the search stopped, where the recipe records it (None where it does not).
    assert search["stop"] == recipe["search"].get("stop")
    assert summary["next"][0] == f"lorahub generate --adapter {out} --inputs requests.jsonl"


def test_the_stopping_reason_is_printed_when_the_recipe_has_one():
    from lorahub_cli.cli.compose import _search_line

    search = {"optimizer": "lbfgs", "engine": "L-BFGS-B", "evaluations": 12, "budget": 40, "seconds": 1.0}
    assert _search_line([search | {"stop": None}]) == "The search (L-BFGS-B) ran 12 of 40 evaluations."
    assert (
        _search_line([search | {"stop": "converged"}])
        == "The search (L-BFGS-B) ran 12 of 40 evaluations: it converged."
    )
    two = _search_line([search | {"stop": "stalled"}, search | {"stop": "budget"}])
    assert two.endswith("ran 24 of 80 evaluations over 2 searches: its budget was spent; it stopped improving.")


def test_fixed_weights_say_there_was_no_search(cli, t5_home, tmp_path):
    result = cli(
        "compose", "--shots", SHOTS, "--modules", "capitals,addition", "--weights", "capitals=0.5,addition=-1",
        "--out", tmp_path / "fixed",
    )  # fmt: skip
    assert result.code == 0, result.stderr
    assert [line.split()[:2] for line in result.stdout.splitlines() if line.strip()[:1] in "+-"] == [
        ["-1.000", "addition"],
        ["+0.500", "capitals"],
    ]
    assert "No search: the weights were given (--weights)." in result.stderr


def test_instance_level_prints_each_shots_composition(cli, t5_home, tmp_path):
    out = tmp_path / "per-example"
    result = compose(cli, out, "--level", "instance")
    assert result.code == 0, result.stderr
    recipe = json.loads((out / "lorahub_recipe.json").read_text())
    for entry in recipe["compositions"]:
        assert f"shot {entry['shot']}: few-shot loss {entry['loss']:.4f}" in result.stdout
    assert "Few-shot loss of the base model alone on the 5 examples" in result.stderr
    assert f"lorahub generate --composition {out} --inputs requests.jsonl" in result.stderr


LONG_ID = "lorahub/flan_t5_large-wiki_qa_Topic_Prediction_Question_and_Answer_Pair"


def test_tables_at_80_columns_never_break_an_id(cli, t5_home, tmp_path, monkeypatch):
    """The id column keeps each id whole on one line; the other columns give way (long paths are shortened)."""
    from rich.console import Console

    from lorahub_cli.cli._output import ranking_table, weights_table

    console = Console(width=80, record=True, color_system=None)
    ids = [LONG_ID, "lorahub/flan_t5_large-quarel_choose_between", "capitals"]
    console.print(ranking_table("task-level retrieval", [{"id": i, "score": 0.5} for i in ids]))
    console.print(weights_table("3 modules", [{"id": i, "weight": -0.25, "score": 0.5} for i in ids]))
    text = console.export_text()
    assert all(len(line) <= 80 for line in text.splitlines())
    for i in ids:
        assert text.count(i) == 2, i
    monkeypatch.setenv("COLUMNS", "80")
    result = cli("registry", "list")
    assert result.code == 0, result.stderr
    lines = result.stdout.splitlines()
    assert all(len(line) <= 80 for line in lines), max(lines, key=len)
    for adapter in ("capitals", "addition", "sentiment", "antonyms"):
        assert sum(line.split()[:1] == [adapter] for line in lines) == 1, adapter
