"""The LoRA bank: N candidate adapters injected once into a base model, composed per row.

Every targeted nn.Linear (or GPT-2 Conv1D) is wrapped by a `BankedLayer` that holds the
N adapters' factors side by side and adds, for each batch row b, the delta of the
composition with weights W[g(b)]:

    with bank.weights(W):          # W: (P, N); the batch has P * K rows
        model(**batch)             # rows p*K .. p*K+K-1 use W[p]

so an optimiser's whole population (P weight vectors x K shots) or a batch of mixed
requests runs in one forward pass. No merged d_out x d_in weight and no
rows x tokens x N x d_out tensor is ever built. Gradients flow to W; the base and
adapter weights stay frozen. Without a `weights` context the bank is a no-op.

The bank has two modes (`BANK_MODES`), one per forward pass: "elementwise" (A = sum w_i A_i,
B = sum w_i B_i: LoraHub's formula, and fusion) and "linear" (the sum of the weighted deltas:
mixture); a formula's `bank_mode` (compose/formulas.py) names the mode it runs under. A third,
"arrow", is there once `LoraBank.arrow` gave it the adapters' prototypes: every token of a row is
routed among the row's adapters (its nonzero columns) as PEFT's Arrow does (spectral/arrow.py),
y = W0 x + sum_i p_i(x) s_i B_i A_i x with p the softmax over the top-k |x . v_i|.

Two ways to evaluate a forward pass, chosen per `weights` context:
- dense (`_linear`, `_elementwise`): every row against the factors of every adapter some
  row weighs. Right for a search population, whose vectors weigh all N adapters.
- grouped (`_grouped`, `GroupedRows`): each row gathers the factors of its own nonzero
  adapters (the gather-matmul of Punica's BGMV, with torch ops), so a batch of requests
  that each use k of N adapters costs k, not N, adapters per row. Used when every row
  weighs at most half the bank and no gradient is asked for; the per-row factors are
  gathered once per layer and context and reused by every decoding step.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import NamedTuple

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from ..errors import InputError
from .adapters import LoraAdapter, check_compatible

BANK_MODES = ("elementwise", "linear")
ARROW = "arrow"  # the per-token mode (`LoraBank.arrow`)


class SparseRow(NamedTuple):
    """One row's composition over a bank: its adapters (bank columns) and their weights; every other adapter
    weighs 0. What a request's route gives (routing.Route.row), kept sparse down to the bank."""

    columns: tuple[int, ...]
    weights: tuple[float, ...]


def sparse(W: torch.Tensor) -> list[SparseRow]:
    """The rows of a dense (P, N) weight matrix as SparseRows (their nonzero entries)."""
    entries = W.detach().nonzero().tolist()  # row-major, as W[W != 0] reads
    values = W.detach()[W.detach() != 0].tolist()
    columns: list[list[int]] = [[] for _ in range(W.shape[0])]
    weights: list[list[float]] = [[] for _ in range(W.shape[0])]
    for (row, column), value in zip(entries, values):
        columns[row].append(column)
        weights[row].append(value)
    return [SparseRow(tuple(c), tuple(w)) for c, w in zip(columns, weights)]


def _ordered(row: SparseRow) -> SparseRow:
    """The row's nonzero entries, largest |w| first, ties by column: one order for a row however its weights were
    given (the order of the sums below), and the order `topk` gave when the dense weights were searched for them."""
    entries = sorted(((c, w) for c, w in zip(row.columns, row.weights) if w != 0), key=lambda e: (-abs(e[1]), e[0]))
    return SparseRow(tuple(c for c, _ in entries), tuple(w for _, w in entries))


class _BankState:
    """The rows of the current forward pass (weights, mode, grouped factors), shared by every BankedLayer."""

    def __init__(self) -> None:
        self.rows: BankRows | None = None
        self.used: torch.Tensor | None = None  # (N,) bool: adapters some row weighs; None when all are
        self.arrow: tuple[int, float] | None = None  # Arrow's (top_k, temperature), once prototypes are loaded


class GroupedRows:
    """Each row's nonzero adapters, as indices into the bank's rank columns, built from its SparseRow.

    linear: row p's rank columns `columns[p]` (its adapters' ranges, padded with column 0 at
    scale 0) and the scale w_pi s_i of each; elementwise: its adapters `adapters[p]` (padded
    with adapter 0 at weight 0) and their weights. Padding adds exact zeros. `rows` keeps the
    SparseRows (ordered: `_ordered`), for a batch that must be decided again (`BankRows.cat`).
    """

    def __init__(
        self,
        rows: Sequence[SparseRow],
        ranks: list[int],
        scalings: list[float],
        mode: str,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ):
        self.rows, self.mode, self.cache = [_ordered(r) for r in rows], mode, {}
        P = len(self.rows)
        counts = torch.tensor([len(r.columns) for r in self.rows], dtype=torch.long)  # (P,)
        adapter = torch.tensor([c for r in self.rows for c in r.columns], dtype=torch.long)  # (M,): every entry
        weight = torch.tensor([w for r in self.rows for w in r.weights], dtype=dtype)  # (M,)
        row = torch.repeat_interleave(torch.arange(P), counts)  # (M,): the row of each entry
        first = (torch.cumsum(counts, 0) - counts)[row]  # (M,): the first entry of each entry's row
        if mode == "elementwise":
            slot = torch.arange(len(adapter)) - first  # (M,): the entry's place in its row
            self.adapters = torch.zeros(P, max(int(counts.max()), 1), dtype=torch.long)
            self.weights = torch.zeros(P, max(int(counts.max()), 1), dtype=dtype)
            self.adapters[row, slot], self.weights[row, slot] = adapter, weight
            self.adapters, self.weights = self.adapters.to(device), self.weights.to(device)
            return
        offsets = torch.tensor([0, *ranks]).cumsum(0)  # (N + 1,): adapter i's rank columns are offsets[i]:offsets[i+1]
        rank = torch.tensor(ranks, dtype=torch.long)[adapter]  # (M,)
        before = torch.cumsum(rank, 0) - rank  # (M,): rank columns of all earlier entries
        start = before - before[first]  # (M,): the entry's first place in its row
        of = torch.repeat_interleave(torch.arange(len(adapter)), rank)  # (L,): the entry of each rank column
        within = torch.arange(len(of)) - before[of]  # (L,): its place among its adapter's columns
        width = max(1, int(torch.zeros(P, dtype=torch.long).index_add_(0, row, rank).max()))  # the widest row
        self.columns = torch.zeros(P, width, dtype=torch.long)
        self.scale = torch.zeros(P, width, dtype=dtype)
        scaled = weight * torch.tensor(scalings, dtype=dtype)[adapter]  # (M,): w_pi s_i
        self.columns[row[of], start[of] + within] = offsets[adapter[of]] + within
        self.scale[row[of], start[of] + within] = scaled[of]
        self.columns, self.scale = self.columns.to(device), self.scale.to(device)

    def compact(self, holes: list[int], movers: list[int], n: int) -> GroupedRows:
        """In place: rows `movers` into rows `holes`, then the first n rows (`compact_rows`)."""
        compact = lambda t: compact_rows(t, holes, movers, n)  # noqa: E731
        for hole, mover in zip(holes, movers):
            self.rows[hole] = self.rows[mover]
        del self.rows[n:]
        if self.mode == "elementwise":
            self.adapters, self.weights = compact(self.adapters), compact(self.weights)
        else:
            self.columns, self.scale = compact(self.columns), compact(self.scale)
        self.cache = {layer: (compact(A), compact(B)) for layer, (A, B) in self.cache.items()}
        return self

    @staticmethod
    def cat(first: GroupedRows, second: GroupedRows, capacity: int = 0) -> GroupedRows:
        """The rows of `first`, then those of `second`. Rows are padded to a common width with zero-weighted
        columns (exact zeros); a layer whose factors only one side had gathered is gathered again when used.
        Gathered factors go into spare rows of first's buffers when they fit (`append_rows`)."""
        out = object.__new__(GroupedRows)
        out.mode, out.rows = first.mode, first.rows + second.rows
        if first.mode == "elementwise":
            out.adapters = _cat_padded(first.adapters, second.adapters)
            out.weights = _cat_padded(first.weights, second.weights)
        else:
            out.columns = _cat_padded(first.columns, second.columns)
            out.scale = _cat_padded(first.scale, second.scale)
        out.cache = {
            layer: (_cat_padded(A, second.cache[layer][0], capacity), _cat_padded(B, second.cache[layer][1], capacity))
            for layer, (A, B) in first.cache.items()
            if layer in second.cache
        }
        return out


def _cat_padded(a: torch.Tensor, b: torch.Tensor, capacity: int = 0) -> torch.Tensor:
    """a and b concatenated along dim 0, each zero-padded along dim 1 to the wider of the two."""
    width = max(a.shape[1], b.shape[1])

    def pad(t: torch.Tensor) -> torch.Tensor:
        if t.shape[1] == width:
            return t
        return torch.cat([t, t.new_zeros(t.shape[0], width - t.shape[1], *t.shape[2:])], dim=1)

    return append_rows(pad(a), pad(b), capacity)


def compact_rows(t: torch.Tensor, holes: list[int], movers: list[int], n: int) -> torch.Tensor:
    """Rows `movers` moved into rows `holes` in place, then the first n rows (a view): dropping k rows of a
    batch copies at most k rows, not the batch."""
    if holes:
        t[holes] = t[movers]
    return t[:n]


def append_rows(a: torch.Tensor, b: torch.Tensor, capacity: int = 0) -> torch.Tensor:
    """torch.cat([a, b]) along dim 0, for buffers only the caller holds. When `a` is the first rows of a larger
    contiguous allocation (what this function and an in-place compaction leave), b is written into the spare
    rows and nothing is copied; else the result gets an allocation of `capacity` rows (at least n + m), so
    the next appends copy only what they add."""
    n, m = a.shape[0], b.shape[0]
    shape = (n + m, *a.shape[1:])
    if (
        a.is_contiguous()
        and a.storage_offset() == 0
        and a.dtype == b.dtype
        and math.prod(shape) * a.element_size() <= a.untyped_storage().nbytes()
    ):
        out = a.new_empty(0).set_(a.untyped_storage(), 0, shape)
        out[n:] = b
        return out
    out = a.new_empty((max(capacity, n + m), *a.shape[1:]))
    out[:n], out[n : n + m] = a, b
    return out[: n + m]


class BankRows:
    """Per-row composition weights with their bank mode: dense, W (P, N) (a search population, with
    gradients), or grouped (`GroupedRows`: each row's own adapters and, once gathered, their factors).
    A decoding loop whose batch changes keeps it across steps and drops (`compact`) or appends (`cat`)
    rows, so factors are gathered once per request, not once per step."""

    def __init__(self, bank: LoraBank, mode: str, W: torch.Tensor | None = None, grouped: GroupedRows | None = None):
        assert (W is None) != (grouped is None), "dense or grouped"
        self.bank, self.mode, self.W, self.grouped = bank, mode, W, grouped

    @property
    def size(self) -> int:
        """P: the number of rows (weight vectors)."""
        return len(self.grouped.rows) if self.grouped is not None else self.W.shape[0]

    def sparse(self) -> list[SparseRow]:
        return self.grouped.rows if self.grouped is not None else sparse(self.W)

    def compact(self, holes: list[int], movers: list[int], n: int) -> BankRows:
        """In place: rows `movers` into rows `holes`, then the first n rows; copies the moved rows only."""
        if self.grouped is not None:
            self.grouped.compact(holes, movers, n)
        else:
            self.W = compact_rows(self.W, holes, movers, n)
        return self

    def cat(self, other: BankRows, capacity: int = 0) -> BankRows:
        """The rows of self, then other's; `capacity`: rows to allocate room for (see `append_rows`)."""
        if self.mode != other.mode:
            raise ValueError("rows of two bank modes cannot share a forward pass")
        if (self.grouped is None) != (other.grouped is None):  # one side dense: decide again for the whole batch
            return self.bank.sparse_rows(self.sparse() + other.sparse(), mode=self.mode)
        if self.grouped is not None:
            return BankRows(self.bank, self.mode, grouped=GroupedRows.cat(self.grouped, other.grouped, capacity))
        return BankRows(self.bank, self.mode, W=torch.cat([self.W, other.W]))


class BankedLayer(nn.Module):
    """A frozen base layer plus N LoRA adapters evaluated under per-row weights."""

    def __init__(self, base: nn.Module, As, Bs, scalings, state: _BankState, lora_dtype: torch.dtype | None = None):
        super().__init__()
        self.base = base
        self.state = state
        ref = {"device": base.weight.device, "dtype": lora_dtype or base.weight.dtype}  # of the factors
        ranks = [a.shape[0] for a in As]
        # Factors side by side: the linear mode needs the concatenation, the elementwise
        # mode views it as (N, r, ...) when all ranks are equal.
        self.register_buffer("lora_A", torch.cat(list(As)).to(**ref), persistent=False)  # (R, d_in)
        self.register_buffer("lora_B", torch.cat(list(Bs), dim=1).to(**ref), persistent=False)  # (d_out, R)
        owner = torch.repeat_interleave(torch.arange(len(As)), torch.tensor(ranks))  # (R,): adapter of each rank column
        self.register_buffer("owner", owner.to(ref["device"]), persistent=False)
        col_scaling = torch.tensor(scalings, dtype=torch.float32)[owner]  # (R,): s_i of each rank column
        self.register_buffer("col_scaling", col_scaling.to(**ref), persistent=False)
        self.n, self.rank = len(As), ranks[0] if len(set(ranks)) == 1 else None

    # Some transformers code reads `.weight` / `.bias` of the layers it built (dtype probes, init).
    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        bank_rows = self.state.rows
        if bank_rows is None:
            return y
        P, rows = bank_rows.size, x.shape[0]
        if rows % P:
            raise InputError(
                f"a batch of {rows} rows cannot be split among {P} weight vectors.",
                "Make the batch P * K rows for P weight vectors (K rows each).",
            )
        dtype = self.lora_A.dtype  # the LoRA path may run in higher precision than the base layer
        xg = x.to(dtype).reshape(P, -1, x.shape[-1])  # (P, K*T, d_in): the K rows of vector p are contiguous
        if bank_rows.grouped is not None:
            delta = self._grouped(xg, bank_rows.grouped)
        elif bank_rows.mode == ARROW:
            delta = self._arrow(xg, bank_rows.W != 0)
        elif bank_rows.mode == "linear":
            delta = self._linear(xg, bank_rows.W.to(dtype))  # (P, N); the cast stays in the autograd graph
        else:
            delta = self._elementwise(xg, bank_rows.W.to(dtype))
        return y + delta.reshape(*y.shape[:-1], -1).to(y.dtype)  # (rows, ..., d_out)

    def _linear(self, xg: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
        # y_p = sum_i w_pi s_i (x A_i^T) B_i^T: one rank-R LoRA whose middle is scaled per row.
        A, B, owner, scaling = self.lora_A, self.lora_B, self.owner, self.col_scaling
        if self.state.used is not None:
            # Mixed requests weigh a few of many adapters: an adapter no row uses adds exactly 0, so skip its columns.
            keep = self.state.used[owner]  # (R,)
            A, B, owner, scaling = A[keep], B[:, keep], owner[keep], scaling[keep]
        h = xg @ A.T  # (P, K*T, R)
        g = W[:, owner] * scaling  # (P, R): w_pi s_i on adapter i's rank columns
        return (h * g[:, None, :]) @ B.T  # (P, K*T, R) @ (R, d_out) -> (P, K*T, d_out)

    def _arrow(self, xg: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        # Per token, Arrow's coefficients p over the row's allowed adapters (P, N), then the linear mode's
        # product with per-token column weights: (x A_cat^T * p[owner] s) B_cat^T.
        from ..spectral.arrow import coefficients

        top_k, temperature = self.state.arrow
        tokens = xg.reshape(-1, xg.shape[-1])  # (P * K*T, d_in)
        p = coefficients(tokens, self.prototypes, top_k, temperature, allowed.repeat_interleave(xg.shape[1], dim=0))
        h = tokens @ self.lora_A.T  # (P * K*T, R)
        return ((h * (p[:, self.owner] * self.col_scaling)) @ self.lora_B.T).view(*xg.shape[:2], -1)

    def _grouped(self, xg: torch.Tensor, rows: GroupedRows) -> torch.Tensor:
        # Per weight vector p, factors of its own adapters only: delta_p = (x A_p^T) B_p^T with
        # linear: A_p = its rank columns of A_cat, B_p = those of B_cat scaled by w_pi s_i (rank sum r_i);
        # elementwise: A_p = sum_i w_pi A_i, B_p = s sum_i w_pi B_i (rank r). Gathered once per context.
        factors = rows.cache.get(id(self))
        if factors is None:
            if rows.mode == "linear":
                A_p = self.lora_A[rows.columns]  # (P, L, d_in)
                B_p = self.lora_B.T[rows.columns] * rows.scale.to(xg.dtype)[..., None]  # (P, L, d_out)
            else:
                w = rows.weights.to(xg.dtype)[..., None, None]  # (P, k, 1, 1)
                A_p = (self.lora_A.view(self.n, self.rank, -1)[rows.adapters] * w).sum(1)  # (P, r, d_in)
                B_all = self.lora_B.T.reshape(self.n, self.rank, -1)  # (N, r, d_out)
                B_p = (B_all[rows.adapters] * (w * self.col_scaling[0])).sum(1)  # (P, r, d_out)
            factors = rows.cache[id(self)] = (A_p, B_p)
        A_p, B_p = factors
        return torch.bmm(torch.bmm(xg, A_p.transpose(1, 2)), B_p)  # (P, K*T, L) -> (P, K*T, d_out)

    def _elementwise(self, xg: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
        # Merging the rank-r factors per weight vector costs P (r d_in + r d_out) and is N
        # times cheaper per token than the x A_cat^T route of the identity in docs/composition.md.
        A = self.lora_A.view(self.n, self.rank, -1)  # (N, r, d_in)
        B = self.lora_B.view(-1, self.n, self.rank)  # (d_out, N, r)
        A_p = torch.einsum("pn,nrd->prd", W, A)  # (P, r, d_in): sum_i w_pi A_i
        B_p = torch.einsum("pn,onr->por", W * self.col_scaling[0], B)  # (P, d_out, r): s sum_i w_pi B_i
        z = xg @ A_p.transpose(1, 2)  # (P, K*T, r)
        return z @ B_p.transpose(1, 2)  # (P, K*T, d_out)


class LoraBank:
    """N adapters injected into `model` in place; see the module docstring.

    `mode` is the default for `weights()`: "elementwise" (A = sum w_i A_i, B = sum w_i B_i: LoraHub's
    formula, and fusion with rows of 1/k) or "linear" (the weighted sum of the deltas: mixture); a
    formula's `bank_mode` names the one it runs under. `lora_dtype`: the dtype of the LoRA path (default:
    each base layer's), e.g. fp32 over a bf16 or int8 base. `share`: the adapters' factors become views into
    the bank's buffers (same values), so they are held once, not twice; where the bank holds them in another
    dtype or device they stay as they are. Call `remove()` to restore the original modules.
    """

    def __init__(
        self,
        model: nn.Module,
        adapters: Sequence[LoraAdapter],
        mode: str = "elementwise",
        lora_dtype: torch.dtype | None = None,
        share: bool = False,
    ):
        check_compatible(adapters)
        self.model = model
        self.names = [a.name for a in adapters]
        self._ranks, self._scalings = [a.r for a in adapters], [a.scaling for a in adapters]
        self._elementwise_ok = len({a.r for a in adapters}) == 1 and len({a.scaling for a in adapters}) == 1
        self.mode = self._check_mode(mode)
        targets = {module: self._target(model, module, adapters[0]) for module in adapters[0].modules}
        # Everything is checked; from here on the model is modified.
        self._state = _BankState()
        self._trainable = [p for p in model.parameters() if p.requires_grad]
        model.requires_grad_(False)
        self._originals: dict[str, nn.Module] = {}
        for module, base in targets.items():
            As = [a.modules[module][0] for a in adapters]
            Bs = [a.modules[module][1] for a in adapters]
            layer = BankedLayer(base, As, Bs, [a.scaling for a in adapters], self._state, lora_dtype)
            _set_submodule(model, module, layer)
            self._originals[module] = base
            if share:
                _point_into(layer, adapters, module)

    @property
    def n(self) -> int:
        return len(self.names)

    @property
    def elementwise_ok(self) -> bool:
        """Whether mode elementwise is defined: one rank and one scaling for all adapters."""
        return self._elementwise_ok

    def rows(self, W: torch.Tensor, mode: str | None = None, grouped: bool | None = None) -> BankRows:
        """W (shape (P, N), or (N,) for one vector for the whole batch) checked and ready to compose with:
        `use(rows)` runs under it. `grouped`: each row computes only its own adapters (None: when every row
        weighs at most half the bank and W needs no gradient; see the module docstring)."""
        W = W if torch.is_tensor(W) else torch.as_tensor(W, dtype=torch.float32)
        W = W.unsqueeze(0) if W.ndim == 1 else W
        if W.ndim != 2 or W.shape[1] != self.n or not W.is_floating_point():
            raise InputError(
                f"weights of shape {tuple(W.shape)} do not fit a bank of {self.n} adapters.",
                f"Give a float tensor of shape (P, {self.n}).",
            )
        mode = self._check_mode(mode or self.mode)
        W = W.to(self._device)  # once here, not in every layer
        if mode == ARROW:
            grouped = False  # a row's candidates, routed per token
        if grouped is None:
            grouped = not (W.requires_grad and torch.is_grad_enabled()) and int(W.ne(0).sum(dim=1).max()) <= self.n // 2
        if grouped:
            rows = GroupedRows(sparse(W), self._ranks, self._scalings, mode, dtype=W.dtype, device=W.device)
            return BankRows(self, mode, grouped=rows)
        return BankRows(self, mode, W=W)

    def sparse_rows(self, rows: Sequence[SparseRow], mode: str | None = None, grouped: bool | None = None) -> BankRows:
        """One SparseRow per row (float32 weights), checked and ready to compose with, as `rows()` but never
        dense on the way: the (P, N) matrix is built only for the dense path (a row weighs more than half the bank)."""
        mode = self._check_mode(mode or self.mode)
        for row in rows:
            if len(row.columns) != len(row.weights):
                raise InputError(
                    f"a row has {len(row.columns)} columns and {len(row.weights)} weights.",
                    "Give one weight per column.",
                )
            if len(set(row.columns)) < len(row.columns) or any(not 0 <= c < self.n for c in row.columns):
                raise InputError(
                    f"a row names the columns {list(row.columns)}, not distinct ones of 0..{self.n - 1}.",
                    "Name each of the bank's adapters at most once.",
                )
        if mode == ARROW:
            grouped = False  # a row's candidates, routed per token
        if grouped is None:
            grouped = max(sum(w != 0 for w in r.weights) for r in rows) <= self.n // 2
        if grouped:
            return BankRows(
                self, mode, grouped=GroupedRows(rows, self._ranks, self._scalings, mode, device=self._device)
            )
        W = torch.zeros(len(rows), self.n)
        W[[p for p, r in enumerate(rows) for _ in r.columns], [c for r in rows for c in r.columns]] = torch.tensor(
            [w for r in rows for w in r.weights], dtype=torch.float32
        )
        return BankRows(self, mode, W=W.to(self._device))

    @property
    def _device(self) -> torch.device:
        return next(self.model.parameters()).device

    @contextmanager
    def use(self, rows: BankRows) -> Iterator[None]:
        """Compose with `rows` (from `rows()`, `sparse_rows()`, `BankRows.compact` or `BankRows.cat`) inside the
        context."""
        if not self._originals:
            raise InputError("this bank was removed.", "Build a new LoraBank.")
        used = None
        if rows.W is not None:
            used = rows.W.ne(0).any(dim=0)
            # Skipping unweighed adapters is exact for the value, not for the gradient of a zero weight.
            used = None if bool(used.all()) or rows.W.requires_grad else used
        saved = self._state.rows, self._state.used
        self._state.rows, self._state.used = rows, used
        try:
            yield
        finally:
            self._state.rows, self._state.used = saved

    @contextmanager
    def weights(self, W: torch.Tensor, mode: str | None = None, grouped: bool | None = None) -> Iterator[None]:
        """Compose with W, shape (P, N) or (N,); `rows()` says what `mode` and `grouped` do."""
        with self.use(self.rows(W, mode, grouped)):
            yield

    def arrow(self, prototypes: dict[str, torch.Tensor], top_k: int, temperature: float) -> None:
        """Give the bank mode "arrow": prototypes[module] (N, d_in) are the adapters' unit top right singular
        vectors in bank order (their weight cards'), top_k and temperature PEFT's ArrowConfig's. The adapters
        must meet Arrow's constraints (spectral.arrow.check_arrow: one rank, the same modules)."""
        if len(set(self._ranks)) > 1:
            raise InputError("Arrow routing needs adapters of one rank.", "Route between adapters of one rank.")
        for module, layer in self._layers().items():
            layer.register_buffer(
                "prototypes", prototypes[module].to(device=layer.lora_A.device, dtype=layer.lora_A.dtype), False
            )
        self._state.arrow = (top_k, temperature)

    def _layers(self) -> dict[str, BankedLayer]:
        return {module: self.model.get_submodule(module) for module in self._originals}

    def remove(self) -> nn.Module:
        """Put the original modules back and unfreeze what was trainable; returns the model."""
        for module, base in self._originals.items():
            _set_submodule(self.model, module, base)
        for p in self._trainable:
            p.requires_grad_(True)
        self._originals, self._trainable = {}, []
        return self.model

    def _check_mode(self, mode: str) -> str:
        if mode == ARROW:
            if self._state.arrow is None:
                raise InputError("this bank has no Arrow prototypes.", "Load them with LoraBank.arrow(...).")
            return mode
        if mode not in BANK_MODES:
            raise InputError(
                f"the bank cannot evaluate '{mode}': its modes are {' and '.join(BANK_MODES)}.",
                "Give a formula's bank mode (compose.formulas.FORMULAS[name].bank_mode).",
            )
        if mode == "elementwise" and not self._elementwise_ok:
            raise InputError("mode 'elementwise' needs adapters of one rank and one scaling.", "Use mode 'linear'.")
        return mode

    @staticmethod
    def _target(model: nn.Module, module: str, adapter: LoraAdapter) -> nn.Module:
        try:
            base = model.get_submodule(module)
        except AttributeError:
            raise InputError(
                f"adapter '{adapter.name}' targets '{module}', which the base model does not have.",
                f"Load the base model the adapter was trained on ({adapter.base_model_name_or_path}).",
            ) from None
        if isinstance(base, nn.Linear):
            d_in, d_out = base.in_features, base.out_features
        elif isinstance(base, Conv1D):
            d_in, d_out = base.weight.shape  # Conv1D stores (d_in, d_out)
        else:
            raise InputError(
                f"module '{module}' is a {type(base).__name__}; the bank supports nn.Linear and Conv1D.",
                "Choose adapters that target linear layers.",
            )
        A, B = adapter.modules[module]
        if (A.shape[1], B.shape[0]) != (d_in, d_out):
            raise InputError(
                f"adapter '{adapter.name}' module '{module}' is {A.shape[1]} -> {B.shape[0]} "
                f"but the base model's layer is {d_in} -> {d_out}.",
                f"Load the base model the adapter was trained on ({adapter.base_model_name_or_path}).",
            )
        return base


def _point_into(layer: BankedLayer, adapters: Sequence[LoraAdapter], module: str) -> None:
    """Each adapter's (A, B) of `module` replaced by its slice of the layer's concatenated buffers, where the
    values are the same tensors' (same dtype and device): the loaded copies are then freed."""
    offset = 0
    for adapter in adapters:
        A, B = adapter.modules[module]
        r = A.shape[0]
        same = (A.dtype, A.device, B.dtype, B.device) == (layer.lora_A.dtype, layer.lora_A.device) * 2
        if same:
            adapter.modules[module] = (layer.lora_A[offset : offset + r], layer.lora_B[:, offset : offset + r])
        offset += r


def _set_submodule(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, child = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)
