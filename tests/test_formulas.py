"""Composition formulas, adapter folders and the composed PEFT export.

Tolerances (see docs/composition.md): hand-computed float64 cases 1e-12; float32 deltas and
logits against PEFT or the LoraHub reference atol 1e-5 (logits) / 1e-6 (factors, deltas).
"""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from peft import PeftModel, set_peft_model_state_dict
from peft.utils import merge_utils
from safetensors.torch import load_file
from tiny_models import (
    KINDS,
    logits,
    make_adapters,
    make_lora_adapter,
    one_thread,  # noqa: F401  (fixture)
    tiny_batch,
    tiny_model,
)

from lorahub_cli.compose.adapters import LoraAdapter, check_compatible, load_adapter, save_adapter
from lorahub_cli.compose.formulas import FORMULAS, combine, elementwise, fusion, linear
from lorahub_cli.errors import InputError, NotFoundError

pytestmark = pytest.mark.usefixtures("one_thread")

# Options a formula needs before it can run at all; every other test reads FORMULAS.
OPTIONS = {"ties": {"density": 0.5}, "dare_linear": {"density": 0.5}}
WEIGHTED = [name for name, f in FORMULAS.items() if not f.fixed_weights]


def rand(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def memory_adapter(name, seed, *, r=2, alpha=4.0, modules=("m1", "m2"), d_in=4, d_out=3, **fields):
    pairs = {
        m: (rand(r, d_in, seed=seed * 10 + j), rand(d_out, r, seed=seed * 10 + j + 5)) for j, m in enumerate(modules)
    }
    spec = dict(base_model_name_or_path="base", target_modules=["m"], task_type="CAUSAL_LM") | fields
    return LoraAdapter(name=name, r=r, lora_alpha=alpha, modules=pairs, **spec)


def delta(factors):
    return factors.scaling * factors.B @ factors.A  # (d_out, r) @ (r, d_in)


# ---- the formulas on 3 x 4 matrices ---------------------------------------------------------


def test_elementwise_by_hand_includes_cross_terms():
    A1, A2, B1, B2 = rand(2, 4, seed=1), rand(2, 4, seed=2), rand(3, 2, seed=3), rand(3, 2, seed=4)
    w1, w2, s = 0.5, -1.5, 2.0
    got = delta(elementwise([A1, A2], [B1, B2], [s, s], torch.tensor([w1, w2], dtype=torch.float64)))
    want = s * (w1**2 * B1 @ A1 + w1 * w2 * (B1 @ A2 + B2 @ A1) + w2**2 * B2 @ A2)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_linear_by_hand_with_different_ranks_and_scalings():
    A1, A2, B1, B2 = rand(2, 4, seed=1), rand(3, 4, seed=2), rand(3, 2, seed=3), rand(3, 3, seed=4)
    factors = linear([A1, A2], [B1, B2], [2.0, 0.5], torch.tensor([0.7, -1.2], dtype=torch.float64))
    assert factors.A.shape == (5, 4) and factors.B.shape == (3, 5) and factors.scaling == 1.0
    torch.testing.assert_close(delta(factors), 0.7 * 2.0 * B1 @ A1 - 1.2 * 0.5 * B2 @ A2, rtol=1e-12, atol=1e-12)


def test_fusion_is_elementwise_at_one_over_k():
    As, Bs = [rand(2, 4, seed=i) for i in range(3)], [rand(3, 2, seed=9 + i) for i in range(3)]
    want = elementwise(As, Bs, [2.0] * 3, torch.full((3,), 1 / 3, dtype=torch.float64))
    torch.testing.assert_close(delta(fusion(As, Bs, [2.0] * 3)), delta(want), rtol=1e-12, atol=1e-12)


# ---- invariants over the registry -----------------------------------------------------------

# ties is left out: its sign election and disjoint mean count the unweighted A_i, B_i of
# every module, so one-hot weights do not give back the chosen one (PEFT behaves the same).
ONE_HOT = {"elementwise": {}, "linear": {}, "svd": {}, "dare_linear": {"density": 1.0}}


@pytest.mark.filterwarnings("ignore:The density")
@pytest.mark.parametrize("name", ONE_HOT)
@pytest.mark.parametrize("chosen", [0, 2])
def test_one_hot_weights_reproduce_that_adapter(name, chosen):
    adapters = [memory_adapter(f"a{i}", seed=i) for i in range(3)]
    weights = torch.nn.functional.one_hot(torch.tensor(chosen), 3).double()
    composed = combine(adapters, weights, name, **ONE_HOT[name])
    for module in adapters[0].modules:
        torch.testing.assert_close(composed.delta(module), adapters[chosen].delta(module), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", WEIGHTED)
def test_zero_weights_give_zero_delta(name):
    adapters = [memory_adapter(f"a{i}", seed=i) for i in range(3)]
    composed = combine(adapters, [0.0, 0.0, 0.0], name, **OPTIONS.get(name, {}))
    for module in composed.modules:
        assert torch.count_nonzero(composed.delta(module)) == 0


@pytest.mark.parametrize("name", list(FORMULAS))
def test_every_formula_checks_the_base_model(name):
    adapters = [memory_adapter("a0", seed=0), memory_adapter("a1", seed=1, base_model_name_or_path="other")]
    weights = None if FORMULAS[name].fixed_weights else [1.0, 1.0]
    with pytest.raises(InputError, match="'a1' has base model 'other' but 'a0' has 'base'"):
        combine(adapters, weights, name, **OPTIONS.get(name, {}))


# ---- the checks before composing ------------------------------------------------------------


def test_rank_mismatch_is_refused_for_elementwise_but_fine_for_linear():
    adapters = [memory_adapter("a0", seed=0), memory_adapter("a1", seed=1, r=3, alpha=6.0)]
    with pytest.raises(InputError, match="'a1' has rank r 3 but 'a0' has 2") as err:
        combine(adapters, [1.0, 1.0], "elementwise")
    assert "linear" in err.value.hint
    assert combine(adapters, [1.0, 1.0], "linear").r == 5


def test_scaling_mismatch_is_refused_for_elementwise():
    adapters = [memory_adapter("a0", seed=0), memory_adapter("a1", seed=1, alpha=8.0)]
    with pytest.raises(InputError, match="scaling"):
        combine(adapters, [1.0, 1.0], "elementwise")


def test_target_module_mismatch_names_the_module():
    adapters = [memory_adapter("a0", seed=0), memory_adapter("a1", seed=1, modules=("m1", "m3"))]
    with pytest.raises(InputError, match="'a1' targets module 'm3'"):
        check_compatible(adapters)


@pytest.mark.parametrize(
    ("weights", "formula", "options", "message"),
    [
        ([1.0], "elementwise", {}, "got 1 weights for 2 adapters"),
        ([1.0, math.nan], "linear", {}, "finite"),
        (None, "linear", {}, "needs one weight per adapter"),
        ([0.5, 0.5], "fusion", {}, "sets its own weights"),
        ([1.0, 1.0], "ties", {}, "needs option 'density'"),
        ([1.0, 1.0], "ties", {"density": 1.5}, r"density must be in \(0, 1\], got 1.5"),
        ([1.0, 1.0], "linear", {"density": 0.5}, "takes no option 'density'"),
        ([1.0, 1.0], "mean", {}, "unknown formula 'mean'"),
    ],
)
def test_bad_weights_options_and_formulas_are_refused(weights, formula, options, message):
    adapters = [memory_adapter("a0", seed=0), memory_adapter("a1", seed=1)]
    with pytest.raises(InputError, match=message):
        combine(adapters, weights, formula, **options)


# ---- adapter folders ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gpt2_folders(tmp_path_factory):
    model = tiny_model("gpt2")
    return model, make_adapters(model, tmp_path_factory.mktemp("gpt2"), 2)


def test_load_adapter_reads_config_and_strips_peft_keys(gpt2_folders):
    model, (path, _) = gpt2_folders
    adapter = load_adapter(path)
    assert (adapter.name, adapter.r, adapter.lora_alpha, adapter.scaling) == ("a0", 4, 8.0, 2.0)
    assert adapter.fan_in_fan_out and adapter.task_type == "CAUSAL_LM" and adapter.target_modules == ["c_attn"]
    assert sorted(adapter.modules) == ["transformer.h.0.attn.c_attn", "transformer.h.1.attn.c_attn"]
    for module, (A, B) in adapter.modules.items():
        assert A.shape == (4, 32) and B.shape == (96, 4)
        model.get_submodule(module)  # the key is the module's path in the transformers model


def test_pickled_bin_loads_like_safetensors(gpt2_folders, tmp_path):
    _, (path, _) = gpt2_folders
    (tmp_path / "adapter_config.json").write_text((path / "adapter_config.json").read_text())
    torch.save(load_file(path / "adapter_model.safetensors"), tmp_path / "adapter_model.bin")
    a, b = load_adapter(path), load_adapter(tmp_path)
    for module in a.modules:
        assert all(torch.equal(x, y) for x, y in zip(a.modules[module], b.modules[module]))


def test_rslora_scaling(tmp_path):
    model = tiny_model("llama")
    adapter = load_adapter(make_lora_adapter(model, tmp_path / "a", r=4, alpha=8, use_rslora=True))
    assert adapter.scaling == 8 / 2


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"use_dora": True}, "DoRA"),
        ({"peft_type": "IA3"}, "is a IA3 adapter"),
        ({"rank_pattern": {"c_attn": 8}}, "rank_pattern"),
    ],
)
def test_unsupported_configs_are_refused(gpt2_folders, tmp_path, change, message):
    _, (path, _) = gpt2_folders
    config = json.loads((path / "adapter_config.json").read_text()) | change
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    (tmp_path / "adapter_model.safetensors").write_bytes((path / "adapter_model.safetensors").read_bytes())
    with pytest.raises(InputError, match=message):
        load_adapter(tmp_path)


def test_extra_trained_weights_are_refused(gpt2_folders, tmp_path):
    _, (path, _) = gpt2_folders
    (tmp_path / "adapter_config.json").write_text((path / "adapter_config.json").read_text())
    state = load_file(path / "adapter_model.safetensors")
    state["base_model.model.transformer.h.0.attn.c_attn.bias"] = torch.zeros(96)
    torch.save(state, tmp_path / "adapter_model.bin")
    with pytest.raises(InputError, match=r"c_attn\.bias', which is not a LoRA A/B weight"):
        load_adapter(tmp_path)


def test_missing_files_are_not_found(tmp_path):
    with pytest.raises(NotFoundError, match="no adapter_config.json"):
        load_adapter(tmp_path)
    (tmp_path / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 4}')
    with pytest.raises(NotFoundError, match="no adapter_model.safetensors or adapter_model.bin"):
        load_adapter(tmp_path)


def test_save_adapter_round_trips(tmp_path):
    adapter = memory_adapter("a0", seed=0, alpha=3.0)
    again = load_adapter(save_adapter(adapter, tmp_path / "out"))
    assert (again.r, again.lora_alpha, again.task_type, again.base_model_name_or_path) == (2, 3.0, "CAUSAL_LM", "base")
    assert not list((tmp_path / "out").glob(".*.tmp"))
    for module in adapter.modules:
        assert all(torch.equal(x, y) for x, y in zip(adapter.modules[module], again.modules[module]))


# ---- against PEFT and the LoraHub reference, on tiny models ----------------------------------


def peft_model_with(model, paths):
    """The PEFT model with every adapter folder loaded under its folder name."""
    peft_model = PeftModel.from_pretrained(copy.deepcopy(model), paths[0], adapter_name=paths[0].name)
    for path in paths[1:]:
        peft_model.load_adapter(path, adapter_name=path.name)
    return peft_model


def reload_logits(model, composed, folder, batch):
    peft_model = PeftModel.from_pretrained(copy.deepcopy(model), save_adapter(composed, folder))
    with torch.no_grad():
        return logits(peft_model, batch)


def assert_same_deltas(peft_model, adapter_name, composed):
    for module in composed.modules:
        layer = peft_model.base_model.model.get_submodule(module)
        peft_delta = layer.get_delta_weight(adapter_name)
        peft_delta = peft_delta.T if composed.fan_in_fan_out else peft_delta  # Conv1D merges (d_in, d_out)
        torch.testing.assert_close(composed.delta(module), peft_delta, rtol=1e-5, atol=1e-6)


# Each of our names and the add_weighted_adapter combination_type it must agree with.
PEFT_TWINS = {"linear": "cat", "ties": "ties", "svd": "svd", "dare_linear": "dare_linear"}


def fixed_mask_pruning(tensor, density, rescale):
    # Replaces DARE's Bernoulli mask so that our merge and PEFT's see the same "random" drop.
    mask = (torch.arange(tensor.numel()) % 2 == 0).reshape(tensor.shape).to(tensor)
    return tensor * mask / density if rescale else tensor * mask


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", list(PEFT_TWINS))
def test_matches_peft_add_weighted_adapter(kind, name, tmp_path, monkeypatch):
    monkeypatch.setattr(merge_utils, "random_pruning", fixed_mask_pruning)
    model = tiny_model(kind)
    # cat and svd accept different ranks; PEFT's ties and dare_linear need one rank.
    ranks, alphas = ([2, 4, 3], [4, 8, 3]) if name in ("linear", "svd") else ([4] * 3, [8, 4, 8])
    paths = make_adapters(model, tmp_path, 3, ranks=ranks, alphas=alphas)
    weights = [0.8, -1.2, 0.4]
    options = {"density": 0.5} if name in ("ties", "dare_linear") else {}

    peft_model = peft_model_with(model, paths)
    names = [p.name for p in paths]
    peft_model.add_weighted_adapter(names, weights, "merged", combination_type=PEFT_TWINS[name], **options)
    peft_model.set_adapter("merged")
    composed = combine([load_adapter(p) for p in paths], weights, name, **options)

    assert_same_deltas(peft_model, "merged", composed)
    batch = tiny_batch(model, rows=2)
    with torch.no_grad():
        want = logits(peft_model, batch)
    torch.testing.assert_close(reload_logits(model, composed, tmp_path / "out", batch), want, rtol=1e-5, atol=1e-5)


def lorahub_reference_state_dict(paths, weights):
    """sail-sg/lorahub's composition: for every lora key, sum_i w_i * state_dict_i[key]."""
    states = [load_file(p / "adapter_model.safetensors") for p in paths]
    return {key: sum(w * state[key] for w, state in zip(weights, states)) for key in states[0]}


@pytest.mark.parametrize("kind", KINDS)
def test_elementwise_matches_the_lorahub_reference(kind, tmp_path):
    model = tiny_model(kind)
    paths = make_adapters(model, tmp_path, 3)
    weights = [0.9, -0.6, 1.3]
    reference = lorahub_reference_state_dict(paths, weights)
    composed = combine([load_adapter(p) for p in paths], weights, "elementwise")

    ours = composed.peft_state_dict()
    assert ours.keys() == reference.keys()
    for key in reference:
        torch.testing.assert_close(ours[key], reference[key], rtol=1e-6, atol=1e-6)

    # The reference then loads its sum into the first module's PeftModel in place.
    peft_model = PeftModel.from_pretrained(copy.deepcopy(model), paths[0])
    set_peft_model_state_dict(peft_model, reference)
    batch = tiny_batch(model, rows=2)
    with torch.no_grad():
        want = logits(peft_model, batch)
    torch.testing.assert_close(reload_logits(model, composed, tmp_path / "out", batch), want, rtol=1e-5, atol=1e-5)
