"""Weight cards (spectral/): the directions against an explicit SVD of B A, the card file, scores from the
weights against a direct computation, and Arrow routing against PEFT's Arrow on a tiny T5 and a tiny Llama."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_models import (
    logits,
    make_adapters,
    make_lora_adapter,
    one_thread,  # noqa: F401  (fixture)
    tiny_batch,
    tiny_model,
)

from lorahub_cli.compose.adapters import PEFT_PREFIX, load_adapter
from lorahub_cli.errors import InputError, IntegrityError, LorahubError, NotFoundError
from lorahub_cli.io import Example
from lorahub_cli.models import BaseModel
from lorahub_cli.registry.store import SAFETENSORS_FILE
from lorahub_cli.spectral import arrow, scores
from lorahub_cli.spectral.card import WEIGHT_CARD, WeightCard, load_checked, write_weight_card
from lorahub_cli.spectral.svd import lora_svd, normalise_signs

pytestmark = pytest.mark.usefixtures("one_thread")


def explicit_svd(A: torch.Tensor, B: torch.Tensor, scaling: float):
    """The reference: form the delta and take its full SVD (float64), signs by the same rule."""
    delta = scaling * B.double() @ A.double()
    U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
    U, Vh = normalise_signs(U, Vh)
    return U, S, Vh, delta


def randn(*shape: int, generator) -> torch.Tensor:
    return torch.randn(*shape, generator=generator, dtype=torch.float64)


def low_rank(rows: int, cols: int, rank: int, generator) -> torch.Tensor:
    """Exactly of rank `rank` in float64 (a float32 product would be full-rank by its rounding)."""
    return randn(rows, rank, generator=generator) @ randn(rank, cols, generator=generator)


CASES = {
    "square r4": (32, 32, 4, None, None),
    "wide r8": (16, 40, 8, None, None),
    "tall r16": (64, 20, 16, None, None),
    "d_out < r": (6, 40, 8, None, None),
    "d_in < r": (40, 5, 8, None, None),
    "B of rank 2": (32, 24, 4, None, 2),
    "A of rank 3": (24, 32, 8, 3, None),
    "both deficient": (48, 48, 16, 5, 7),
}


@pytest.mark.parametrize("case", list(CASES))
def test_the_directions_equal_an_explicit_svd_of_the_delta(case):
    d_out, d_in, r, rank_a, rank_b = CASES[case]
    generator = torch.Generator().manual_seed(len(case))
    A = low_rank(r, d_in, rank_a, generator) if rank_a else randn(r, d_in, generator=generator)
    B = low_rank(d_out, r, rank_b, generator) if rank_b else randn(d_out, r, generator=generator)
    spectrum = lora_svd(A, B, 2.0)
    U, S, Vh, delta = explicit_svd(A, B, 2.0)
    rank = min(r, d_in, d_out, rank_a or r, rank_b or r)
    # Singular values: the non-zero ones to fp64 rounding, and exact zeros beyond the delta's rank.
    assert spectrum.S.shape == (r,)
    torch.testing.assert_close(spectrum.S[:rank], S[:rank], rtol=1e-10, atol=0)
    assert (spectrum.S[rank:] == 0).all() and (S[rank : min(d_in, d_out)] < 1e-9 * S[0]).all()
    # Directions where they are defined (distinct singular values here: checked), signs normalised.
    assert (S[: rank - 1] - S[1:rank] > 1e-3 * S[0]).all()
    torch.testing.assert_close(spectrum.Vh[:rank], Vh[:rank], rtol=0, atol=1e-9)
    torch.testing.assert_close(spectrum.U[:, :rank], U[:, :rank], rtol=0, atol=1e-9)
    assert (spectrum.Vh[rank:] == 0).all() and (spectrum.K[rank:] == 0).all()
    # The card's map: diag(S) V^T = K A, and U diag(S) V^T is the delta.
    torch.testing.assert_close(spectrum.K @ A.double(), spectrum.S[:, None] * spectrum.Vh, rtol=0, atol=1e-9)
    torch.testing.assert_close(spectrum.U @ torch.diag(spectrum.S) @ spectrum.Vh, delta, rtol=0, atol=1e-9)
    # What a card stores, computed without forming Q_a and Q_b: the same S and K.
    stored = lora_svd(A, B, 2.0, vectors=False)
    assert stored.U is None and stored.Vh is None
    torch.testing.assert_close(stored.S, spectrum.S, rtol=0, atol=1e-12 * float(S[0]))
    torch.testing.assert_close(stored.K, spectrum.K, rtol=0, atol=1e-9)


def test_float32_factors_give_the_directions_to_1e_5():
    generator = torch.Generator().manual_seed(3)
    A, B = torch.randn(8, 64, generator=generator) / 8, torch.randn(48, 8, generator=generator) / 8
    spectrum = lora_svd(A, B, 0.5, dtype=torch.float32)
    U, S, Vh, _ = explicit_svd(A, B, 0.5)
    assert spectrum.S.dtype == torch.float32
    torch.testing.assert_close(spectrum.S.double(), S[:8], rtol=1e-5, atol=0)
    torch.testing.assert_close(spectrum.Vh.double(), Vh[:8], rtol=0, atol=1e-5)


def test_signs_are_fixed_by_the_largest_entry_of_each_right_vector():
    generator = torch.Generator().manual_seed(5)
    A, B = torch.randn(4, 16, generator=generator), torch.randn(12, 4, generator=generator)
    first = lora_svd(A, B, 1.0)
    again = lora_svd(-A, -B, 1.0)  # the same delta, factored with both signs flipped
    torch.testing.assert_close(first.Vh, again.Vh, rtol=0, atol=1e-12)
    rows = torch.arange(4)
    assert (first.Vh[rows, first.Vh.abs().argmax(dim=1)] > 0).all()


def test_a_zero_adapter_has_a_zero_spectrum():
    spectrum = lora_svd(torch.randn(4, 16), torch.zeros(8, 4), 2.0)
    assert (spectrum.S == 0).all() and (spectrum.Vh == 0).all() and (spectrum.K == 0).all()


# --- the card file ------------------------------------------------------------------------------------


@pytest.fixture(scope="module", params=["t5", "llama"])
def adapter_folder(request, tmp_path_factory) -> Path:
    model = tiny_model(request.param)
    return make_lora_adapter(model, tmp_path_factory.mktemp(request.param) / "adapter", r=4, alpha=8, seed=1)


@pytest.fixture
def card_folder(adapter_folder, tmp_path) -> Path:
    """A copy of the adapter with its weight card written beside it."""
    folder = tmp_path / "adapter"
    folder.mkdir()
    for path in adapter_folder.iterdir():
        (folder / path.name).write_bytes(path.read_bytes())
    assert set(write_weight_card(folder)) == {WEIGHT_CARD}
    return folder


def test_a_card_read_with_its_adapter_gives_the_explicit_directions(card_folder):
    folder = card_folder
    card, adapter = load_checked(folder)
    assert card.modules == sorted(adapter.modules) and card.rank == 4 and card.scaling == 2.0
    spectra, prototypes = card.spectra(adapter), card.prototypes(adapter)
    for module, (A, B) in adapter.modules.items():
        _, S, Vh, _ = explicit_svd(A, B, adapter.scaling)
        torch.testing.assert_close(spectra[module].double(), S[:4, None] * Vh[:4], rtol=0, atol=1e-5 * float(S[0]))
        torch.testing.assert_close(prototypes[module].double(), Vh[0], rtol=0, atol=1e-5)
    # What is stored: (r + m r) float32 per module (m = r = 4 here), whatever d_in and d_out are.
    tensors = load_file(folder / WEIGHT_CARD)
    assert {k: tuple(v.shape) for k, v in tensors.items()} == {
        "sigma": (len(card.modules), 4),
        "core": (len(card.modules), 4, 4),
    }


def test_a_card_keeps_the_leading_directions_of_a_higher_rank_adapter(tmp_path):
    """r = 8 > settings.WEIGHTS["card_directions"] = 4: all 8 singular values, the 4 leading directions."""
    folder = make_lora_adapter(tiny_model("t5"), tmp_path / "r8", r=8, alpha=8, seed=3)
    write_weight_card(folder)
    card, adapter = load_checked(folder)
    assert card.rank == 8 and card.directions == 4
    assert tuple(card.sigma.shape) == (len(card.modules), 8) and tuple(card.core.shape) == (len(card.modules), 4, 8)
    spectra = card.spectra(adapter)
    for row, (module, (A, B)) in enumerate(sorted(adapter.modules.items())):
        _, S, Vh, _ = explicit_svd(A, B, adapter.scaling)
        torch.testing.assert_close(card.sigma[row].double(), S[:8], rtol=1e-5, atol=0)
        torch.testing.assert_close(spectra[module].double(), S[:4, None] * Vh[:4], rtol=0, atol=1e-5 * float(S[0]))


def one_line_rebuild_error(error: LorahubError) -> None:
    assert isinstance(error, IntegrityError)
    assert "\n" not in str(error) and "lorahub registry rebuild" in str(error), str(error)


@pytest.mark.parametrize("where", ["tensor bytes", "header", "truncated", "metadata value"])
def test_a_corrupted_card_is_a_one_line_error_naming_rebuild(card_folder, where):
    path = card_folder / WEIGHT_CARD
    raw = bytearray(path.read_bytes())
    header = int.from_bytes(raw[:8], "little")
    if where == "tensor bytes":
        raw[-3] ^= 0x40
    elif where == "header":
        raw[8 + header // 2] = ord("{")
    elif where == "truncated":
        raw = raw[: len(raw) // 2]
    else:  # a still-valid header whose recorded scaling was edited
        text = raw[8 : 8 + header].decode()
        edited = text.replace('"scaling":"2.0"', '"scaling":"3.0"')
        assert edited != text
        raw[8 : 8 + header] = edited.encode()
    path.write_bytes(bytes(raw))
    with pytest.raises(LorahubError) as caught:
        load_checked(card_folder, "my/adapter")
    one_line_rebuild_error(caught.value)
    assert "my/adapter" in str(caught.value)


def test_a_card_beside_other_weights_is_stale(card_folder, tmp_path):
    other = make_lora_adapter(tiny_model("t5"), tmp_path / "other", r=4, seed=7)
    (card_folder / SAFETENSORS_FILE).write_bytes((other / SAFETENSORS_FILE).read_bytes())
    with pytest.raises(LorahubError) as caught:
        load_checked(card_folder)
    one_line_rebuild_error(caught.value)
    assert "other adapter weights" in str(caught.value)
    # Even when told a (wrong) hash that matches the card, the singular values give it away.
    card = WeightCard.load(card_folder)
    with pytest.raises(LorahubError) as caught:
        card.spectra(load_adapter(card_folder))
    one_line_rebuild_error(caught.value)


def test_a_missing_card_says_how_to_build_one(adapter_folder):
    with pytest.raises(NotFoundError, match="no weight card.*lorahub registry rebuild"):
        WeightCard.load(adapter_folder, "x")


# --- scores from the weights ----------------------------------------------------------------------------


def random_index(n: int = 5, rank: int = 3, modules=("m0", "m1"), d: int = 12, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    entries, factors = {}, {}
    for i in range(n):
        r = rank if i % 2 == 0 else rank - 1  # mixed ranks: zero-padded rows in the stack
        targets = modules if i != 1 else modules[:1]  # adapter 1 targets one module only
        entry = {}
        for module in targets:
            A, B = torch.randn(r, d, generator=generator), torch.randn(d + 2, r, generator=generator)
            spectrum = lora_svd(A, B, 0.5)
            entry[module] = ((spectrum.K @ A.double()).float(), spectrum.S.float())
            factors[(f"a{i}", module)] = (A, B)
        entries[f"a{i}"] = entry
    return scores.WeightIndex.from_spectra(entries), factors


def direct_layer_scores(factors, ids, modules, x_by_module, groups_by_module, groups, method, pool, shared=None):
    """(L, groups, n): per layer, group and adapter, the score from the explicit delta (loops, no stacked matrix).
    `shared`: (mean, directions) per module removed from every input first."""
    out = torch.zeros(len(modules), groups, len(ids))
    for i, adapter_id in enumerate(ids):
        for row, module in enumerate(modules):
            if (adapter_id, module) not in factors:
                continue
            A, B = factors[(adapter_id, module)]
            _, S, Vh, delta = explicit_svd(A, B, 0.5)
            for g in range(groups):
                xs = x_by_module[module][groups_by_module[module] == g].double()
                if shared is not None:
                    mean, P = (t.double() for t in shared[module])
                    xs = xs - mean
                    xs = xs - (xs @ P.T) @ P
                units = xs / xs.norm(dim=1, keepdim=True)
                if pool == "centroid":
                    units = units.mean(dim=0, keepdim=True)
                    units = units / units.norm()
                if method == "arrow":
                    values = [abs(float(u @ Vh[0])) for u in units]
                else:
                    values = [float((delta @ u).norm()) for u in units]
                if pool == "rms":
                    out[row, g, i] = (sum(v * v for v in values) / len(values)) ** 0.5
                else:
                    out[row, g, i] = sum(values) / len(values)
    return out


def layer_mean(values: torch.Tensor, index) -> torch.Tensor:
    """(groups, n): the mean over the layers each adapter targets of (L, groups, n) values."""
    present = index.present.T.float()[:, None]  # (L, 1, n)
    return (values * present).sum(dim=0) / present.sum(dim=0)


@pytest.mark.parametrize("method", scores.METHODS)
@pytest.mark.parametrize("pool", scores.POOLS)
@pytest.mark.parametrize("shared", [None, 0, 2])
def test_scores_equal_a_direct_computation_from_each_delta(method, pool, shared):
    index, factors = random_index()
    generator = torch.Generator().manual_seed(9)
    x = {m: torch.randn(11, 12, generator=generator) for m in index.modules}
    group = {m: torch.tensor([0, 0, 1, 2, 2, 2, 1, 0, 2, 1, 1]) for m in index.modules}
    inputs = scores.LayerInputs(x, group, groups=3)
    background = scores.Background.of(
        scores.LayerInputs({m: torch.randn(40, 12, generator=generator) + 2 for m in index.modules}, {}, 1)
    )
    removed = None if shared is None else {m: (background.mean[m], background.directions[m][:shared]) for m in x}
    want = direct_layer_scores(factors, index.ids, index.modules, x, group, 3, method, pool, removed)
    scorer = scores.Scorer(method, pool, shared=shared)
    torch.testing.assert_close(scores.layer_scores(index, inputs, scorer, background), want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(
        scores.score(index, inputs, scorer, background), layer_mean(want, index), rtol=1e-5, atol=1e-6
    )
    assert index.rank == 3 and index.present.tolist()[1] == [True, False]
    # Calibrated: per layer (the default), or the mean score over the mean background score.
    reference = torch.rand(len(index.modules), len(index.ids), generator=generator) + 0.5
    torch.testing.assert_close(
        scores.score(index, inputs, scorer, background, reference), layer_mean(want / reference[:, None], index)
    )
    total = scores.Scorer(method, pool, shared=shared, calibration="total")
    present = index.present.T.float()
    torch.testing.assert_close(
        scores.score(index, inputs, total, background, reference),
        (want * present[:, None]).sum(dim=0) / (reference * present).sum(dim=0),
    )


def test_the_background_removes_what_every_input_shares():
    """Its mean and leading principal directions are those of the background inputs: an input that is the mean
    plus a mix of those directions has nothing left to score."""
    generator = torch.Generator().manual_seed(3)
    common = torch.randn(2, 12, generator=generator)
    x = 5 + torch.randn(300, 2, generator=generator) @ common * 3 + 0.01 * torch.randn(300, 12, generator=generator)
    background = scores.Background.of(scores.LayerInputs({"m": x}, {}, 1))
    torch.testing.assert_close(background.mean["m"], x.mean(dim=0))
    P = background.directions["m"][:2].double()
    span = torch.linalg.lstsq(common.T.double(), P.T).solution  # P's rows lie in the span of `common`
    torch.testing.assert_close(common.T.double() @ span, P.T, atol=1e-2, rtol=0)
    # What is left of an input is its part outside them, at unit length.
    e = torch.randn(12, generator=generator).double()
    outside = (e - (e @ P.T) @ P).float()
    prepared = background.prepare((background.mean["m"] + 3 * common[0] + outside)[None], "m", 2)[0]
    torch.testing.assert_close(prepared, outside / outside.norm(), atol=2e-2, rtol=0)
    torch.testing.assert_close(background.prepare(x[:3], "m", None), scores.unit(x[:3]))


def test_a_subset_scores_as_its_adapters_did_in_the_whole_index():
    index, _ = random_index(n=7)
    generator = torch.Generator().manual_seed(4)
    x = {m: torch.randn(9, 12, generator=generator) for m in index.modules}
    inputs = scores.LayerInputs(x, {m: torch.zeros(9, dtype=torch.long) for m in index.modules}, 1)
    positions = torch.tensor([5, 1, 2])
    subset = index.subset(positions)
    assert subset.ids == ["a5", "a1", "a2"]
    for method in scores.METHODS:
        torch.testing.assert_close(
            scores.score(subset, inputs, scores.Scorer(method, "tokens")),
            scores.score(index, inputs, scores.Scorer(method, "tokens"))[:, positions],
        )


def test_a_scorer_names_a_bad_method_pool_or_directions_in_one_line():
    for args, message in [
        (("cosine", "tokens"), "unknown weight score 'cosine'"),
        (("arrow", "max"), "pooling 'max'"),
        (("arrow", "tokens", 4), "directions = 4 with pooling 'tokens'"),
        (("spectr", "rms", 0), "directions = 0"),
        (("spectr", "rms", None, 9), "shared = 9"),
        (("spectr", "rms", None, None, "max"), "calibration 'max'"),
    ]:
        with pytest.raises(InputError, match=message) as caught:
            scores.Scorer(*args)
        assert "\n" not in str(caught.value)
    assert scores.DEFAULT_SCORER.name == "spectr-rms/16-s1"
    assert scores.Scorer("arrow", "centroid", None, None, "total").name == "arrow-centroid-total"


def test_the_background_is_random_tokens_of_the_vocabulary_and_repeatable():
    from transformers import ByT5Tokenizer

    tokenizer = ByT5Tokenizer(extra_ids=0)
    shots, again = scores.background_examples(tokenizer, True), scores.background_examples(tokenizer, True)
    requests = scores.background_examples(tokenizer, False)
    assert shots == again and len(shots) == 256 and all(e.target for e in shots)
    assert all(e.target is None for e in requests)
    lengths = [len(tokenizer(e.input, add_special_tokens=False)["input_ids"]) for e in shots]
    assert min(lengths) >= 10 and max(lengths) <= 39 and len(set(lengths)) > 10  # round trips: no byte lost


@pytest.mark.parametrize("method", scores.METHODS)
def test_rms_from_the_principal_directions_is_exact_with_all_and_a_lower_bound_with_fewer(method):
    index, _ = random_index()
    generator = torch.Generator().manual_seed(2)
    # Unit token inputs spanning 5 dimensions: their 5 principal directions hold every mean square.
    x = {m: scores.unit(low_rank(20, 12, 5, generator).float()) for m in index.modules}
    inputs = scores.LayerInputs(x, {m: torch.zeros(20, dtype=torch.long) for m in index.modules}, 1)
    exact = scores.score(index, inputs, scores.Scorer(method, "rms"))
    torch.testing.assert_close(scores.score(index, inputs, scores.Scorer(method, "rms", 5)), exact)
    fewer = scores.score(index, inputs, scores.Scorer(method, "rms", 3))
    assert (fewer <= exact + 1e-6).all() and (fewer < exact - 1e-4).any()


def test_an_adapter_aligned_with_the_inputs_ranks_first():
    """An adapter whose top right singular vector is the inputs' direction, with the largest top singular value
    of the others (so SpectR's scale does not decide), ranks first by both scores."""
    index, _ = random_index(n=6)
    generator = torch.Generator().manual_seed(1)
    direction = torch.randn(12, generator=generator)
    direction /= direction.norm()
    entries = spectra_of(index)
    top = max(float(sigma[0]) for entry in entries.values() for _, sigma in entry.values())
    sigma = torch.tensor([top, 0.0, 0.0])
    entries["zz-aligned"] = {m: (torch.outer(sigma, direction), sigma) for m in index.modules}
    extended = scores.WeightIndex.from_spectra(entries)
    x = {m: direction + 0.1 * torch.randn(7, 12, generator=generator) for m in index.modules}
    inputs = scores.LayerInputs(x, {m: torch.zeros(7, dtype=torch.long) for m in index.modules}, 1)
    for method in scores.METHODS:
        for pool in scores.POOLS:
            ranking = scores.rank(extended, scores.score(extended, inputs, scores.Scorer(method, pool)), 3)
            assert ranking[0][0]["id"] == "zz-aligned", (method, pool, ranking)


def spectra_of(index: scores.WeightIndex) -> dict:
    """The entries an index was built from, read back from its stacks (for extending it in a test)."""
    out = {}
    for i, adapter_id in enumerate(index.ids):
        out[adapter_id] = {}
        for column, module in enumerate(index.modules):
            if index.present[i, column]:
                rows = index.spectra[module].view(len(index.ids), index.rank, -1)[i]
                out[adapter_id][module] = (rows, rows.norm(dim=1))
    return out


def base_of(model, kind: str) -> BaseModel:
    from transformers import ByT5Tokenizer

    tokenizer = ByT5Tokenizer(extra_ids=0)
    return BaseModel(model, tokenizer, kind == "t5", torch.device("cpu"), torch.float32)


@pytest.mark.parametrize("kind", ["t5", "llama"])
@pytest.mark.parametrize("with_targets", [True, False])
def test_captured_inputs_are_each_layers_real_tokens(kind, with_targets):
    """Shots feed their targets (T5: teacher-forced into the decoder; Llama: after the prompt); requests do not."""
    from transformers import ByT5Tokenizer

    vocab = len(ByT5Tokenizer(extra_ids=0))
    model = tiny_model(kind, vocab=vocab)
    base = base_of(model, kind)
    targets = ["xy", "z"] if with_targets else [None, None]
    examples = [Example("abc", targets[0]), Example("hello there", targets[1])]
    first = "encoder.block.0.layer.0.SelfAttention.q" if kind == "t5" else "model.layers.0.self_attn.q_proj"
    modules = (
        [first, "decoder.block.0.layer.0.SelfAttention.v", "decoder.block.1.layer.1.EncDecAttention.v"]
        if kind == "t5"
        else [first, "model.layers.1.self_attn.v_proj"]
    )
    inputs = scores.capture_layer_inputs(base, examples, modules)
    ids = [base.tokenizer(e.input)["input_ids"] for e in examples]  # with </s>
    if kind == "t5":
        prompt = [len(i) for i in ids]
        decoder = [len(base.tokenizer(e.target)["input_ids"]) for e in examples] if with_targets else [1, 1]
        want = {modules[0]: prompt, modules[1]: decoder, modules[2]: prompt}  # cross-attention v reads the encoder
    else:
        rows = [len(i) for i in ids]
        if with_targets:  # + " target" + eos
            rows = [
                n + len(base.tokenizer(" " + t, add_special_tokens=False)["input_ids"]) + 1
                for n, t in zip(rows, targets)
            ]
        want = {m: rows for m in modules}
    for module, lengths in want.items():
        assert torch.bincount(inputs.group[module], minlength=2).tolist() == lengths, module
    # The first layer's input is the normed embedding of exactly the example's tokens, in order.
    embed = model.get_input_embeddings()
    norm = model.encoder.block[0].layer[0].layer_norm if kind == "t5" else model.model.layers[0].input_layernorm
    with torch.no_grad():
        expected = norm(embed(torch.tensor(ids[1])))
    got = inputs.x[first][inputs.group[first] == 1][: len(ids[1])]
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_an_index_of_card_folders_scores_queries_against_its_background(tmp_path):
    from transformers import ByT5Tokenizer

    model = tiny_model("t5", vocab=len(ByT5Tokenizer(extra_ids=0)))
    paths = make_adapters(model, tmp_path, 3)
    for path in paths:
        write_weight_card(path)
    index = scores.WeightIndex.from_folders({f"x/{p.name}": p for p in paths})
    assert index.ids == ["x/a0", "x/a1", "x/a2"] and len(index.modules) == 12
    base = base_of(model, "t5")
    background = scores.background(base, index.modules)
    assert set(background.mean) == set(index.modules) and background.directions[index.modules[0]].shape == (4, 32)
    reference = scores.reference(index, background)
    assert reference.shape == (12, 3) and (reference > 0).all()
    inputs = scores.capture_layer_inputs(base, [Example("hello", "x"), Example("two", "y")], index.modules).merged()
    calibrated = scores.score(index, inputs, background=background, reference=reference)
    layers = scores.layer_scores(index, inputs, scores.DEFAULT_SCORER, background)
    torch.testing.assert_close(calibrated, (layers / reference[:, None]).mean(dim=0))
    assert [r["id"] for r in scores.rank(index, calibrated, 2)[0]] == [
        index.ids[i] for i in calibrated[0].argsort(descending=True)[:2]
    ]


def test_two_stages_re_rank_the_shortlist_with_the_scores_one_stage_gives_them(tmp_path):
    """Above the shortlist size, the cheap first stage picks adapters and the default scorer gives each picked one
    exactly its one-stage score; the rest are -inf. With the spread, an evenly spaced sample is scored too and its
    mean and std are the library's estimate."""
    from transformers import ByT5Tokenizer

    from lorahub_cli.spectral.library import References, WeightLibrary, WeightScorer

    model = tiny_model("t5", vocab=len(ByT5Tokenizer(extra_ids=0)))
    paths = make_adapters(model, tmp_path, 6)
    for path in paths:
        write_weight_card(path)
    index = scores.WeightIndex.from_folders({p.name: p for p in paths})
    base = base_of(model, "t5")
    references = References(WeightLibrary(index, "test", []), base, None, 0, 16)
    one = WeightScorer(references.library, base, references, shortlist=6)
    two = WeightScorer(references.library, base, references, shortlist=2)
    inputs = scores.capture_layer_inputs(base, [Example("hello there", "x"), Example("two", "y")], index.modules)
    inputs = inputs.merged()
    full = one.rank(inputs, True).values
    background, reference = references.background(True), references.reference(two.shortlist_scorer, True)
    cheap = scores.score(two.first(), inputs, two.shortlist_scorer, background, reference)  # bfloat16 prototypes
    for spread in (False, True):
        found = two.rank(inputs, True, spread)
        picked = torch.isfinite(found.values[0])
        assert set(torch.topk(cheap[0], 2).indices.tolist()) <= set(picked.nonzero()[:, 0].tolist())
        assert int(picked.sum()) == (2 if not spread else len(set(torch.topk(cheap[0], 2).indices.tolist()) | {0, 5}))
        torch.testing.assert_close(found.values[0, picked], full[0, picked], rtol=1e-5, atol=1e-6)
    sample = found.values[0, [0, 5]]
    torch.testing.assert_close(found.mean, sample.mean().reshape(1))
    torch.testing.assert_close(found.std, sample.std(unbiased=False).reshape(1))


# --- Arrow against PEFT ---------------------------------------------------------------------------------


def with_spectral_gap(folder: Path, ratios=(1.0, 0.3, 0.2, 0.1)) -> Path:
    """Rewrite an adapter's factors as B = U, A = diag(sigma) V^T of its own delta with sigma_2 / sigma_1 = 0.3:
    PEFT's 15 power-iteration steps then find the top singular vector to float32 precision."""
    state = load_file(folder / SAFETENSORS_FILE)
    for key in [k for k in state if k.endswith("lora_A.weight")]:
        A, B = state[key].double(), state[key.replace("lora_A", "lora_B")].double()
        U, S, Vh = torch.linalg.svd(B @ A, full_matrices=False)
        sigma = float(S[0]) * torch.tensor(ratios, dtype=torch.float64)
        state[key] = (sigma[:, None] * Vh[: len(ratios)]).float().contiguous()
        state[key.replace("lora_A", "lora_B")] = U[:, : len(ratios)].float().contiguous()
    save_file(state, folder / SAFETENSORS_FILE, metadata={"format": "pt"})
    return folder


def peft_arrow(model, paths, top_k, temperature):
    from peft import ArrowConfig, create_arrow_model

    config = ArrowConfig(top_k=top_k, router_temperature=temperature, rng_seed=0)
    return create_arrow_model(copy.deepcopy(model), [str(p) for p in paths], config).eval()


def peft_prototypes(peft_model) -> dict[str, torch.Tensor]:
    return {
        name.removeprefix(PEFT_PREFIX): layer.lora_arrow["arrow_router"].prototypes
        for name, layer in peft_model.named_modules()
        if hasattr(layer, "lora_arrow")
    }


def card_prototypes(paths) -> dict[str, torch.Tensor]:
    cards = []
    for path in paths:
        write_weight_card(path)
        card, adapter = load_checked(path)
        cards.append(card.prototypes(adapter))
    return {m: torch.stack([c[m] for c in cards]) for m in cards[0]}


@pytest.mark.parametrize("kind", ["t5", "llama"])
@pytest.mark.parametrize("top_k, temperature", [(2, 1.0), (1, 1.0), (3, 0.5)])
def test_arrow_equals_peft_per_token(kind, top_k, temperature, tmp_path):
    model = tiny_model(kind)
    paths = [with_spectral_gap(p) for p in make_adapters(model, tmp_path, 4)]
    adapters = [load_adapter(p) for p in paths]
    reference = peft_arrow(model, paths, top_k, temperature)
    batch = tiny_batch(model, rows=3)
    with torch.no_grad():
        want = logits(reference, batch)
        prototypes = card_prototypes(paths)
        # The weight cards' exact prototypes are PEFT's power-iteration ones (up to sign) on these adapters.
        for module, theirs in peft_prototypes(reference).items():
            torch.testing.assert_close((prototypes[module] * theirs).sum(dim=1).abs(), torch.ones(4), rtol=0, atol=1e-5)
        with arrow.routed(model, arrow.arrow_layers(adapters, prototypes, top_k, temperature), top_k, temperature):
            got = logits(model, batch)
        base = logits(model, batch)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert (want - base).abs().max() > 1e-2  # the routed adapters change the logits: the test can fail


@pytest.mark.parametrize("kind", ["t5", "llama"])
def test_arrow_routing_equals_peft_on_any_adapters_given_its_prototypes(kind, tmp_path):
    """On adapters without a spectral gap PEFT's 15 power-iteration steps stop short of the top singular
    vector; given the same prototypes, the routing itself is the same to float32 rounding."""
    model = tiny_model(kind)
    paths = make_adapters(model, tmp_path, 4)
    adapters = [load_adapter(p) for p in paths]
    reference = peft_arrow(model, paths, 2, 1.0)
    batch = tiny_batch(model, rows=2, seed=3)
    with torch.no_grad():
        want = logits(reference, batch)
        layers = arrow.arrow_layers(adapters, peft_prototypes(reference), 2, 1.0)
        with arrow.routed(model, layers, 2, 1.0):
            got = logits(model, batch)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_arrow_coefficients_are_a_softmax_over_the_top_k():
    x = torch.tensor([[1.0, 0.0], [0.0, -2.0]])
    prototypes = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    p = arrow.coefficients(x, prototypes, top_k=2, temperature=0.5)
    # row 0: |x.v| = 1, 0, 0.6 -> top 2 are adapters 0 and 2; row 1: 0, 2, 1.6 -> adapters 1 and 2
    e = torch.exp(torch.tensor([1.0, 0.6]) / 0.5)
    torch.testing.assert_close(p[0], torch.tensor([e[0], 0, e[1]]) / e.sum())
    e = torch.exp(torch.tensor([2.0, 1.6]) / 0.5)
    torch.testing.assert_close(p[1], torch.tensor([0, e[0], e[1]]) / e.sum())


def test_arrow_refuses_what_peft_refuses(tmp_path):
    model = tiny_model("t5")
    four, eight = make_lora_adapter(model, tmp_path / "r4", r=4), make_lora_adapter(model, tmp_path / "r8", r=8, seed=1)
    q_only = make_lora_adapter(model, tmp_path / "q", r=4, target_modules=["q"], seed=2)
    adapters = {p.name: load_adapter(p) for p in (four, eight, q_only)}
    cases = [
        ([adapters["r4"], adapters["r8"]], 1, 1.0, "one rank, but 'r8' has r = 8"),
        ([adapters["r4"], adapters["q"]], 1, 1.0, "'q' does not target module"),
        ([adapters["r4"]], 2, 1.0, "top_k is 2, but there are 1 adapters"),
        ([adapters["r4"]], 1, 0.0, "temperature is 0.0"),
    ]
    for group, top_k, temperature, message in cases:
        with pytest.raises(InputError, match=message) as caught:
            arrow.check_arrow(group, top_k, temperature)
        assert "\n" not in str(caught.value)


# --- Arrow as the bank's mode, in the shared batch and through the serving engine --------------------------


def arrow_bank(model, paths, top_k, temperature):
    from lorahub_cli.compose.bank import LoraBank

    bank = LoraBank(model, [load_adapter(p) for p in paths], mode="linear")
    bank.arrow(card_prototypes(paths), top_k, temperature)
    return bank


@pytest.mark.parametrize("kind", ["t5", "llama"])
def test_the_banks_arrow_mode_equals_peft_per_token_and_routes_a_row_among_its_candidates(kind, tmp_path):
    """Rows 0 and 1 may use all four adapters: PEFT's Arrow over the four. Row 2 may use adapters 1-3 only (its
    weight row's nonzero columns): PEFT's Arrow over those three."""
    model = tiny_model(kind)
    paths = [with_spectral_gap(p) for p in make_adapters(model, tmp_path, 4)]
    batch = tiny_batch(model, rows=3)
    with torch.no_grad():
        every = logits(peft_arrow(model, paths, 2, 1.0), batch)
        three = logits(peft_arrow(model, paths[1:], 2, 1.0), batch)
        bank = arrow_bank(model, paths, 2, 1.0)
        W = torch.ones(3, 4)
        W[2, 0] = 0
        with bank.weights(W, "arrow"):
            got = logits(model, batch)
        bank.remove()
    torch.testing.assert_close(got[:2], every[:2], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[2], three[2], rtol=1e-5, atol=1e-5)
    assert (every[2] - three[2]).abs().max() > 1e-3  # leaving adapter 0 out changes row 2: the test can fail


def test_arrow_is_a_bank_mode_only_once_the_bank_has_prototypes(tmp_path):
    from lorahub_cli.compose.bank import LoraBank

    model = tiny_model("t5")
    bank = LoraBank(model, [load_adapter(p) for p in make_adapters(model, tmp_path, 2)], mode="linear")
    with pytest.raises(InputError, match="no Arrow prototypes"):
        bank.rows(torch.ones(1, 2), "arrow")


@pytest.fixture
def arrow_registry(tmp_path, lorahub_home, request):
    """A tiny base on disk and four adapters with a spectral gap, added with their weight cards (no data)."""
    from tiny_models import save_tiny_base

    from lorahub_cli import api
    from lorahub_cli.registry import Store

    kind = request.param
    model = save_tiny_base(kind, tmp_path / "base")
    store = Store(lorahub_home, weight_card=api._weight_card)
    paths = []
    # alpha 64: large enough that top-1, top-2 and top-3 routing generate different tokens on these inputs
    made = make_adapters(model, tmp_path / "adapters", 4, alphas=[64] * 4, base_model_name=str(tmp_path / "base"))
    for i, path in enumerate(made):
        paths.append(with_spectral_gap(path))
        api.add(str(path), name=f"e{i}", store=store)
    return kind, tmp_path / "base", paths, store


def peft_arrow_generate(kind, base, paths, text, top_k, new_tokens):
    from peft import ArrowConfig, create_arrow_model
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

    loader = AutoModelForSeq2SeqLM if kind == "t5" else AutoModelForCausalLM
    config = ArrowConfig(top_k=top_k, router_temperature=1.0, rng_seed=0)
    model = create_arrow_model(loader.from_pretrained(base), [str(p) for p in paths], config).eval()
    tokenizer = AutoTokenizer.from_pretrained(base)
    ids = tokenizer([text], return_tensors="pt")
    with torch.no_grad():
        out = model.generate(
            **ids,
            do_sample=False,
            num_beams=1,
            max_new_tokens=new_tokens,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
    out = out[0, 1:] if kind == "t5" else out[0, ids["input_ids"].shape[1] :]
    return [int(t) for t in out if int(t) > 2]  # no pad, eos or unk


@pytest.mark.parametrize("arrow_registry", ["t5", "llama"], indirect=True)
def test_serving_compose_arrow_generates_what_peft_arrow_generates_for_each_request_alone(arrow_registry):
    """The engine built from the registry (prototypes from the weight cards) answers a batch of requests, padded
    together, each as PEFT's Arrow model answers it alone."""
    from lorahub_cli.serve.engine import Engine, Request

    kind, base, paths, store = arrow_registry
    engine = Engine.from_registry(store, compose="arrow", k=2, dtype="float32", device="cpu", max_new_tokens=8)
    assert engine.info()["arrow"] == {"top_k": 2, "temperature": 1.0}
    texts = ["The capital of France is", "2 + 3 =", "Sort: pear, apple, fig and plum"]
    answers = engine.run([Request(text) for text in texts])
    routed = [[t for t in a.tokens if t > 2] for a in answers]
    assert routed == [peft_arrow_generate(kind, base, paths, text, 2, 8) for text in texts]
    assert all(a.route["compose"] == "arrow" for a in answers)
    # Another top-k generates other tokens, so the comparison can fail.
    for other in (1, 3):
        assert routed != [peft_arrow_generate(kind, base, paths, text, other, 8) for text in texts]


@pytest.mark.parametrize("arrow_registry", ["t5"], indirect=True)
def test_serving_compose_arrow_refuses_adapters_peft_arrow_refuses_in_one_line(arrow_registry, tmp_path):
    from tiny_models import tiny_t5

    from lorahub_cli import api
    from lorahub_cli.serve.engine import Engine

    _, base, _, store = arrow_registry
    model = tiny_t5()
    folder = make_lora_adapter(model, tmp_path / "r8", r=8, seed=9, base_model_name=str(base))
    api.add(str(folder), name="r8", store=store)
    with pytest.raises(InputError, match="Arrow routing needs one rank, but") as caught:
        Engine.from_registry(store, compose="arrow", k=2, dtype="float32", device="cpu")
    assert "\n" not in str(caught.value)
    store.remove("r8")
    folder = make_lora_adapter(model, tmp_path / "q", r=4, target_modules=["q"], seed=8, base_model_name=str(base))
    api.add(str(folder), name="q-only", store=store)
    with pytest.raises(InputError, match="does not target module") as caught:
        Engine.from_registry(store, compose="arrow", k=2, dtype="float32", device="cpu")
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize("arrow_registry", ["t5"], indirect=True)
def test_serving_ranks_a_registry_without_data_by_its_weight_cards_per_request(arrow_registry):
    """A mixture request on a registry of weight cards only: its k adapters are the weight ranking of its input
    alone (what `retrieve --inputs` gives), and it is answered."""
    from lorahub_cli import api
    from lorahub_cli.io import Example
    from lorahub_cli.serve.engine import Engine, Request

    _, _, _, store = arrow_registry
    engine = Engine.from_registry(store, k=2, dtype="float32", device="cpu", max_new_tokens=4)
    assert engine.info()["by"] == "weights" and engine.info()["weights"]["dtype"] == "float32"
    texts = ["The capital of France is", "2 + 3 =", "Sort: pear, apple, fig and plum"]
    answers = engine.run([Request(text) for text in texts])
    ranker = api.retriever_of(store, "weights", base=engine.base)
    # A request's weight ranking does not depend on the requests scored with it (fp32), and the scores are
    # ratios to the background's, near 1 (a decoder layer that sees only the start token is left out: less the
    # background's mean it is float noise, which once made every score ~1e10 and every request's ranking alike).
    together = ranker.per_input([Example(t) for t in texts], 4).inputs
    for text, row in zip(texts, together):
        alone = ranker.per_input([Example(text)], 4).inputs[0]
        assert [m.id for m in row] == [m.id for m in alone]
        assert [m.score for m in row] == pytest.approx([m.score for m in alone], rel=1e-4)
        assert all(0.1 < m.score < 10 for m in row)
    for text, answer in zip(texts, answers):
        wanted = [m.id for m in ranker.per_input([Example(text)], 2).inputs[0]]
        assert [a["id"] for a in answer.route["adapters"]] == wanted and answer.route["compose"] == "mixture"
        assert answer.tokens
