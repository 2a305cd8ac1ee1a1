"""The LoRA bank against merged models, PEFT reloads, autograd and its own invariants.

Tolerances (see docs/composition.md): the bank is compared with a float32 copy of the base
model whose weights hold the merged delta of that row's composition. float32 bank: rtol and
atol 1e-5 on logits. bfloat16 bank: max |bank - merged| <= 0.1 * max |merged - base| per row,
i.e. the change the composition makes to the logits is reproduced to 10% (measured: 1.5-5%,
about the bf16 rounding of the base model itself).
Gradients w.r.t. W (float32): rtol 1e-4, atol 1e-6.
"""

from __future__ import annotations

import copy

import pytest
import torch
from peft import PeftModel
from tiny_models import (
    KINDS,
    logits,
    make_adapters,
    one_thread,  # noqa: F401  (fixture)
    tiny_batch,
    tiny_model,
)
from torch.func import functional_call
from transformers.pytorch_utils import Conv1D

from lorahub_cli.compose.adapters import load_adapter, save_adapter
from lorahub_cli.compose.bank import BankedLayer, LoraBank, SparseRow, sparse
from lorahub_cli.compose.formulas import FORMULAS, combine
from lorahub_cli.errors import InputError

pytestmark = pytest.mark.usefixtures("one_thread")

N = 3
BANK_FORMULAS = [name for name, f in FORMULAS.items() if f.bank_mode == name]  # elementwise, linear
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
BF16_OF_EFFECT = 0.1  # bf16 must reproduce each row's change of the logits to 10%


def adapter_kinds(folder, n: int, ranks: list[int], alphas: list[int]) -> dict:
    """Per kind: n adapters of one rank (both formulas) and n of the given mixed ranks and alphas."""
    sets = {}
    for kind in KINDS:
        model = tiny_model(kind)
        same = make_adapters(model, folder / kind / "same", n)
        mixed = make_adapters(model, folder / kind / "mixed", n, ranks=ranks, alphas=alphas)
        sets[kind] = {"same": [load_adapter(p) for p in same], "mixed": [load_adapter(p) for p in mixed]}
    return sets


@pytest.fixture(scope="module")
def adapter_sets(tmp_path_factory):
    return adapter_kinds(tmp_path_factory.mktemp("adapters"), N, ranks=[2, 4, 3], alphas=[4, 8, 3])


def row_weights(rows: int, seed: int = 0) -> torch.Tensor:
    W = torch.randn(rows, N, generator=torch.Generator().manual_seed(seed))  # (rows, N)
    W[0, 0] = -abs(W[0, 0]) - 0.5  # at least one clearly negative weight
    return W


def merged_logits(model, modules, batch, delta_of):
    """Logits of `model` (left untouched) with each targeted weight replaced by W0 + delta."""
    params = dict(model.named_parameters())
    for module in modules:
        delta = delta_of(module)  # (d_out, d_in)
        conv = isinstance(model.get_submodule(module), Conv1D)  # Conv1D stores (d_in, d_out)
        params[f"{module}.weight"] = params[f"{module}.weight"] + (delta.T if conv else delta)
    return functional_call(model, params, args=(), kwargs=batch).logits.float()


def composed_logits(model, adapters, weights, formula, batch):
    composed = combine(adapters, weights, formula)
    return merged_logits(model, composed.modules, batch, composed.delta)


def rows_of(batch, index):
    return {k: v[index] for k, v in batch.items()}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("formula", BANK_FORMULAS)
@pytest.mark.parametrize("kind", KINDS)
def test_each_row_equals_its_own_merged_composition(adapter_sets, kind, formula, dtype, device):
    adapters = adapter_sets[kind]["same"]
    reference = tiny_model(kind)
    model = tiny_model(kind).to(device=device, dtype=dtype)
    batch = tiny_batch(model, rows=4)
    W = row_weights(4)
    bank = LoraBank(model, adapters, formula)
    with torch.no_grad(), bank.weights(W):
        got = logits(model, {k: v.to(device) for k, v in batch.items()}).cpu()  # (4, T, vocab)
    with torch.no_grad():
        base = logits(reference, batch)
        for b in range(4):
            want = composed_logits(reference, adapters, W[b], formula, rows_of(batch, [b]))  # (1, T, vocab)
            effect = (want[0] - base[b]).abs().max()
            assert effect > 0.01  # the composition really moves the logits (1000 x the fp32 tolerance)
            if dtype == torch.float32:
                torch.testing.assert_close(got[b : b + 1], want, rtol=1e-5, atol=1e-5)
            else:
                assert (got[b] - want[0]).abs().max() <= BF16_OF_EFFECT * effect


@pytest.mark.parametrize("kind", KINDS)
def test_linear_with_mixed_ranks_and_scalings(adapter_sets, kind):
    adapters = adapter_sets[kind]["mixed"]
    model, reference = tiny_model(kind), tiny_model(kind)
    batch, W = tiny_batch(model, rows=3), row_weights(3, seed=1)
    bank = LoraBank(model, adapters, "linear")
    with torch.no_grad(), bank.weights(W):
        got = logits(model, batch)
        for b in range(3):
            want = composed_logits(reference, adapters, W[b], "linear", rows_of(batch, [b]))
            torch.testing.assert_close(got[b : b + 1], want, rtol=1e-5, atol=1e-5)
    with pytest.raises(InputError, match="one rank and one scaling"):
        bank.weights(W, mode="elementwise").__enter__()


@pytest.mark.parametrize("kind", KINDS)
def test_linear_skips_adapters_no_row_weighs_and_stays_exact(adapter_sets, kind, monkeypatch):
    # Mixed-request batches weigh few adapters: the unused ones are left out of the product.
    adapters = adapter_sets[kind]["mixed"]
    model, reference = tiny_model(kind), tiny_model(kind)
    batch, W = tiny_batch(model, rows=3), row_weights(3, seed=2)
    W[:, 1] = 0.0  # no row uses adapter 1
    W[2, 0] = 0.0  # row 2 uses adapter 2 only
    bank = LoraBank(model, adapters, "linear")
    widths = []
    real = torch.Tensor.__matmul__
    monkeypatch.setattr(torch.Tensor, "__matmul__", lambda a, b: widths.append(b.shape[-1]) or real(a, b))
    with torch.no_grad(), bank.weights(W):
        got = logits(model, batch)
    monkeypatch.undo()
    ranks = [a.r for a in adapters]
    assert sum(ranks) not in widths and ranks[0] + ranks[2] in widths  # the rank columns of adapter 1 were skipped
    with torch.no_grad():
        for b in range(3):
            want = composed_logits(reference, adapters, W[b], "linear", rows_of(batch, [b]))
            torch.testing.assert_close(got[b : b + 1], want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("formula", BANK_FORMULAS)
@pytest.mark.parametrize("kind", KINDS)
def test_population_broadcasts_over_examples(adapter_sets, kind, formula):
    adapters = adapter_sets[kind]["same"]
    model = tiny_model(kind)
    P, K = 2, 3
    batch, W = tiny_batch(model, rows=P * K), row_weights(P)  # rows p*K .. p*K+K-1 belong to W[p]
    bank = LoraBank(model, adapters, formula)
    with torch.no_grad():
        with bank.weights(W):
            grouped = logits(model, batch)
        with bank.weights(W.repeat_interleave(K, dim=0)):  # (P*K, N): one vector per row
            per_row = logits(model, batch)
    torch.testing.assert_close(grouped, per_row, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("formula", BANK_FORMULAS)
@pytest.mark.parametrize("kind", KINDS)
def test_composed_adapter_reloaded_by_peft_matches_the_bank(adapter_sets, kind, formula, tmp_path):
    adapters = adapter_sets[kind]["same"]
    model = tiny_model(kind)
    batch, w = tiny_batch(model, rows=2), torch.tensor([0.7, -0.4, 1.1])
    folder = save_adapter(combine(adapters, w, formula), tmp_path / "composed")
    peft_model = PeftModel.from_pretrained(copy.deepcopy(model), folder)
    bank = LoraBank(model, adapters, formula)
    with torch.no_grad(), bank.weights(w):  # (N,): the same vector in every row
        got = logits(model, batch)
        want = logits(peft_model, batch)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("formula", BANK_FORMULAS)
@pytest.mark.parametrize("kind", KINDS)
def test_gradient_wrt_weights_matches_a_merged_model(adapter_sets, kind, formula):
    adapters = adapter_sets[kind]["same"]
    model, reference = tiny_model(kind), tiny_model(kind)
    P, K = 2, 2
    batch = tiny_batch(model, rows=P * K)
    vocab = model.config.vocab_size
    probe = torch.randn(vocab, generator=torch.Generator().manual_seed(3))  # a fixed direction in logit space

    W = row_weights(P).requires_grad_(True)
    bank = LoraBank(model, adapters, formula)
    with bank.weights(W):
        (logits(model, batch) @ probe).sum().backward()
    assert all(not p.requires_grad and p.grad is None for p in model.parameters())
    assert all(not b.requires_grad for b in model.buffers())

    merge = FORMULAS[formula].merge
    for p in range(P):
        w = W[p].detach().clone().requires_grad_(True)

        def delta_of(module, w=w):
            As = [a.modules[module][0] for a in adapters]
            Bs = [a.modules[module][1] for a in adapters]
            A, B, s = merge(As, Bs, [a.scaling for a in adapters], w)  # differentiable in w
            return s * B @ A

        rows = rows_of(batch, slice(p * K, (p + 1) * K))
        (merged_logits(reference, adapters[0].modules, rows, delta_of) @ probe).sum().backward()
        torch.testing.assert_close(W.grad[p], w.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("kind", KINDS)
def test_beam_search_keeps_each_row_on_its_own_weights(adapter_sets, kind):
    # generate() repeats each row num_beams times in place, so row groups still match W's rows.
    model = tiny_model(kind)
    bank = LoraBank(model, adapter_sets[kind]["same"])
    inputs = {k: v for k, v in tiny_batch(model, rows=2).items() if k != "decoder_input_ids"}
    W = 2 * row_weights(2)
    settings = dict(max_new_tokens=6, do_sample=False, num_beams=2, pad_token_id=0)
    with torch.no_grad():
        with bank.weights(W):
            together = model.generate(**inputs, **settings)
        for b in range(2):
            with bank.weights(W[b]):
                alone = model.generate(**rows_of(inputs, [b]), **settings)
            assert torch.equal(together[b : b + 1], alone)


@pytest.mark.parametrize("kind", KINDS)
def test_no_weights_is_the_base_model_and_remove_restores_it(adapter_sets, kind):
    model = tiny_model(kind)
    originals = {name: m for name, m in model.named_modules()}
    batch = tiny_batch(model, rows=2)
    with torch.no_grad():
        base = logits(model, batch)
        bank = LoraBank(model, adapter_sets[kind]["same"])
        assert sum(isinstance(m, BankedLayer) for m in model.modules()) == len(adapter_sets[kind]["same"][0].modules)
        assert torch.equal(logits(model, batch), base)
        with bank.weights(torch.zeros(N)):
            assert torch.equal(logits(model, batch), base)  # zero weights: zero delta
        with bank.weights(torch.ones(N)):
            assert not torch.allclose(logits(model, batch), base)
        assert torch.equal(logits(model, batch), base)  # leaving the context ends the composition
        assert bank.remove() is model
        assert torch.equal(logits(model, batch), base)
    assert {name: m for name, m in model.named_modules()} == originals
    assert all(p.requires_grad for p in model.parameters())
    with pytest.raises(InputError, match="removed"):
        bank.weights(torch.ones(N)).__enter__()


@pytest.mark.parametrize("kind", KINDS)
def test_a_shared_bank_holds_the_adapters_factors_once(adapter_sets, kind):
    adapters = copy.deepcopy(adapter_sets[kind]["mixed"])  # mixed ranks: the slices are at their offsets
    before = [{m: (A.clone(), B.clone()) for m, (A, B) in a.modules.items()} for a in adapters]
    weights = torch.tensor([0.5, -1.0, 0.25])
    composed = combine(adapters, weights, "linear")
    model = tiny_model(kind)
    bank = LoraBank(model, adapters, mode="linear", share=True)
    for module in adapters[0].modules:
        layer = model.get_submodule(module)
        for adapter, original in zip(adapters, before):
            A, B = adapter.modules[module]
            assert A.untyped_storage().data_ptr() == layer.lora_A.untyped_storage().data_ptr()
            assert B.untyped_storage().data_ptr() == layer.lora_B.untyped_storage().data_ptr()
            assert torch.equal(A, original[module][0]) and torch.equal(B, original[module][1])
    bank.remove()
    again = combine(adapters, weights, "linear")  # the export reads the shared factors: bit for bit the same
    assert all(torch.equal(again.modules[m][i], composed.modules[m][i]) for m in composed.modules for i in (0, 1))
    # Where the bank holds the factors in another dtype, the adapters keep their own.
    kept = copy.deepcopy(adapter_sets[kind]["same"])
    LoraBank(tiny_model(kind), kept, share=True, lora_dtype=torch.float64)
    module = next(iter(kept[0].modules))
    assert kept[0].modules[module][0].dtype == torch.float32


def test_bad_weights_and_batches_are_refused(adapter_sets):
    model = tiny_model("llama")
    bank = LoraBank(model, adapter_sets["llama"]["same"])
    with pytest.raises(InputError, match=r"shape \(2, 4\) do not fit a bank of 3 adapters"):
        bank.weights(torch.ones(2, 4)).__enter__()
    with pytest.raises(InputError, match="cannot evaluate 'ties'"):
        bank.weights(torch.ones(N), mode="ties").__enter__()
    with bank.weights(torch.ones(2, N)), pytest.raises(InputError, match="batch of 3 rows cannot be split among 2"):
        logits(model, tiny_batch(model, rows=3))


def test_adapters_of_another_base_model_are_refused_before_any_change(adapter_sets):
    model = tiny_model("gpt2")
    with pytest.raises(InputError, match="targets 'model.layers.0.self_attn.q_proj', which the base model does not"):
        LoraBank(model, adapter_sets["llama"]["same"])
    assert not any(isinstance(m, BankedLayer) for m in model.modules())
    assert all(p.requires_grad for p in model.parameters())


# --- the grouped path: each row computes only its own adapters ---------------------------------

SPARSE_N = 6


@pytest.fixture(scope="module")
def sparse_sets(tmp_path_factory):
    return adapter_kinds(
        tmp_path_factory.mktemp("sparse"), SPARSE_N, ranks=[2, 4, 3, 1, 5, 2], alphas=[4, 8, 3, 2, 5, 1]
    )


def sparse_weights() -> torch.Tensor:
    """Requests' rows: one adapter, three, two with a negative weight, none (the base model), the last alone."""
    W = torch.zeros(5, SPARSE_N)
    W[0, 4] = 1.0
    W[1, [0, 2, 5]] = 1 / 3
    W[2, [1, 3]] = torch.tensor([0.8, -0.6])
    W[4, 5] = 1.0
    return W


@pytest.mark.parametrize("formula, ranks", [("linear", "mixed"), ("linear", "same"), ("elementwise", "same")])
@pytest.mark.parametrize("kind", KINDS)
def test_grouped_rows_equal_the_dense_bank_peft_and_the_merged_composition(sparse_sets, kind, formula, ranks, tmp_path):
    adapters = sparse_sets[kind][ranks]
    model, reference = tiny_model(kind), tiny_model(kind)
    W = sparse_weights()
    batch = tiny_batch(model, rows=len(W))
    bank = LoraBank(model, adapters, formula)
    with torch.no_grad():
        with bank.weights(W):
            rows = bank._state.rows.grouped
            assert rows is not None, "sparse rows take the grouped path by default"
            got = logits(model, batch)
        with bank.weights(W, grouped=False):
            dense = logits(model, batch)
        base = logits(reference, batch)
    if formula == "linear":  # each row's width is its own adapters' rank sum, not the bank's
        own = [sum(a.r for a, w in zip(adapters, row) if w != 0) for row in W.tolist()]
        assert rows.columns.shape[1] == max(own) < sum(a.r for a in adapters)
    else:
        assert rows.adapters.shape[1] == 3
    torch.testing.assert_close(got, dense, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[3], base[3], rtol=1e-5, atol=1e-5)  # a row that weighs nothing is the base model
    for b in (0, 1, 2, 4):
        chosen = [i for i in range(SPARSE_N) if W[b, i] != 0]
        subset, w = [adapters[i] for i in chosen], W[b, chosen]
        with torch.no_grad():
            want = composed_logits(reference, subset, w, formula, rows_of(batch, [b]))
            assert (want[0] - base[b]).abs().max() > 1e-3  # 100 x the tolerance: the comparison can fail
            torch.testing.assert_close(got[b : b + 1], want, rtol=1e-5, atol=1e-5)
            folder = save_adapter(combine(subset, w, formula), tmp_path / f"row-{b}")
            peft_model = PeftModel.from_pretrained(copy.deepcopy(reference), folder).eval()
            torch.testing.assert_close(got[b : b + 1], logits(peft_model, rows_of(batch, [b])), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("formula", BANK_FORMULAS)
def test_grouped_rows_broadcast_over_examples_and_keep_bf16_close(sparse_sets, formula):
    adapters = sparse_sets["t5"]["same"]
    model = tiny_model("t5")
    P, K = 5, 2
    batch, W = tiny_batch(model, rows=P * K), sparse_weights()
    bank = LoraBank(model, adapters, formula)
    with torch.no_grad():
        with bank.weights(W, grouped=True):
            grouped = logits(model, batch)
        with bank.weights(W.repeat_interleave(K, dim=0), grouped=False):
            per_row = logits(model, batch)
    torch.testing.assert_close(grouped, per_row, rtol=1e-5, atol=1e-5)
    # bf16: the grouped rows change each row's logits as the dense bank does, to 10% of the composition's
    # effect beyond the bf16 rounding of the base model itself.
    reference = tiny_model("t5")
    model.to(torch.bfloat16)
    with torch.no_grad():
        with bank.weights(W, grouped=True):
            low = logits(model, batch)
        base = logits(reference, batch)
        rounding = (logits(reference.to(torch.bfloat16), batch) - base).abs().amax(dim=(1, 2))  # (rows,)
    effect = (per_row - base).abs().amax(dim=(1, 2))
    assert ((low - per_row).abs().amax(dim=(1, 2)) <= BF16_OF_EFFECT * effect + 2 * rounding).all()


@pytest.mark.parametrize("mode, ranks", [("linear", "mixed"), ("linear", "same"), ("elementwise", "same")])
def test_sparse_rows_reach_the_bank_sparse_and_give_the_dense_weights_logits_bit_for_bit(sparse_sets, mode, ranks):
    """A route's SparseRow goes to the bank as it is: the grouped path builds no (P, N) matrix, and the logits
    equal those of the dense matrix bit for bit, whatever order a row lists its adapters in."""
    adapters = sparse_sets["t5"][ranks]
    model = tiny_model("t5")
    W = sparse_weights()
    W[3, [1, 2, 4]] = torch.tensor([0.25, -0.5, 0.25])  # ties in |w|, beside the 1/3 ties of row 1
    batch = tiny_batch(model, rows=len(W))
    bank = LoraBank(model, adapters, mode)
    rows = sparse(W)
    assert rows[1].columns == (0, 2, 5) and rows[3].columns == (1, 2, 4), "sparse() reads the nonzero entries"
    reversed_rows = [SparseRow(r.columns[::-1], r.weights[::-1]) for r in rows]
    grouped = bank.sparse_rows(rows)
    assert grouped.W is None and grouped.grouped is not None, "no dense matrix on the grouped path"
    with torch.no_grad():
        with bank.use(grouped):
            got = logits(model, batch)
        with bank.use(bank.sparse_rows(reversed_rows)):
            reordered = logits(model, batch)
        with bank.weights(W):
            from_dense = logits(model, batch)
        with bank.use(bank.sparse_rows(rows, grouped=False)):
            dense = logits(model, batch)
        with bank.weights(W, grouped=False):
            dense_from_dense = logits(model, batch)
        base = logits(tiny_model("t5"), batch)
    assert torch.equal(got, reordered) and torch.equal(got, from_dense)
    assert torch.equal(dense, dense_from_dense)
    torch.testing.assert_close(got, dense, rtol=1e-5, atol=1e-5)
    assert (got - base).abs().amax() > 1e-3, "the rows move the logits, so the comparisons can fail"


def test_bad_sparse_rows_are_refused(sparse_sets):
    bank = LoraBank(tiny_model("t5"), sparse_sets["t5"]["same"])
    for row, message in [
        (SparseRow((0, 1), (1.0,)), "2 columns and 1 weights"),
        (SparseRow((0, 0), (0.5, 0.5)), r"columns \[0, 0\], not distinct ones of 0..5"),
        (SparseRow((6,), (1.0,)), r"columns \[6\], not distinct ones of 0..5"),
    ]:
        with pytest.raises(InputError, match=message):
            bank.sparse_rows([row])
