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

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from ..errors import InputError
from .adapters import LoraAdapter, check_compatible
from .formulas import FORMULAS

BANK_MODES = ("elementwise", "linear")


class _BankState:
    """The weights and mode of the current forward pass, shared by every BankedLayer."""

    def __init__(self) -> None:
        self.weights: torch.Tensor | None = None  # (P, N)
        self.mode = "elementwise"
        self.used: torch.Tensor | None = None  # (N,) bool: adapters some row weighs; None when all are
        self.grouped: GroupedRows | None = None  # set: the grouped path, with its per-layer cache


class GroupedRows:
    """Each weight vector's nonzero adapters, as indices into the bank's rank columns.

    linear: row p's rank columns `columns[p]` (its adapters' ranges, padded with column 0 at
    scale 0) and the scale w_pi s_i of each; elementwise: its adapters `adapters[p]` (padded
    with adapter 0 at weight 0) and their weights. Padding adds exact zeros.
    """

    def __init__(self, W: torch.Tensor, ranks: list[int], scalings: list[float], mode: str):
        P = W.shape[0]
        nonzero = W.ne(0)
        k = max(int(nonzero.sum(dim=1).max()), 1)
        # The k largest |w| are the nonzero ones (ties among zeros do not matter: they weigh 0).
        order = W.abs().topk(k, dim=1).indices  # (P, k)
        self.mode, self.cache = mode, {}
        weights = W.gather(1, order)  # (P, k)
        if mode == "elementwise":
            self.adapters, self.weights = order, weights
            return
        offsets = torch.tensor([0, *ranks]).cumsum(0).tolist()
        width = max(1, int((nonzero.to(torch.float64) @ torch.tensor(ranks, dtype=torch.float64)).max()))
        columns = torch.zeros(P, width, dtype=torch.long)
        scale = torch.zeros(P, width, dtype=W.dtype, device=W.device)
        for p, (row, row_weights) in enumerate(zip(order.tolist(), weights)):
            at = 0
            for i, w in zip(row, row_weights):
                if w != 0:
                    columns[p, at : at + ranks[i]] = torch.arange(offsets[i], offsets[i + 1])
                    scale[p, at : at + ranks[i]] = w * scalings[i]
                    at += ranks[i]
        self.columns, self.scale = columns.to(W.device), scale

    def compact(self, holes: list[int], movers: list[int], n: int) -> GroupedRows:
        """In place: rows `movers` into rows `holes`, then the first n rows (`compact_rows`)."""
        compact = lambda t: compact_rows(t, holes, movers, n)  # noqa: E731
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
        out.mode = first.mode
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
    """Per-row composition weights W (P, N) with their bank mode and, on the grouped path, each row's
    gathered factors. A decoding loop whose batch changes keeps it across steps and drops (`compact`) or
    appends (`cat`) rows, so factors are gathered once per request, not once per step."""

    def __init__(self, bank: LoraBank, W: torch.Tensor, mode: str, grouped: GroupedRows | None):
        self.bank, self.W, self.mode, self.grouped = bank, W, mode, grouped

    def compact(self, holes: list[int], movers: list[int], n: int) -> BankRows:
        """In place: rows `movers` into rows `holes`, then the first n rows; copies the moved rows only."""
        self.W = compact_rows(self.W, holes, movers, n)
        if self.grouped is not None:
            self.grouped.compact(holes, movers, n)
        return self

    def cat(self, other: BankRows, capacity: int = 0) -> BankRows:
        """The rows of self, then other's; `capacity`: rows to allocate room for (see `append_rows`)."""
        if self.mode != other.mode:
            raise ValueError("rows of two bank modes cannot share a forward pass")
        if (self.grouped is None) != (other.grouped is None):  # one side dense: decide again for the whole batch
            return self.bank.rows(torch.cat([self.W, other.W]), formula=self.mode)  # mode names are formula names
        grouped = None if self.grouped is None else GroupedRows.cat(self.grouped, other.grouped, capacity)
        return BankRows(self.bank, torch.cat([self.W, other.W]), self.mode, grouped)


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
        W = self.state.weights
        if W is None:
            return y
        P, rows = W.shape[0], x.shape[0]
        if rows % P:
            raise InputError(
                f"a batch of {rows} rows cannot be split among {P} weight vectors.",
                "Make the batch P * K rows for P weight vectors (K rows each).",
            )
        dtype = self.lora_A.dtype  # the LoRA path may run in higher precision than the base layer
        W = W.to(dtype)  # (P, N); the cast stays in the autograd graph
        xg = x.to(dtype).reshape(P, -1, x.shape[-1])  # (P, K*T, d_in): the K rows of vector p are contiguous
        if self.state.grouped is not None:
            delta = self._grouped(xg, self.state.grouped)
        elif self.state.mode == "linear":
            delta = self._linear(xg, W)
        else:
            delta = self._elementwise(xg, W)
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

    `formula` is the default for `weights()`: "elementwise" (LoraHub; also fusion, with
    rows of 1/k) or "linear". `lora_dtype`: the dtype of the LoRA path (default: each base
    layer's), e.g. fp32 over a bf16 or int8 base. `share`: the adapters' factors become views into
    the bank's buffers (same values), so they are held once, not twice; where the bank holds them in
    another dtype or device they stay as they are. Call `remove()` to restore the original modules.
    """

    def __init__(
        self,
        model: nn.Module,
        adapters: Sequence[LoraAdapter],
        formula: str = "elementwise",
        lora_dtype: torch.dtype | None = None,
        share: bool = False,
    ):
        check_compatible(adapters)
        self.model = model
        self.names = [a.name for a in adapters]
        self._ranks, self._scalings = [a.r for a in adapters], [a.scaling for a in adapters]
        self._elementwise_ok = len({a.r for a in adapters}) == 1 and len({a.scaling for a in adapters}) == 1
        self.formula = self._mode(formula)
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
        """Whether the elementwise formula is defined: one rank and one scaling for all adapters."""
        return self._elementwise_ok

    def rows(self, W: torch.Tensor, formula: str | None = None, grouped: bool | None = None) -> BankRows:
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
        mode = self._mode(formula or self.formula)
        W = W.to(next(self.model.parameters()).device)  # once here, not in every layer
        if grouped is None:
            grouped = not (W.requires_grad and torch.is_grad_enabled()) and int(W.ne(0).sum(dim=1).max()) <= self.n // 2
        return BankRows(self, W, mode, GroupedRows(W, self._ranks, self._scalings, mode) if grouped else None)

    @contextmanager
    def use(self, rows: BankRows) -> Iterator[None]:
        """Compose with `rows` (from `rows()`, `BankRows.compact` or `BankRows.cat`) inside the context."""
        if not self._originals:
            raise InputError("this bank was removed.", "Build a new LoraBank.")
        W = rows.W
        used = W.ne(0).any(dim=0)
        saved = self._state.weights, self._state.mode, self._state.used, self._state.grouped
        self._state.weights, self._state.mode = W, rows.mode
        # Skipping unweighed adapters is exact for the value, not for the gradient of a zero weight.
        self._state.used = None if bool(used.all()) or W.requires_grad else used
        self._state.grouped = rows.grouped
        try:
            yield
        finally:
            self._state.weights, self._state.mode, self._state.used, self._state.grouped = saved

    @contextmanager
    def weights(self, W: torch.Tensor, formula: str | None = None, grouped: bool | None = None) -> Iterator[None]:
        """Compose with W, shape (P, N) or (N,); `rows()` says what `formula` and `grouped` do."""
        with self.use(self.rows(W, formula, grouped)):
            yield

    def remove(self) -> nn.Module:
        """Put the original modules back and unfreeze what was trainable; returns the model."""
        for module, base in self._originals.items():
            _set_submodule(self.model, module, base)
        for p in self._trainable:
            p.requires_grad_(True)
        self._originals, self._trainable = {}, []
        return self.model

    def _mode(self, formula: str) -> str:
        spec = FORMULAS.get(formula)
        if spec is None or spec.bank_mode not in BANK_MODES:
            bankable = [name for name, f in FORMULAS.items() if f.bank_mode]
            raise InputError(f"the bank cannot evaluate formula '{formula}'.", f"Choose one of: {', '.join(bankable)}.")
        if spec.bank_mode == "elementwise" and not self._elementwise_ok:
            raise InputError(
                f"formula '{formula}' needs adapters of one rank and one scaling.", "Use formula 'linear'."
            )
        return spec.bank_mode

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
