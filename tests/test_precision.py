"""The search-precision policy: auto per CPU flags and device, one-line errors, and an fp32 answer whatever
precision the search ran in (forced here, independent of the machine's CPU)."""

import json
from unittest.mock import ANY

import pytest
import torch
from conftest import SHOTS
from peft import PeftModel
from safetensors.torch import load_file
from test_compose import reference_loss
from transformers import AutoModelForSeq2SeqLM

from lorahub_cli import models
from lorahub_cli.compose import precision
from lorahub_cli.errors import InputError
from lorahub_cli.io import read_examples

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


@pytest.fixture
def machine(monkeypatch):
    """Set what the CPU and the GPU can do."""

    def set_(*, cpu_bf16=False, cuda_bf16=False, int8_kernels=True):
        monkeypatch.setattr(models, "cpu_has_fast_bf16", lambda: cpu_bf16)
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: cuda_bf16)
        engines = torch.backends.quantized.supported_engines if int8_kernels else ["none"]
        monkeypatch.setattr(precision, "_supported_engines", lambda: engines)

    return set_


def test_auto_is_fp32_on_every_machine(machine):
    # The benchmark's bf16 search ended worse than fp32 (docs/benchmarks.md), so auto does not follow the CPU.
    for cpu_bf16, cuda_bf16 in [(True, False), (False, False), (False, True), (True, True)]:
        machine(cpu_bf16=cpu_bf16, cuda_bf16=cuda_bf16)
        for device in (CPU, CUDA):
            for gradient in (True, False):
                assert precision.resolve("auto", device, gradient=gradient) == "fp32"
    machine(cpu_bf16=True, cuda_bf16=True)
    assert precision.resolve("bf16", CPU, gradient=True) == precision.resolve("bf16", CUDA, gradient=True) == "bf16"


def test_an_unavailable_precision_is_an_error_not_a_slowdown(machine):
    machine(cpu_bf16=False)
    with pytest.raises(InputError, match="bf16: this CPU .* would emulate bf16"):
        precision.resolve("bf16", CPU, gradient=False)
    machine(cpu_bf16=True, int8_kernels=False)
    with pytest.raises(InputError, match="no int8 CPU kernels"):
        precision.resolve("int8", CPU, gradient=False)
    machine(cpu_bf16=True)
    with pytest.raises(InputError, match="int8 has no gradients"):
        precision.resolve("int8", CPU, gradient=True)
    with pytest.raises(InputError, match="int8 runs on CPU only"):
        precision.resolve("int8", CUDA, gradient=False)
    with pytest.raises(InputError, match="'fp16' is not known"):
        precision.resolve("fp16", CPU, gradient=False)
    assert precision.resolve("int8", CPU, gradient=False) == "int8"
    assert precision.resolve("fp32", CUDA, gradient=True) == "fp32"


def test_cli_errors_are_one_line(cli, t5_home, tmp_path, machine):
    machine(cpu_bf16=False)
    result = cli("compose", "--shots", SHOTS, "--out", tmp_path / "x", "--search-precision", "bf16", "-n", "2")
    assert result.code == 2 and result.stderr.count("\n") <= 2 and "--search-precision auto or fp32" in result.stderr
    result = cli(
        "compose",
        "--shots",
        SHOTS,
        "--out",
        tmp_path / "x",
        "--search-precision",
        "int8",
        "--optimizer",
        "lbfgs",
        "-n",
        "2",
    )
    assert result.code == 2 and "int8 has no gradients" in result.stderr
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize(
    "searched_in, optimizer",
    [
        ("fp32", "lbfgs"),
        ("bf16", "lbfgs"),
        ("int8", "ngopt"),
        ("bf16", "ngopt"),
        ("fp32", "subspace"),
        ("bf16", "subspace"),
    ],
)
def test_the_answer_is_fp32_whatever_the_search_ran_in(cli, t5_home, tmp_path, machine, searched_in, optimizer):
    machine(cpu_bf16=True)  # bf16 allowed here whatever this CPU is
    home, base_dir = t5_home
    out = tmp_path / searched_in
    result = cli(
        "compose",
        "--shots",
        SHOTS,
        "--out",
        out,
        "-n",
        "3",
        "--budget",
        "6",
        "--optimizer",
        optimizer,
        "--search-precision",
        searched_in,
        "--json",
    )
    assert result.code == 0, result.stderr
    summary = json.loads(result.stdout)
    recipe = json.loads((out / "lorahub_recipe.json").read_text())
    search = recipe["search"]
    assert search["precision"] == search["precision_used"] == searched_in and recipe["dtype"] == "float32"
    # The recorded loss is a PEFT-loaded fp32 evaluation of the exported adapter.
    model = PeftModel.from_pretrained(AutoModelForSeq2SeqLM.from_pretrained(base_dir), out).eval()
    assert reference_loss(model, base_dir, read_examples(SHOTS)) == pytest.approx(summary["loss"], rel=1e-5)
    w = torch.tensor(list(summary["weights"].values()), dtype=torch.float64)
    assert recipe["objective"] == pytest.approx(summary["loss"] + 0.05 * float(w.abs().mean()), rel=1e-9)
    if searched_in == "fp32":
        assert search["rescored"] is None
    else:
        # The answer was chosen in fp32: the lowest fp32 objective of the search's best candidates, or (subspace)
        # a better point of the fp32 finish that follows them.
        assert 1 <= len(search["rescored"]) <= 3
        if optimizer == "subspace":
            assert search["phases"][-1] == {"phase": "finish", "precision": "fp32", "evaluations": ANY}
            assert recipe["objective"] <= min(search["rescored"]) * (1 + 1e-6)
        else:
            assert recipe["objective"] == pytest.approx(min(search["rescored"]), rel=1e-5)
    # The exported tensors are the fp32 composition of the modules on disk: the search's copy never touched them.
    composed = load_file(out / "adapter_model.safetensors")
    assert all(t.dtype == torch.float32 for t in composed.values())
    rebuilt = tmp_path / "rebuilt"
    assert cli("compose", "--from-recipe", out / "lorahub_recipe.json", "--out", rebuilt).code == 0
    assert (out / "adapter_model.safetensors").read_bytes() == (rebuilt / "adapter_model.safetensors").read_bytes()


def test_fixed_weights_are_exact_under_any_precision(cli, t5_home, tmp_path, machine):
    machine(cpu_bf16=True)
    home, base_dir = t5_home
    from lorahub_cli.registry import Store

    for searched_in in ("bf16", "int8"):
        out = tmp_path / searched_in
        result = cli(
            "compose",
            "--shots",
            SHOTS,
            "--modules",
            "capitals,addition",
            "--weights",
            "capitals=0,addition=1",
            "--search-precision",
            searched_in,
            "--optimizer",
            "ngopt",
            "--out",
            out,
        )
        assert result.code == 0, result.stderr
        original = load_file(Store(home).get("addition").path / "adapter_model.safetensors")
        composed = load_file(out / "adapter_model.safetensors")
        assert original.keys() == composed.keys() and all(torch.equal(original[k], composed[k]) for k in original)


def test_search_copies_leave_the_fp32_model_alone(t5_home):
    base = models.load_base_model(str(t5_home[1]), dtype="float32", device="cpu")
    before = {k: v.clone() for k, v in base.model.state_dict().items()}
    keep = {"encoder.block.0.layer.0.SelfAttention.q"}
    bf16 = precision.search_model(base, "bf16", keep)
    int8 = precision.search_model(base, "int8", keep)
    assert bf16.dtype == torch.bfloat16 and next(bf16.model.parameters()).dtype == torch.bfloat16
    assert type(int8.model.get_submodule("encoder.block.0.layer.0.SelfAttention.q")) is torch.nn.Linear, (
        "bank layers stay fp32"
    )
    assert type(int8.model.get_submodule("encoder.block.0.layer.0.SelfAttention.k")) is not torch.nn.Linear, (
        "others are int8"
    )
    assert precision.search_model(base, "fp32", keep) is base
    after = base.model.state_dict()
    assert all(torch.equal(before[k], after[k]) and after[k].dtype == before[k].dtype for k in before)
