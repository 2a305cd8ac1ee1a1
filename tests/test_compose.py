"""`lorahub compose` end to end on tiny random models: search, export, reload in PEFT, rebuild."""

import json
import shutil

import pytest
import torch
import yaml
from conftest import EXAMPLES, SHOTS, build_library
from peft import PeftModel
from safetensors.torch import load_file
from tiny_models import make_lora_adapter, save_tiny_base
from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

from lorahub_cli.compose.pipeline import ComposeOptions
from lorahub_cli.compose.search import OPTIMIZERS, SearchConfig
from lorahub_cli.errors import InputError
from lorahub_cli.io import read_examples
from lorahub_cli.models import encode, load_base_model, token_losses
from lorahub_cli.registry import Store
from lorahub_cli.registry.mirror import add_local

# Every test runs as if on a CPU with fast bf16 and as if on one without: the
# numbers a user reads must be the fp32 ones on both. The search itself runs in bf16 only when asked
# (--search-precision bf16: tests/test_precision.py).
pytestmark = pytest.mark.usefixtures("cpu_kind")


def reference_loss(model, base_dir, shots):
    """The few-shot loss as transformers computes it, one unpadded example at a time, then the mean over all
    target tokens: independent of lorahub's batching, padding and position handling."""
    base = load_base_model(str(base_dir), dtype="float32", device="cpu")
    total = tokens = 0.0
    for shot in shots:
        batch = encode(base, [shot])
        inputs = {k: v for k, v in batch.inputs.items() if k != "decoder_input_ids"}
        with torch.no_grad():
            loss = float(model(**inputs, labels=batch.labels).loss)
        n = int((batch.labels != -100).sum())
        total, tokens = total + loss * n, tokens + n
    return total / tokens


def test_task_level_compose_exports_a_peft_adapter(cli, t5_home, tmp_path):
    home, base_dir = t5_home
    out = tmp_path / "composed"
    result = cli(
        "compose", "--shots", SHOTS, "--out", out, "-n", "3", "--budget", "6", "--optimizer", "ngopt", "--json"
    )
    assert result.code == 0, result.stderr
    summary = json.loads(result.stdout)
    keys = {"out", "weights", "loss", "modules", "search", "evaluations", "seconds", "shots", "base_loss", "next", "by"}
    assert set(summary) == keys and summary["evaluations"] == 6
    assert summary["by"] == "data", "every adapter has a data card, so auto ranks by data cards alone"
    assert list(summary["weights"])[0] == "capitals", "auto selection ranks the shots' own task first"
    recipe = json.loads((out / "lorahub_recipe.json").read_text())
    assert recipe["formula"] == "elementwise" and recipe["selection"]["method"] == "auto"
    assert recipe["search"]["optimizer"] == "ngopt" and "Cobyla" in recipe["search"]["engine"]
    assert recipe["search"]["precision_used"] == "fp32", "auto searches in fp32 whatever the CPU"
    assert recipe["dtype"] == "float32"
    assert len(recipe["search"]["curve"]) == 6 and recipe["search"]["curve"][0]["loss"] > 0
    assert recipe["shots"]["count"] == 5 and set(recipe["versions"]) >= {"lorahub", "torch", "transformers", "peft"}
    assert all(len(m["sha256"]) == 64 for m in recipe["modules"])
    front = yaml.safe_load((out / "README.md").read_text().split("---")[1])
    assert front["library_name"] == "peft" and front["base_model"] == str(base_dir) and "lorahub" in front["tags"]
    # The folder reloads in PEFT, and its loss is the one reported (computed here by transformers itself).
    model = PeftModel.from_pretrained(AutoModelForSeq2SeqLM.from_pretrained(base_dir), out).eval()
    assert reference_loss(model, base_dir, read_examples(SHOTS)) == pytest.approx(summary["loss"], rel=1e-5)
    # The objective is the composed adapter's fp32 loss plus the L1 term; in fp32 it is the search's best objective.
    w = torch.tensor(list(summary["weights"].values()))
    assert recipe["objective"] == pytest.approx(summary["loss"] + 0.05 * float(w.abs().mean()), rel=1e-6)
    assert recipe["search"]["objective"] == pytest.approx(recipe["objective"], rel=1e-5)
    # NGOpt's (COBYLA's) first evaluation is w = 0, the base model: the search can only improve on it.
    assert recipe["search"]["objective"] <= recipe["search"]["curve"][0]["objective"]


def test_rebuild_from_recipe_is_bit_for_bit(cli, t5_home, tmp_path):
    out = tmp_path / "a"
    assert cli("compose", "--shots", SHOTS, "--out", out, "-n", "4", "--budget", "5", "--optimizer", "random").code == 0
    rebuilt = tmp_path / "b"
    result = cli("compose", "--from-recipe", out / "lorahub_recipe.json", "--out", rebuilt, "--json")
    assert result.code == 0, result.stderr
    for name in ("adapter_model.safetensors", "adapter_config.json", "lorahub_recipe.json", "README.md"):
        assert (out / name).read_bytes() == (rebuilt / name).read_bytes(), name


def test_fixed_weights_one_hot_and_zero(cli, t5_home, tmp_path):
    home, base_dir = t5_home
    store = Store(home)
    one_hot = tmp_path / "one-hot"
    result = cli(
        "compose",
        "--shots",
        SHOTS,
        "--modules",
        "capitals,addition,sentiment",
        "--weights",
        "capitals=0,addition=1,sentiment=0",
        "--out",
        one_hot,
        "--json",
    )
    assert result.code == 0, result.stderr
    assert json.loads(result.stdout)["evaluations"] == 0
    original = load_file(store.get("addition").path / "adapter_model.safetensors")
    composed = load_file(one_hot / "adapter_model.safetensors")
    assert original.keys() == composed.keys() and all(torch.equal(original[k], composed[k]) for k in original)
    zero = tmp_path / "zero"
    assert (
        cli(
            "compose",
            "--shots",
            SHOTS,
            "--modules",
            "capitals,addition",
            "--weights",
            "capitals=0,addition=0",
            "--out",
            zero,
        ).code
        == 0
    )
    base = AutoModelForSeq2SeqLM.from_pretrained(base_dir).eval()
    batch = encode(load_base_model(str(base_dir), dtype="float32"), read_examples(SHOTS))
    with torch.no_grad():
        expected = base(**batch.inputs).logits
        got = (
            PeftModel.from_pretrained(AutoModelForSeq2SeqLM.from_pretrained(base_dir), zero)
            .eval()(**batch.inputs)
            .logits
        )
    assert torch.equal(expected, got)


@pytest.mark.parametrize("optimizer", sorted(OPTIMIZERS))
def test_every_optimizer_runs_its_budget(cli, t5_home, tmp_path, optimizer):
    result = cli(
        "compose",
        "--shots",
        SHOTS,
        "--out",
        tmp_path / optimizer,
        "-n",
        "3",
        "--budget",
        "6",
        "--optimizer",
        optimizer,
        "--population",
        "3",
        "--modules",
        "random",
        "--seed",
        "1",
        "--json",
    )
    assert result.code == 0, result.stderr
    summary = json.loads(result.stdout)
    recipe = json.loads((tmp_path / optimizer / "lorahub_recipe.json").read_text())
    assert summary["evaluations"] == 6 and recipe["search"]["optimizer"] == optimizer
    assert recipe["selection"] == {"method": "random", "seed": 1, "n": 3}
    assert all(-1.5 <= w <= 1.5 for w in summary["weights"].values())
    if optimizer == "adam":
        # Elementwise has a zero gradient at w = 0; Adam starts at 1/N and must have moved from there.
        assert summary["weights"] != pytest.approx([1 / 3] * 3, abs=1e-3)
        assert recipe["search"]["curve"][-1]["loss"] < recipe["search"]["curve"][0]["loss"]


def test_random_selection_is_seeded(cli, t5_home, tmp_path):
    picks = [
        list(
            json.loads(
                cli(
                    "compose",
                    "--shots",
                    SHOTS,
                    "--out",
                    tmp_path / str(i),
                    "-n",
                    "2",
                    "--budget",
                    "1",
                    "--modules",
                    "random",
                    "--seed",
                    "7",
                    "--json",
                ).stdout
            )["weights"]
        )
        for i in range(2)
    ]
    assert picks[0] == picks[1]


def test_instance_level_writes_compositions_and_router(cli, t5_home, tmp_path):
    out = tmp_path / "instance"
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text(
        "".join(
            (EXAMPLES / "shots" / f"{t}.jsonl").read_text().splitlines(True)[0]
            for t in ("capitals", "addition", "sentiment")
        )
    )
    result = cli(
        "compose",
        "--shots",
        mixed,
        "--level",
        "instance",
        "-n",
        "2",
        "--budget",
        "3",
        "--warm-start",
        "--out",
        out,
        "--json",
    )
    assert result.code == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["level"] == "instance" and summary["evaluations"] == 3 * 4, "a warm-start search plus one per shot"
    assert [list(c["weights"])[0] for c in summary["compositions"]] == ["capitals", "addition", "sentiment"]
    recipe = json.loads((out / "lorahub_recipe.json").read_text())
    assert recipe["router"]["shots"] == [e.input for e in read_examples(mixed)]
    assert load_file(out / "router.safetensors")["shots"].shape == (3, 384)
    base_dir = t5_home[1]
    for entry in recipe["compositions"]:
        folder = out / entry["folder"]
        model = PeftModel.from_pretrained(AutoModelForSeq2SeqLM.from_pretrained(base_dir), folder).eval()
        assert reference_loss(model, base_dir, read_examples(mixed)) == pytest.approx(entry["loss"], rel=1e-5)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_decoder_only_models(cli, tmp_path, lorahub_home, kind):
    home, base_dir = build_library(tmp_path, kind, with_cards=False)
    shutil.rmtree(lorahub_home, ignore_errors=True)
    shutil.copytree(home, lorahub_home)
    out = tmp_path / "out"
    result = cli(
        "compose", "--shots", SHOTS, "--modules", "capitals,addition,sentiment", "--budget", "5", "--out", out, "--json"
    )
    assert result.code == 0, result.stderr
    summary = json.loads(result.stdout)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), out).eval()
    assert reference_loss(model, base_dir, read_examples(SHOTS)) == pytest.approx(summary["loss"], rel=1e-5)


def test_loss_ignores_padding_and_batch_size(t5_home):
    """The same examples give the same loss alone or padded inside a larger batch."""
    base = load_base_model(str(t5_home[1]), dtype="float32")
    shots = read_examples(EXAMPLES / "shots" / "word_sorting.jsonl")
    together = token_losses(base, encode(base, shots))
    alone = torch.cat([token_losses(base, encode(base, [s])) for s in shots])
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-5)


def test_errors_before_any_work(cli, t5_home, tmp_path):
    existing = tmp_path / "exists"
    existing.mkdir()
    result = cli("compose", "--shots", SHOTS, "--out", existing)
    assert result.code == 2 and f"'{existing}' already exists." in result.stderr and "--overwrite" in result.stderr
    bad = cli("compose", "--shots", SHOTS, "--out", tmp_path / "x", "--weights", "capitals=abc")
    assert "--weights item 'capitals=abc' is not ID=NUMBER" in bad.stderr
    unknown = cli("compose", "--shots", SHOTS, "--out", tmp_path / "x", "--optimizer", "sgd")
    assert (
        unknown.code == 2
        and "optimizer 'sgd' is not known. Choose one of: subspace, ngopt, cma, de, random, adam, lbfgs."
        in unknown.stderr
    )
    # A rank-8 adapter cannot join rank-4 ones in LoraHub's elementwise formula; linear takes it.
    home, base_dir = t5_home
    store = Store(home)
    model = AutoModelForSeq2SeqLM.from_pretrained(base_dir)
    add_local(store, make_lora_adapter(model, tmp_path / "wide", r=8, alpha=16, seed=9, base_model_name=str(base_dir)))
    mixed = cli("compose", "--shots", SHOTS, "--modules", "capitals,wide", "--out", tmp_path / "m", "--budget", "2")
    assert mixed.code == 2 and "rank" in mixed.stderr
    assert (
        cli(
            "compose",
            "--shots",
            SHOTS,
            "--modules",
            "capitals,wide",
            "--formula",
            "linear",
            "--out",
            tmp_path / "m",
            "--budget",
            "2",
        ).code
        == 0
    )
    # An adapter for another base model is refused before any model is loaded.
    other = make_lora_adapter(model, tmp_path / "other", r=4, alpha=8, seed=3, base_model_name="someone/else")
    add_local(store, other)
    foreign = cli("compose", "--shots", SHOTS, "--modules", "capitals,other", "--out", tmp_path / "f")
    assert foreign.code == 2 and "someone/else" in foreign.stderr
    assert not (tmp_path / "f").exists() and not (tmp_path / "x").exists()


def test_compose_options_are_checked_once_when_made():
    """ComposeOptions normalises and checks itself (issue 17 §3): the layers below it trust it."""
    options = ComposeOptions(weights={"a": 0.5, "b": 0.5})
    assert options.modules == ["a", "b"], "fixed weights without --modules compose exactly the weighted modules"
    assert ComposeOptions(weights={"a": 1.0}, modules=["a", "b"]).modules == ["a", "b"]
    for bad, message in (
        (dict(modules="most"), "--modules 'most' is not auto, random or a list of ids"),
        (dict(num_modules=0), "-n 0 is too small"),
        (dict(formula="nope"), "unknown formula 'nope'"),
        (dict(formula="svd", formula_options={"svd_rank": -3}), "svd_rank must be a whole number of 1 or more, got -3"),
        (dict(search=SearchConfig(seed=2**70)), f"--seed {2**70} is out of range"),
        (dict(search=SearchConfig(seed=-1)), "--seed -1 is out of range"),
    ):
        with pytest.raises(InputError, match=message):
            ComposeOptions(**bad)


def test_interrupt_leaves_no_output(cli, t5_home, tmp_path, monkeypatch):
    from lorahub_cli.compose import search as search_module

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(search_module, "_nevergrad", interrupted)
    monkeypatch.setattr(search_module, "_lbfgs", interrupted)
    monkeypatch.setattr(search_module, "_subspace", interrupted)
    out = tmp_path / "never"
    result = cli("compose", "--shots", SHOTS, "--out", out, "-n", "2", "--budget", "3")
    assert result.code == 130 and not out.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".never")] == []


@pytest.mark.parametrize(
    "formula, extra",
    [
        ("linear", []),
        ("fusion", []),
        ("ties", ["--density", "0.5"]),
        ("dare_linear", ["--density", "1.0"]),
        ("svd", ["--svd-rank", "4"]),
    ],
)
def test_every_formula_from_the_cli(cli, t5_home, tmp_path, formula, extra):
    out = tmp_path / formula
    result = cli(
        "compose",
        "--shots",
        SHOTS,
        "--modules",
        "capitals,addition,sentiment",
        "--formula",
        formula,
        *extra,
        "--budget",
        "3",
        "--out",
        out,
        "--json",
    )
    assert result.code == 0, result.stderr
    summary = json.loads(result.stdout)
    recipe = json.loads((out / "lorahub_recipe.json").read_text())
    assert recipe["formula"] == formula
    searched = formula == "linear"
    assert summary["evaluations"] == (3 if searched else 0)
    if formula == "fusion":
        assert list(summary["weights"].values()) == pytest.approx([1 / 3] * 3)
    base_dir = t5_home[1]
    model = PeftModel.from_pretrained(AutoModelForSeq2SeqLM.from_pretrained(base_dir), out).eval()
    assert reference_loss(model, base_dir, read_examples(SHOTS)) == pytest.approx(summary["loss"], rel=1e-5)


# --- the subspace search and the stop rule (issue 19) --------------------------------------------------------------


def test_the_subspace_search_records_its_start_and_stop_and_rebuilds(cli, t5_home, tmp_path):
    home, base_dir = t5_home
    out = tmp_path / "subspace"
    subspace = ("--optimizer", "subspace")
    result = cli("compose", "--shots", SHOTS, "--out", out, "-n", "3", *subspace, "--json")
    assert result.code == 0, result.stderr
    recipe = json.loads((out / "lorahub_recipe.json").read_text())
    search = recipe["search"]
    assert search["optimizer"] == "subspace" and search["precision_used"] == "fp32"
    assert search["stop"] in ("converged", "stalled", "budget") and search["evaluations"] == len(search["curve"]) <= 40
    # The warm start: the curvature at w = 0, then the best point of the line along its most negative direction.
    start = search["start"]
    assert start["method"] == "curvature" and start["from"] == "line" and len(start["weights"]) == 3
    assert [p["phase"] for p in search["phases"]][:2] == ["curvature", "line"]
    assert search["curve"][0]["objective"] == pytest.approx(json.loads(result.stdout)["base_loss"], rel=1e-6)
    # The answer is the fp32 loss of the exported adapter, as PEFT loads it.
    model = PeftModel.from_pretrained(AutoModelForSeq2SeqLM.from_pretrained(base_dir), out).eval()
    assert reference_loss(model, base_dir, read_examples(SHOTS)) == pytest.approx(recipe["loss"], rel=1e-5)
    # The recipe with its start rebuilds bit for bit, and the same command under the same seed searches the same.
    rebuilt, again = tmp_path / "rebuilt", tmp_path / "again"
    assert cli("compose", "--from-recipe", out / "lorahub_recipe.json", "--out", rebuilt).code == 0
    assert (out / "adapter_model.safetensors").read_bytes() == (rebuilt / "adapter_model.safetensors").read_bytes()
    assert cli("compose", "--shots", SHOTS, "--out", again, "-n", "3", *subspace).code == 0
    repeated = json.loads((again / "lorahub_recipe.json").read_text())["search"]
    assert repeated["start"] == start and [c["objective"] for c in repeated["curve"]] == [
        c["objective"] for c in search["curve"]
    ]
    assert (out / "adapter_model.safetensors").read_bytes() == (again / "adapter_model.safetensors").read_bytes()


def test_a_flat_objective_stops_early_and_the_recipe_says_why(cli, tmp_path, lorahub_home):
    """Adapters with B = 0 change nothing: every weight vector has the base model's loss, the L1 term only adds."""
    from safetensors.torch import save_file

    base_dir = tmp_path / "base"
    model = save_tiny_base("t5", base_dir)
    store = Store(lorahub_home)
    for i in range(3):
        folder = make_lora_adapter(model, tmp_path / f"zero{i}", seed=i, base_model_name=str(base_dir))
        weights = load_file(folder / "adapter_model.safetensors")
        save_file(
            {k: torch.zeros_like(v) if "lora_B" in k else v for k, v in weights.items()},
            folder / "adapter_model.safetensors",
        )
        add_local(store, folder, name=f"zero{i}")
    out = tmp_path / "flat"
    result = cli(
        "compose",
        "--shots",
        SHOTS,
        "--out",
        out,
        "--modules",
        "random",
        "-n",
        "3",
        "--budget",
        "40",
        "--optimizer",
        "subspace",
    )
    assert result.code == 0, result.stderr
    recipe = json.loads((out / "lorahub_recipe.json").read_text())
    search = recipe["search"]
    assert search["stop"] in ("converged", "stalled") and search["evaluations"] == len(search["curve"]) < 40
    assert "stopped improving" in result.stderr or "converged" in result.stderr, result.stderr
    assert all(m["weight"] == 0.0 for m in recipe["modules"]), "w = 0 is the best point of a flat loss with L1"


def test_the_search_holds_the_modules_once(t5_home, monkeypatch):
    """The fp32 bank's buffers are the loaded adapters' factors: the loaded copies were freed into it."""
    from lorahub_cli.compose import pipeline

    home, base_dir = t5_home
    checked = []
    search = pipeline._Session.search

    def checking(self, *args, **kwargs):
        result = search(self, *args, **kwargs)
        for module in self.adapters[0].modules:
            layer = self.loss.bank.model.get_submodule(module)
            for adapter in self.adapters:
                A, B = adapter.modules[module]
                assert A.untyped_storage().data_ptr() == layer.lora_A.untyped_storage().data_ptr()
                assert B.untyped_storage().data_ptr() == layer.lora_B.untyped_storage().data_ptr()
                checked.append(module)
        return result

    monkeypatch.setattr(pipeline._Session, "search", checking)
    options = ComposeOptions(num_modules=3, model_path=str(base_dir), device="cpu", search=SearchConfig(budget=6))
    composition = pipeline.compose_task(Store(home), read_examples(SHOTS), {"path": str(SHOTS)}, options)
    assert checked and composition.recipe.search["evaluations"] <= 6


def test_one_bank_is_injected_per_compose_at_both_levels(cli, t5_home, tmp_path, monkeypatch):
    """Issue 17 item 9: the session injects its bank once, for the search, the answer's fp32 loss and the base
    model's loss, at task level and for every shot (and the warm start) at instance level."""
    from lorahub_cli.compose import pipeline

    injected = []

    class Counting(pipeline.LoraBank):
        def __init__(self, *args, **kwargs):
            injected.append(len(args[1]))
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(pipeline, "LoraBank", Counting)
    task = cli("compose", "--shots", SHOTS, "--out", tmp_path / "task", "-n", "3", "--budget", "8")
    assert task.code == 0, task.stderr
    assert injected == [3]
    injected.clear()
    instance = cli(
        "compose", "--shots", SHOTS, "--level", "instance", "-n", "2", "--budget", "3", "--warm-start",
        "--out", tmp_path / "instance",
    )  # fmt: skip
    assert instance.code == 0, instance.stderr
    assert len(injected) == 1, injected
