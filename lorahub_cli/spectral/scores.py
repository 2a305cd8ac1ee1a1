"""Ranking adapters from their weights: the inputs each targeted layer sees, scored against every adapter.

For layer l, token input x (d_in) with x^ = x / |x|, and adapter i with top right singular vector v_i and
scaled right singular vectors diag(S_i) V_i^T (r x d_in):

    Arrow   a_il(x) = |x^ . v_i|             (|cos|: v_i is a unit vector)
    SpectR  p_il(x) = |diag(S_i) V_i^T x^|   (= |s_i B_i A_i x^|, the norm of the delta's output)

Both are one matrix product per layer against a stacked matrix: P_l (n x d_in) for Arrow, R_l (n r x d_in)
for SpectR, whose rows i r .. i r + r - 1 are adapter i's (zero rows where an adapter has a lower rank or
does not target the layer). Scores are then pooled over a group's (a shot set's, a request's) tokens:

    tokens    score_il = mean_t a_il(x_t)                     (Arrow's per-token view)
    rms       score_il = sqrt(mean_t a_il(x_t)^2)             (exactly one product with the query's
              principal directions; `directions` keeps the top few, an approximation that is cheaper at scale)
    centroid  score_il = a_il(c_l), c_l = mean_t x^_t         (one product row per group)

averaged over the layers adapter i targets, score_i = mean_l score_il, and divided by the same score on a
background of random token sequences, score_i / background_i (docs/weights.md: without it a few adapters
whose directions the base model's inputs always align with rank first for every query).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import InputError
from ..io import Example
from ..models import BaseModel
from .card import load_checked, prototype

METHODS = ("arrow", "spectr")
POOLS = ("tokens", "rms", "centroid")


@dataclass(frozen=True)
class Scorer:
    """How a token is scored (`method`), how a group's tokens are pooled (`pool`) and, for rms, how many of
    the query's principal directions are kept (None: all, exact)."""

    method: str
    pool: str
    directions: int | None = None

    def __post_init__(self):
        if self.method not in METHODS or self.pool not in POOLS:
            raise InputError(
                f"unknown weight score '{self.method}' / pooling '{self.pool}'.",
                f"Use one of {', '.join(METHODS)} and one of {', '.join(POOLS)}.",
            )
        if self.directions is not None and (self.pool != "rms" or self.directions < 1):
            raise InputError(
                f"directions = {self.directions} with pooling '{self.pool}'.",
                "Keep directions (1 or more) for rms pooling only.",
            )

    @property
    def name(self) -> str:
        return f"{self.method}-{self.pool}" + (f"/{self.directions}" if self.directions else "")


DEFAULT_SCORER = Scorer("spectr", "rms", 16)
"""The best and steadiest on the demo library over three background draws (docs/weights.md); chosen there."""


@dataclass
class WeightIndex:
    """Every adapter's directions, stacked per targeted module (float32, in memory)."""

    ids: list[str]
    modules: list[str]  # every module some adapter targets, sorted
    rank: int  # rows per adapter in `spectra` (the largest r; lower ranks are zero-padded)
    prototypes: dict[str, torch.Tensor]  # module -> (n, d_in), unit rows; zero where i does not target it
    spectra: dict[str, torch.Tensor]  # module -> (n * rank, d_in)
    present: torch.Tensor  # (n, L) bool: adapter i targets module l

    @classmethod
    def from_spectra(cls, entries: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]]) -> WeightIndex:
        """entries: adapter id -> {module: (diag(S) V^T (r x d_in), S (r,))}."""
        if not entries:
            raise InputError("no adapters to index.", "Add adapters to the registry first.")
        ids = sorted(entries)
        modules = sorted({m for spectra in entries.values() for m in spectra})
        rank = max(rows.shape[0] for spectra in entries.values() for rows, _ in spectra.values())
        prototypes, stacked = {}, {}
        for module in modules:
            widths = {e[module][0].shape[1] for e in entries.values() if module in e}
            if len(widths) > 1:
                raise InputError(
                    f"adapters disagree on the input size of module '{module}' ({sorted(widths)}).",
                    "Rank adapters of one base model.",
                )
            d_in = widths.pop()
            P = torch.zeros(len(ids), d_in)
            R = torch.zeros(len(ids), rank, d_in)
            for i, adapter_id in enumerate(ids):
                if module in entries[adapter_id]:
                    rows, sigma = entries[adapter_id][module]
                    P[i] = prototype(rows, sigma)
                    R[i, : rows.shape[0]] = rows
            prototypes[module], stacked[module] = P, R.reshape(len(ids) * rank, d_in)
        present = torch.tensor([[m in entries[i] for m in modules] for i in ids])
        return cls(ids, modules, rank, prototypes, stacked, present)

    def subset(self, positions: torch.Tensor) -> WeightIndex:
        """The index of the adapters at `positions` (a shortlist to re-rank with a costlier score)."""
        rows = (positions[:, None] * self.rank + torch.arange(self.rank)).reshape(-1)
        return WeightIndex(
            [self.ids[i] for i in positions.tolist()],
            self.modules,
            self.rank,
            {m: p[positions] for m, p in self.prototypes.items()},
            {m: s[rows] for m, s in self.spectra.items()},
            self.present[positions],
        )

    @classmethod
    def from_folders(cls, folders: dict[str, Path], hashes: dict[str, str] | None = None) -> WeightIndex:
        """The index of adapter folders that hold a weight card (id -> folder); `hashes`: their weights
        files' known sha256 (else each file is hashed)."""
        entries = {}
        for adapter_id, folder in folders.items():
            card, adapter = load_checked(folder, adapter_id, (hashes or {}).get(adapter_id))
            spectra = card.spectra(adapter, adapter_id)
            entries[adapter_id] = {m: (spectra[m], card.sigma[row]) for row, m in enumerate(card.modules)}
        return cls.from_spectra(entries)


@dataclass
class LayerInputs:
    """What each targeted module received in one forward pass, pad tokens dropped.

    x[module] is (N_module, d_in): every real token's input, rows in order; group[module] (N_module,) says
    which of the `groups` rows (shots, requests) each token came from."""

    x: dict[str, torch.Tensor]
    group: dict[str, torch.Tensor]
    groups: int

    def merged(self) -> LayerInputs:
        """Every token in one group: one ranking for a whole set of shots (task level)."""
        return LayerInputs(self.x, {m: torch.zeros_like(g) for m, g in self.group.items()}, 1)


def unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def project(rows: torch.Tensor, index: WeightIndex, module: str, method: str) -> torch.Tensor:
    """(m, n): |row . v_i| (Arrow) or |diag(S_i) V_i^T row| (SpectR) for every row and adapter at one module:
    one matrix product against the stacked (n x d_in) or (n r x d_in) matrix."""
    if method == "arrow":
        return (rows @ index.prototypes[module].T).abs()
    return (rows @ index.spectra[module].T).view(rows.shape[0], len(index.ids), index.rank).norm(dim=-1)


def token_scores(x: torch.Tensor, index: WeightIndex, module: str, method: str) -> torch.Tensor:
    """(N, n): every token's Arrow |cos| or SpectR norm (of its unit input) against every adapter."""
    return project(unit(x.float()), index, module, method)


def principal(x: torch.Tensor, directions: int | None) -> torch.Tensor:
    """Rows Z with sum over Z's rows of (z . w)^2 = mean_t (x_t . w)^2 for every w: x / sqrt(N) itself, or
    (directions given) the top `directions` right singular vectors of x / sqrt(N) scaled by their values."""
    x = x / x.shape[0] ** 0.5
    if directions is None or directions >= min(x.shape):
        return x
    _, S, Vh = torch.linalg.svd(x, full_matrices=False)
    return S[:directions, None] * Vh[:directions]


def group_scores(inputs: LayerInputs, index: WeightIndex, module: str, scorer: Scorer) -> torch.Tensor:
    """(groups, n): one module's scores, pooled over each group's tokens."""
    method = scorer.method
    x, group = unit(inputs.x[module].float()), inputs.group[module]
    counts = torch.bincount(group, minlength=inputs.groups).clamp_min(1).float()
    mean = torch.zeros(inputs.groups, x.shape[0]).index_put_((group, torch.arange(x.shape[0])), 1 / counts[group])
    if scorer.pool == "tokens":
        return mean @ project(x, index, module, method)
    if scorer.pool == "centroid":
        return project(unit(mean @ x), index, module, method)
    squares = [
        project(principal(x[group == g], scorer.directions), index, module, method).square().sum(dim=0)
        for g in range(inputs.groups)
    ]
    return torch.stack(squares).sqrt()


def score(
    index: WeightIndex, inputs: LayerInputs, scorer: Scorer = DEFAULT_SCORER, background: torch.Tensor | None = None
) -> torch.Tensor:
    """(groups, n): each group's score of every adapter, pooled over its tokens, averaged over the layers each
    adapter targets (only layers present in `inputs` count), divided by `background` (n,) where given."""
    total = torch.zeros(inputs.groups, len(index.ids))
    layers = torch.zeros(len(index.ids))
    for column, module in enumerate(index.modules):
        if module in inputs.x:
            total += group_scores(inputs, index, module, scorer)
            layers += index.present[:, column].float()
    total /= layers.clamp_min(1)
    return total if background is None else total / background.clamp_min(1e-12)


def background_examples(tokenizer, with_targets: bool, sequences: int = 256, seed: int = 0) -> list[Example]:
    """Random token sequences, drawn uniformly from the vocabulary's ids that are not special and that decode
    to text which encodes back to them (a byte tokenizer's lone bytes >= 128 do not), 10-39 input tokens and
    1-7 target tokens: inputs of no task at all. No data is involved. 256 by default: rankings move less
    between draws than with 64 (docs/weights.md has the spread on the demo)."""
    generator = torch.Generator().manual_seed(seed)
    special, verdict = set(tokenizer.all_special_ids), {}

    def usable(token: int) -> bool:
        if token not in verdict:
            text = tokenizer.decode([token])
            verdict[token] = token not in special and tokenizer.encode(text, add_special_tokens=False) == [token]
        return verdict[token]

    def text(low: int, high: int) -> str:
        length, tokens = int(torch.randint(low, high, (1,), generator=generator)), []
        while len(tokens) < length:
            tokens += [t for t in torch.randint(len(tokenizer), (length,), generator=generator).tolist() if usable(t)]
        return tokenizer.decode(tokens[:length])

    return [Example(text(10, 40), text(1, 8) if with_targets else None) for _ in range(sequences)]


def background(
    index: WeightIndex,
    base: BaseModel,
    scorer: Scorer = DEFAULT_SCORER,
    with_targets: bool = True,
    seed: int = 0,
    sequences: int = 256,
) -> torch.Tensor:
    """(n,): every adapter's score on `background_examples`: what it scores on inputs of no task. A query's
    score divided by it is how much more the query engages the adapter than noise does (docs/weights.md)."""
    examples = background_examples(base.tokenizer, with_targets, sequences, seed)
    inputs = capture_layer_inputs(base, examples, index.modules).merged()
    return score(index, inputs, scorer)[0]


def rank(index: WeightIndex, scores: torch.Tensor, k: int) -> list[list[dict]]:
    """Per group, the top k adapters {id, score}, highest first."""
    values, order = torch.topk(scores, min(k, scores.shape[1]), dim=1)
    return [
        [{"id": index.ids[i], "score": round(float(v), 6)} for v, i in zip(vs, os)]
        for vs, os in zip(values.tolist(), order.tolist())
    ]


def _batch(base: BaseModel, examples: Sequence[Example], max_length: int) -> tuple[dict, list[torch.Tensor]]:
    """Model inputs, and the real-token mask of each stream (seq2seq: encoder, decoder; causal: the row).

    Shots with targets are fed as in training (seq2seq: targets teacher-forced into the decoder; causal:
    prompt + target); requests without targets as at the first decoding step."""
    from ..models import encode

    tok = base.tokenizer
    if all(e.target is not None for e in examples):
        batch = encode(base, list(examples), max_input_length=max_length, max_target_length=max_length)
        inputs = dict(batch.inputs)
        if not base.is_seq2seq:
            return inputs, [inputs["attention_mask"].bool()]
        return inputs, [inputs["attention_mask"].bool(), batch.labels != -100]  # position t reads label t - 1
    ids = tok([e.input for e in examples], truncation=True, max_length=max_length)["input_ids"]
    width, pad = max(map(len, ids)), tok.pad_token_id
    if base.is_seq2seq:
        mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in ids])
        inputs = {
            "input_ids": torch.tensor([x + [pad] * (width - len(x)) for x in ids]),
            "attention_mask": mask,
            "decoder_input_ids": torch.full((len(ids), 1), base.model.config.decoder_start_token_id),
        }
        return inputs, [mask.bool(), torch.ones(len(ids), 1, dtype=torch.bool)]
    mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids])
    return {"input_ids": torch.tensor([[pad] * (width - len(x)) + x for x in ids]), "attention_mask": mask}, [
        mask.bool()
    ]


@torch.no_grad()
def capture_layer_inputs(
    base: BaseModel, examples: Sequence[Example], modules: Sequence[str], max_length: int = 512
) -> LayerInputs:
    """One forward pass of the base model over the examples, recording the input of every module in `modules`
    (forward pre-hooks) with pad positions dropped. A module reads the encoder (or prompt) stream or the
    decoder stream; which one is told by its input's length, so the decoder is padded to another length."""
    if not examples:
        raise InputError("no examples to score the adapters with.", "Give at least one shot or input.")
    inputs, streams = _batch(base, examples, max_length)
    if len(streams) == 2 and streams[1].shape[1] == streams[0].shape[1]:
        inputs["decoder_input_ids"] = torch.nn.functional.pad(
            inputs["decoder_input_ids"], (0, 1), value=base.tokenizer.pad_token_id
        )
        streams[1] = torch.nn.functional.pad(streams[1], (0, 1), value=False)
    masks = {mask.shape[1]: mask for mask in streams}
    found: dict[str, torch.Tensor] = {}
    handles = []
    for name in modules:
        try:
            layer = base.model.get_submodule(name)
        except AttributeError:
            raise InputError(
                f"the base model has no module '{name}', which the adapters target.",
                "Score adapters with the base model they were trained on.",
            ) from None
        handles.append(layer.register_forward_pre_hook(lambda _, args, name=name: found.__setitem__(name, args[0])))
    try:
        inputs = {k: v.to(base.device) for k, v in inputs.items()}
        if base.is_seq2seq:
            base.model(**inputs, use_cache=False)
        else:
            position_ids = (inputs["attention_mask"].cumsum(-1) - 1).clamp_min(0)
            base.model(**inputs, position_ids=position_ids, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    x, group = {}, {}
    for name, value in found.items():
        mask = masks.get(value.shape[1])
        if mask is None:
            raise InputError(
                f"module '{name}' read a sequence of {value.shape[1]} positions, the length of neither stream.",
                "Score adapters on the attention and MLP linears of a seq2seq or decoder-only model.",
            )
        rows = torch.arange(mask.shape[0])[:, None].expand_as(mask)
        x[name], group[name] = value[mask.to(value.device)].float().cpu(), rows[mask]
    return LayerInputs(x, group, len(examples))
