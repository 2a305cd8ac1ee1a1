"""The demo library: its task generators, a reduced build end to end, the runtime API, integrity and mirroring."""

from __future__ import annotations

import json
import shutil

import pytest
from tiny_models import one_thread  # noqa: F401  (fixture)

from lorahub_cli.demo import library
from lorahub_cli.demo.build import FULL, REDUCED, build
from lorahub_cli.demo.world import GENERAL, HELD_OUT, TASKS, UPSTREAM, few_shot, generate
from lorahub_cli.errors import IntegrityError
from lorahub_cli.io import Example, sha256_file
from lorahub_cli.registry import Store

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def reduced_build(tmp_path_factory):
    """The CI build, through the build command itself so that the command cannot rot either."""
    from typer.testing import CliRunner

    from lorahub_cli.demo.__main__ import app

    out = tmp_path_factory.mktemp("demo-build") / "demo"
    result = CliRunner().invoke(app, ["build", "--reduced", "--out", str(out), "--seed", "0"])
    assert result.exit_code == 0, result.output
    return out, library.manifest(out)


def test_world_has_a_general_mixture_twelve_skills_and_ten_heldout_tasks_of_four_types():
    assert len(GENERAL) == 7 and len(UPSTREAM) == 12 and len(HELD_OUT) == 10
    assert len(TASKS) == len(GENERAL) + len(UPSTREAM) + len(HELD_OUT)
    types = [t.type for t in HELD_OUT]
    assert types.count("wording") >= 3 and types.count("format") >= 2 and types.count("mixed") >= 2
    assert types.count("chained") <= 2  # the documented limitation, kept small


def test_most_heldout_tasks_have_open_answers():
    from collections import Counter

    for task in HELD_OUT:
        rows = generate(task.name, 100, seed=0, split="heldout")
        assert Counter(r["target"] for r in rows).most_common(1)[0][1] <= 15, task.name


def test_no_training_run_sees_a_heldout_wording_and_the_base_sees_no_skill():
    general = {t for task in GENERAL for t in task.templates}
    upstream = {t for task in UPSTREAM for t in task.templates}
    heldout = {t for task in HELD_OUT for t in task.templates} | {
        t for task in HELD_OUT for part in task.parts for t in part.templates
    }
    assert not general & upstream and not heldout & (general | upstream)
    # The base's mixture holds no row of a skill: no upstream target comes out of a general template.
    mixture = {r["input"] for task in GENERAL for r in generate(task.name, 300, seed=0)}
    assert not mixture & {r["input"] for task in UPSTREAM for r in generate(task.name, 300, seed=0)}


def test_mixed_tasks_draw_every_skill_under_one_instruction():
    for task in (t for t in HELD_OUT if t.type == "mixed"):
        assert [p.name for p in task.parts] == list(task.skills)
        assert len({p.templates[0].split("{")[0] for p in task.parts}) == 1, "one instruction"
        rows = generate(task.name, 300, seed=0, split="heldout")
        with_digits = sum(any(c.isdigit() for c in r["input"]) for r in rows)
        assert 0 < with_digits < len(rows)  # words and numbers: the input's surface tells the skills apart


def test_few_shot_prompts_are_the_evaluations_icl_format():
    from lorahub_cli.demo.world import icl_prompt
    from lorahub_cli.eval.methods import icl_prompt as eval_prompt

    solved = [("Echo: cloud", "cloud"), ("Echo: 12", "12")]
    assert icl_prompt(solved, "Echo: moon") == eval_prompt([Example(q, a) for q, a in solved], "Echo: moon")
    rows = few_shot(["copy", "stars"], 50, seed=0)
    assert all(r["input"].endswith("\nAnswer:") and 1 <= r["input"].count("\nAnswer: ") <= 5 for r in rows)


@pytest.mark.parametrize("name", sorted(TASKS))
def test_generators_are_deterministic_short_and_varied(name):
    rows = generate(name, 200, seed=0)
    assert rows == generate(name, 200, seed=0)
    assert rows != generate(name, 200, seed=1)
    assert rows != generate(name, 200, seed=0, split="eval")
    assert all(r["target"].strip() and r["input"].strip() for r in rows)
    assert max(len(r["input"].encode()) for r in rows) <= 80
    assert max(len(r["target"].encode()) for r in rows) <= 20
    assert len({r["input"] for r in rows}) > 1


def test_every_heldout_skill_names_an_upstream_task():
    upstream = {t.name for t in UPSTREAM}
    for task in HELD_OUT:
        assert task.skills and set(task.skills) <= upstream, task.name
        assert task.new


def test_reduced_build_writes_a_library_that_verifies(reduced_build):
    out, meta = reduced_build
    assert library.verify(out) == meta
    assert meta["build"]["command"] == "python -m lorahub_cli.demo build --reduced --seed 0 --threads 1"
    assert not list(out.parent.glob(".demo.*")), "the temporary build folder was left behind"
    assert [t["name"] for t in library.upstream_tasks(out)] == list(REDUCED.upstream)
    assert [t["name"] for t in library.heldout_tasks(out)] == list(REDUCED.heldout)
    assert set(meta["metrics"]["upstream"]) == set(REDUCED.upstream)
    assert set(meta["metrics"]["general"]) == set(REDUCED.general) | {"few_shot"}
    assert len(library.heldout_examples(REDUCED.heldout[0], out)) == REDUCED.heldout_examples
    config = json.loads((out / "adapters" / REDUCED.upstream[0] / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == library.BASE_MODEL
    assert (config["r"], sorted(config["target_modules"])) == (REDUCED.lora_r, ["q", "v"])


def test_the_runtime_api_describes_tasks_skills_and_examples(reduced_build):
    out, meta = reduced_build
    for task in library.upstream_tasks(out):
        assert task["kind"] == "upstream" and task["description"] and len(task["templates"]) == 4
    for task in library.heldout_tasks(out):
        assert task["type"] in ("wording", "format", "mixed", "chained") and task["new"]
        assert set(task["skills"]) <= set(REDUCED.upstream)
        examples = library.heldout_examples(task["name"], out)
        assert examples == [Example(r["input"], r["target"]) for r in generate(task["name"], 12, 0, "heldout")]
    with pytest.raises(Exception, match="not a held-out task"):
        library.heldout_examples("reverse_word", out)


def _median_task(runs: dict) -> str:
    ranked = sorted(runs, key=lambda n: (runs[n]["gain"], n))
    return ranked[(len(ranked) - 1) // 2]


def test_the_build_runs_the_demo_on_every_heldout_task_and_picks_the_median_gain(reduced_build):
    out, meta = reduced_build
    runs = meta["demo"]["tasks"]
    assert list(runs) == list(REDUCED.heldout) and meta["demo"]["budget"] == REDUCED.demo_budget
    for run in runs.values():
        assert run["gain"] == pytest.approx(run["composed"] - max(run["zero-shot"], run["most_frequent"]), abs=0.11)
    assert library.default_task(out) == meta["demo"]["default_task"] == _median_task(runs)


def test_a_rebuild_with_the_same_seed_gives_the_same_files(reduced_build, tmp_path):
    out, meta = reduced_build
    assert build(tmp_path / "demo", reduced=True, seed=0)["files"] == meta["files"]


def test_an_adapters_config_lists_its_target_modules_in_one_order(tmp_path):
    """PEFT keeps target_modules as a set, so its order in adapter_config.json followed Python's per-process
    string hashing: two builds with the same seed wrote different bytes (build 2 and its rebuild)."""
    from peft import LoraConfig, get_peft_model

    from lorahub_cli.demo.build import _save_adapter
    from lorahub_cli.demo.training import tiny_t5

    model = get_peft_model(tiny_t5(REDUCED.shape, 0), LoraConfig(r=2, target_modules=["q", "v"]))
    model.peft_config["default"].target_modules = ["v", "q"]  # the order a set may iterate in
    _save_adapter(model, tmp_path / "adapter")
    text = (tmp_path / "adapter" / "adapter_config.json").read_text()
    assert json.loads(text)["target_modules"] == ["q", "v"]
    assert text == json.dumps(json.loads(text), indent=2, sort_keys=True)  # PEFT's own layout, kept


def test_reduced_build_loads_with_transformers(reduced_build):
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    out, _ = reduced_build
    model = AutoModelForSeq2SeqLM.from_pretrained(library.base_model_path(out))
    tokenizer = AutoTokenizer.from_pretrained(library.base_model_path(out))
    assert model.config.d_model == REDUCED.shape["d_model"]
    assert tokenizer("ab").input_ids == [ord("a") + 3, ord("b") + 3, 1]


def test_a_build_replaces_the_library_whole_or_not_at_all(tmp_path, monkeypatch):
    from lorahub_cli.demo import build as build_module

    out = tmp_path / "demo"
    out.mkdir()
    (out / "old.txt").write_text("the previous library")

    def failing(root, *args):
        (root / "half.txt").write_text("half written")
        raise RuntimeError("killed mid-build")

    monkeypatch.setattr(build_module, "_build_into", failing)
    with pytest.raises(RuntimeError):
        build(out, reduced=True)
    assert [p.name for p in tmp_path.iterdir()] == ["demo"] and [p.name for p in out.iterdir()] == ["old.txt"]

    def complete(root, *args):
        (root / "new.txt").write_text("the new library")
        return {"files": {"new.txt": {"sha256": sha256_file(root / "new.txt"), "size": 15}}}

    monkeypatch.setattr(build_module, "_build_into", complete)
    build(out, reduced=True)
    assert [p.name for p in tmp_path.iterdir()] == ["demo"]
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "new.txt"]
    library.verify(out)


def test_shipped_demo_library_verifies():
    meta = library.verify()
    assert meta["total_size"] <= 40 * 1000 * 1000
    assert [t["name"] for t in library.upstream_tasks()] == [t.name for t in UPSTREAM]
    assert [t["name"] for t in library.heldout_tasks()] == [t.name for t in HELD_OUT]
    assert library.base_model_path().is_dir()
    assert library.default_task() == _median_task(meta["demo"]["tasks"])


def test_verify_catches_a_flipped_byte_and_a_missing_file(reduced_build, tmp_path):
    out, _ = reduced_build
    copy = tmp_path / "demo"
    shutil.copytree(out, copy)
    weights = copy / "base" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01
    weights.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="base/model.safetensors"):
        library.verify(copy)
    weights.unlink()
    with pytest.raises(IntegrityError, match="missing"):
        library.verify(copy)


def test_mirror_registers_every_upstream_adapter_with_its_card(lorahub_home):
    store = Store(lorahub_home)
    ticks = []
    results = library.mirror(store, progress=lambda: ticks.append(1))
    assert {r.status for r in results} == {"added"} and len(ticks) == len(UPSTREAM)
    records = store.list(base_model=library.BASE_MODEL)
    assert [r.id for r in records] == sorted(library.adapter_id(t.name) for t in UPSTREAM)
    assert all(r.has_card and r.r == FULL.lora_r for r in records)
    assert {r.status for r in library.mirror(store)} == {"skipped"}
