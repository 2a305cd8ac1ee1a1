"""Ranking adapters from their weights: the inputs each targeted layer sees, scored against every adapter.

For layer l, token input x (d_in) and adapter i with top right singular vector v_i and leading scaled right
singular vectors diag(S_i) V_i^T (m x d_in, the weight card's m directions):

    Arrow   a_il(x) = |x^ . v_i|             (|cos|: v_i is a unit vector)
    SpectR  p_il(x) = |diag(S_i) V_i^T x^|   (the norm of the delta's output along its m leading directions)

where x^ is the input made ready for scoring: x less the background's mean and its `shared` leading principal
directions (what every input has, task or not: Mu & Viswanath's "all-but-the-top"), then unit length.
Both are one matrix product per layer against a stacked matrix: P_l (n x d_in) for Arrow, R_l (n m x d_in)
for SpectR, whose rows i m .. i m + m - 1 are adapter i's (zero rows where an adapter has fewer or does not
target the layer). Scores are then pooled over a group's (a shot set's, a request's) tokens:

    tokens    score_il = mean_t a_il(x_t)                     (Arrow's per-token view)
    rms       score_il = sqrt(mean_t a_il(x_t)^2)             (exactly one product with the query's
              principal directions; `directions` keeps the top few, an approximation that is cheaper at scale)
    centroid  score_il = a_il(c_l), c_l = mean_t x^_t         (one product row per group)

and calibrated against the same score on a background of random token sequences, b_il:

    layer (default)  score_i = mean_l score_il / b_il   over the layers adapter i targets (each layer counts alike)
    total            score_i = (mean_l score_il) / (mean_l b_il)

(docs/weights.md: without the background a few adapters whose directions the base model's inputs always
align with rank first for every query).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import InputError
from ..io import Example
from ..models import BaseModel
from ..settings import WEIGHTS
from .card import load_checked, prototype

METHODS = ("arrow", "spectr")
POOLS = ("tokens", "rms", "centroid")
CALIBRATIONS = ("layer", "total")
MAX_SHARED = 4  # background directions a Background keeps: the most any scorer may remove
CONSTANT_TOLERANCE = 1e-5  # a module whose background inputs all lie this close (relative) to their mean is constant


@dataclass(frozen=True)
class Scorer:
    """How a token is scored (`method`), how a group's tokens are pooled (`pool`; for rms, how many of the
    query's principal directions are kept, `directions`, None: all, exact), how many of the background's
    principal directions are removed from every input with its mean (`shared`, None: inputs as they are) and
    how the layers' scores are calibrated against the background's (`calibration`)."""

    method: str
    pool: str
    directions: int | None = None
    shared: int | None = None
    calibration: str = "layer"

    def __post_init__(self):
        if self.method not in METHODS or self.pool not in POOLS or self.calibration not in CALIBRATIONS:
            raise InputError(
                f"unknown weight score '{self.method}' / pooling '{self.pool}' / calibration '{self.calibration}'.",
                f"Use one of {', '.join(METHODS)}, one of {', '.join(POOLS)} and one of {', '.join(CALIBRATIONS)}.",
            )
        if self.directions is not None and (self.pool != "rms" or self.directions < 1):
            raise InputError(
                f"directions = {self.directions} with pooling '{self.pool}'.",
                "Keep directions (1 or more) for rms pooling only.",
            )
        if self.shared is not None and not 0 <= self.shared <= MAX_SHARED:
            raise InputError(
                f"shared = {self.shared}: the background keeps {MAX_SHARED} directions.",
                f"Remove 0 to {MAX_SHARED} of them (or none at all: shared None).",
            )

    @property
    def name(self) -> str:
        """e.g. spectr-rms/16-s1: SpectR, rms over 16 directions, inputs less the background's mean and first
        direction; "-total" marks the total calibration."""
        return (
            f"{self.method}-{self.pool}"
            + (f"/{self.directions}" if self.directions else "")
            + (f"-s{self.shared}" if self.shared is not None else "")
            + ("-total" if self.calibration == "total" else "")
        )


DEFAULT_SCORER = Scorer(**WEIGHTS["scorer"])
"""Chosen on two demo libraries by the rule in docs/weights.md (the best worst case of the two)."""
SHORTLIST_SCORER = Scorer(**WEIGHTS["shortlist_scorer"])
"""The first stage over every adapter of a large registry: one product row per module (docs/weights.md)."""


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

    def subset(self, positions: torch.Tensor, prototypes: bool = True, spectra: bool = True) -> WeightIndex:
        """The index of the adapters at `positions` (a shortlist to re-rank with a costlier score); a scorer
        reads only one of the stacks (Arrow the prototypes, SpectR the spectra), so the other may be left out."""
        rows = (positions[:, None] * self.rank + torch.arange(self.rank)).reshape(-1)
        return WeightIndex(
            [self.ids[i] for i in positions.tolist()],
            self.modules,
            self.rank,
            {m: p[positions] for m, p in self.prototypes.items()} if prototypes else {},
            {m: s.index_select(0, rows) for m, s in self.spectra.items()} if spectra else {},
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


@dataclass
class Background:
    """Inputs of no task (`background_examples`), summarised per module: the mean of their layer inputs and
    the leading principal directions of those inputs less the mean, which scorers with `shared` remove from
    every input before scoring; `inputs` are the inputs themselves (kept to score adapters on them)."""

    mean: dict[str, torch.Tensor]  # module -> (d_in,)
    directions: dict[str, torch.Tensor]  # module -> (MAX_SHARED, d_in), orthonormal rows (fewer when d_in is small)
    inputs: LayerInputs | None = None
    # Modules whose input is the same for every background sequence (a seq2seq decoder's first layers fed only
    # the start token, as a request is): they see nothing of a task, and less their mean they are float noise,
    # so `score` leaves them out.
    constant: set[str] = field(default_factory=set)

    @classmethod
    def of(cls, inputs: LayerInputs) -> Background:
        mean, directions, constant = {}, {}, set()
        for module, x in inputs.x.items():
            x = x.double()
            mean[module] = x.mean(dim=0)
            spread = float((x - mean[module]).norm(dim=1).max()) if x.shape[0] else 0.0
            if spread <= CONSTANT_TOLERANCE * max(float(mean[module].norm()), 1e-30):
                constant.add(module)
            _, _, Vh = torch.linalg.svd(x - mean[module], full_matrices=False)
            mean[module], directions[module] = mean[module].float(), Vh[:MAX_SHARED].float()
        return cls(mean, directions, inputs, constant)

    def prepare(self, x: torch.Tensor, module: str, shared: int | None) -> torch.Tensor:
        """Token inputs (N, d_in) as `score` uses them: less the mean and the first `shared` directions."""
        if shared is None:
            return unit(x)
        x = x - self.mean[module]
        P = self.directions[module][:shared]
        return unit(x - (x @ P.T) @ P)


def project(rows: torch.Tensor, index: WeightIndex, module: str, method: str) -> torch.Tensor:
    """(m, n): |row . v_i| (Arrow) or |diag(S_i) V_i^T row| (SpectR) for every row and adapter at one module:
    one matrix product against the stacked (n x d_in) or (n m x d_in) matrix."""
    if method == "arrow":
        stack = index.prototypes[module]
        return (rows.to(stack.dtype) @ stack.T).float().abs()
    stack = index.spectra[module]
    return (rows.to(stack.dtype) @ stack.T).float().view(rows.shape[0], len(index.ids), index.rank).norm(dim=-1)


def principal(x: torch.Tensor, directions: int | None) -> torch.Tensor:
    """Rows Z with sum over Z's rows of (z . w)^2 = mean_t (x_t . w)^2 for every w: x / sqrt(N) itself, or
    (directions given) the top `directions` right singular vectors of x / sqrt(N) scaled by their values."""
    x = x / x.shape[0] ** 0.5
    if directions is None or directions >= min(x.shape):
        return x
    # The eigenvectors of x^T x (d_in x d_in, float64) are x's right singular vectors, its eigenvalues S^2: half
    # the time of an SVD of the (tokens x d_in) x, which a ranking pays once per module.
    values, vectors = torch.linalg.eigh(x.double().T @ x.double())
    top = values.flip(0)[:directions].clamp_min(0).sqrt()
    return (top[:, None] * vectors.flip(1)[:, :directions].T).to(x.dtype)


def group_scores(
    inputs: LayerInputs, index: WeightIndex, module: str, scorer: Scorer, background: Background | None = None
) -> torch.Tensor:
    """(groups, n): one module's scores, pooled over each group's tokens."""
    method = scorer.method
    x = inputs.x[module].float()
    x = unit(x) if background is None else background.prepare(x, module, scorer.shared)
    group = inputs.group[module]
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


def layer_scores(
    index: WeightIndex, inputs: LayerInputs, scorer: Scorer, background: Background | None = None
) -> torch.Tensor:
    """(L, groups, n): every module's pooled scores (L: the index's modules; 0 where `inputs` lack one).
    Inputs are prepared by `background` (`Background.prepare`) when given, else only made unit length."""
    if scorer.shared is not None and background is None:
        raise InputError(f"scorer {scorer.name} removes background directions; none was given.", "Pass one.")
    out = torch.zeros(len(index.modules), inputs.groups, len(index.ids))
    for row, module in enumerate(index.modules):
        if module in inputs.x:
            out[row] = group_scores(inputs, index, module, scorer, background)
    return out


def score(
    index: WeightIndex,
    inputs: LayerInputs,
    scorer: Scorer = DEFAULT_SCORER,
    background: Background | None = None,
    reference: torch.Tensor | None = None,
) -> torch.Tensor:
    """(groups, n): each group's score of every adapter over the layers it targets (and `inputs` reached, and
    the background does not find constant):
    calibrated against `reference` (L, n), the adapters' `layer_scores` on the background, as the scorer says,
    or (no reference) their mean."""
    skipped = background.constant if background is not None else set()
    reached = torch.tensor([m in inputs.x and m not in skipped for m in index.modules])
    layers = (index.present & reached[None, :]).T.float()  # (L, n)
    values = layer_scores(index, inputs, scorer, background)  # (L, groups, n)
    count = layers.sum(dim=0).clamp_min(1)  # (n,)
    if reference is None:
        return (values * layers[:, None]).sum(dim=0) / count
    reference = reference.clamp_min(1e-12)
    if scorer.calibration == "layer":
        return (values / reference[:, None] * layers[:, None]).sum(dim=0) / count
    return (values * layers[:, None]).sum(dim=0) / (reference * layers).sum(dim=0).clamp_min(1e-12)


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
    base: BaseModel, modules: Sequence[str], with_targets: bool = True, seed: int = 0, sequences: int = 256
) -> Background:
    """The background of a base model at `modules`: one forward pass over `background_examples`."""
    examples = background_examples(base.tokenizer, with_targets, sequences, seed)
    return Background.of(capture_layer_inputs(base, examples, modules).merged())


def reference(index: WeightIndex, background: Background, scorer: Scorer = DEFAULT_SCORER) -> torch.Tensor:
    """(L, n): every adapter's layer scores on the background: what it scores on inputs of no task. A query's
    score divided by it is how much more the query engages the adapter than noise does (docs/weights.md)."""
    return layer_scores(index, background.inputs, scorer, background)[:, 0]


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
