"""Composition formulas: pure tensor functions from N LoRA factor pairs and N weights to one.

Notation as in docs/composition.md: module i has A_i (r_i x d_in), B_i (d_out x r_i) and
scaling s_i; its delta is s_i B_i A_i (d_out x d_in). Every formula returns the factors
of the composed LoRA and the scaling its exported config must reproduce.

Formulas are registered by name in FORMULAS: the CLI's `--formula` choices and the
tests' parameter matrix read that dict.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from ..errors import InputError
from .adapters import LoraAdapter, check_compatible


class LoraFactors(NamedTuple):
    A: torch.Tensor  # (r, d_in)
    B: torch.Tensor  # (d_out, r)
    scaling: float  # delta = scaling * B @ A


@dataclass(frozen=True)
class Formula:
    name: str
    merge: Callable[..., LoraFactors]  # (As, Bs, scalings, weights, **options) -> LoraFactors
    summary: str
    same_rank: bool = False  # all modules must share r
    same_scaling: bool = False  # ... and lora_alpha / r
    bank_mode: str | None = None  # how LoraBank evaluates it per row; None: fixed-weight merge only
    fixed_weights: bool = False  # the formula sets the weights itself (fusion: 1/k)
    options: dict[str, object] = field(default_factory=dict)  # name -> default (None: required)


FORMULAS: dict[str, Formula] = {}


def register(name: str, summary: str, **spec) -> Callable:
    def decorate(merge: Callable[..., LoraFactors]) -> Callable[..., LoraFactors]:
        FORMULAS[name] = Formula(name=name, merge=merge, summary=summary, **spec)
        return merge

    return decorate


def _stack(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    # Merge in at least float32: bf16 sums of 20 modules lose digits the export keeps.
    dtype = torch.promote_types(tensors[0].dtype, torch.float32)
    return torch.stack([t.to(dtype) for t in tensors])


@register(
    "elementwise",
    "LoraHub: A = sum w_i A_i, B = sum w_i B_i, delta = s B A (quadratic in w).",
    same_rank=True,
    same_scaling=True,
    bank_mode="elementwise",
)
def elementwise(As, Bs, scalings, weights) -> LoraFactors:
    """A = sum_i w_i A_i, B = sum_i w_i B_i, delta = s B A with the shared scaling s.

    Quadratic in w: the delta holds cross terms w_i w_j B_i A_j. Needs equal ranks.
    """
    if any(s != scalings[0] for s in scalings):
        raise ValueError(f"elementwise needs one shared scaling, got {list(scalings)}")
    A, B = _stack(As), _stack(Bs)  # (N, r, d_in), (N, d_out, r)
    w = weights.to(A.dtype)  # (N,)
    return LoraFactors(
        torch.einsum("n,nrd->rd", w, A),  # (r, d_in)
        torch.einsum("n,nor->or", w, B),  # (d_out, r)
        scalings[0],
    )


@register(
    "linear",
    "Weighted sum of deltas: delta = sum w_i s_i B_i A_i, exported at rank sum r_i.",
    bank_mode="linear",
)
def linear(As, Bs, scalings, weights) -> LoraFactors:
    """delta = sum_i w_i s_i B_i A_i, exactly, as one LoRA of rank R = sum_i r_i:
    A_cat = [A_1; ...; A_N] (R x d_in), B_cat = [w_1 s_1 B_1, ..., w_N s_N B_N] (d_out x R),
    scaling 1 (the exported config sets lora_alpha = R). Ranks may differ.
    """
    dtype = torch.promote_types(As[0].dtype, torch.float32)
    w = weights.to(dtype)
    A = torch.cat([a.to(dtype) for a in As], dim=0)  # (R, d_in)
    B = torch.cat([w[i] * s * b.to(dtype) for i, (b, s) in enumerate(zip(Bs, scalings))], dim=1)  # (d_out, R)
    return LoraFactors(A, B, 1.0)


@register(
    "fusion",
    "LoraRetriever's fusion: elementwise with w_i = 1/k over the k modules.",
    same_rank=True,
    same_scaling=True,
    bank_mode="elementwise",
    fixed_weights=True,
)
def fusion(As, Bs, scalings, weights=None) -> LoraFactors:
    """elementwise with w_i = 1/k: A = mean_i A_i, B = mean_i B_i, delta = s B A."""
    k = len(As)
    return elementwise(As, Bs, scalings, torch.full((k,), 1.0 / k, dtype=torch.float64))


def _peft_factor_weights(weights, scalings) -> tuple[torch.Tensor, torch.Tensor]:
    # What PEFT's add_weighted_adapter does for linear/ties/dare: A_i gets sign(w_i s_i)
    # sqrt|w_i s_i| and B_i gets sqrt|w_i s_i|, so that one module alone keeps w_i s_i B_i A_i.
    ws = weights.double() * torch.tensor(scalings, dtype=torch.float64)  # (N,)
    root = ws.abs().sqrt()
    return torch.where(ws >= 0, root, -root), root


@register(
    "ties",
    "PEFT's ties on A and B separately (sqrt(w s) on each factor), exported at rank r.",
    same_rank=True,
    options={"density": None, "majority_sign_method": "total"},
)
def ties(As, Bs, scalings, weights, *, density, majority_sign_method="total") -> LoraFactors:
    """PEFT add_weighted_adapter(combination_type="ties"): A = ties(A_i, sign(w_i s_i) sqrt|w_i s_i|),
    B = ties(B_i, sqrt|w_i s_i|) with PEFT's merge_utils.ties (trim to `density`, elect sign,
    disjoint mean); scaling 1."""
    from peft.utils import merge_utils  # only the three PEFT formulas need peft, which takes seconds to import

    wA, wB = _peft_factor_weights(weights, scalings)
    A, B = _stack(As), _stack(Bs)  # (N, r, d_in), (N, d_out, r)
    return LoraFactors(
        merge_utils.ties(list(A), wA.to(A.dtype), density, majority_sign_method),  # (r, d_in)
        merge_utils.ties(list(B), wB.to(B.dtype), density, majority_sign_method),  # (d_out, r)
        1.0,
    )


@register(
    "dare_linear",
    "PEFT's dare_linear on A and B separately (random drop at 1 - density, rescale), rank r.",
    same_rank=True,
    options={"density": None, "seed": 0},
)
def dare_linear(As, Bs, scalings, weights, *, density) -> LoraFactors:
    """PEFT add_weighted_adapter(combination_type="dare_linear"): merge_utils.dare_linear on the
    A_i with weights sign(w_i s_i) sqrt|w_i s_i|, then on the B_i with sqrt|w_i s_i|; scaling 1.
    Random: `combine` seeds torch's generator with the `seed` option once per merge (see RANDOM)."""
    from peft.utils import merge_utils

    wA, wB = _peft_factor_weights(weights, scalings)
    A, B = _stack(As), _stack(Bs)  # (N, r, d_in), (N, d_out, r)
    return LoraFactors(
        merge_utils.dare_linear(list(A), wA.to(A.dtype), density),  # (r, d_in)
        merge_utils.dare_linear(list(B), wB.to(B.dtype), density),  # (d_out, r)
        1.0,
    )


@register(
    "svd",
    "PEFT's svd: truncated SVD of sum w_i s_i B_i A_i at rank svd_rank (default max r_i).",
    options={"svd_rank": 0},
)
def svd(As, Bs, scalings, weights, *, svd_rank=0) -> LoraFactors:
    """PEFT add_weighted_adapter(combination_type="svd"): delta = sum_i w_i s_i B_i A_i
    (merge_utils.task_arithmetic), then U S V^T = delta and B = U_k S_k, A = V_k^T at
    k = svd_rank or max_i r_i; scaling 1. Exact when k >= sum_i r_i."""
    from peft.utils import merge_utils

    dtype = torch.promote_types(As[0].dtype, torch.float32)
    deltas = [s * (b.to(dtype) @ a.to(dtype)) for a, b, s in zip(As, Bs, scalings)]  # N x (d_out, d_in)
    delta = merge_utils.task_arithmetic(deltas, weights.to(dtype))  # (d_out, d_in)
    # Reduced SVD: the first k singular triplets are those of PEFT's full_matrices=True call.
    U, S, Vh = torch.linalg.svd(delta, full_matrices=False)  # (d_out, m), (m,), (m, d_in)
    k = svd_rank or max(a.shape[0] for a in As)
    return LoraFactors(Vh[:k], U[:, :k] * S[:k], 1.0)  # (k, d_in), (d_out, k)


RANDOM_OPTION = "seed"
"""A formula that draws random numbers takes this option; `combine` seeds torch's generator with it
(isolated from the caller's) before the first module, so a recipe that records it rebuilds bit for bit."""


def get_formula(name: str) -> Formula:
    if name not in FORMULAS:
        raise InputError(f"unknown formula '{name}'.", f"Choose one of: {', '.join(FORMULAS)}.")
    return FORMULAS[name]


def combine(
    adapters: Sequence[LoraAdapter],
    weights: Sequence[float] | torch.Tensor | None = None,
    formula: str = "elementwise",
    *,
    name: str = "composed",
    **options,
) -> LoraAdapter:
    """Combine whole adapters module by module into one LoRA adapter that `save_adapter`
    writes as a PEFT folder. Checks every input (formula, options, weights, compatibility)
    before computing; raises InputError naming the bad value."""
    spec = get_formula(formula)
    check_compatible(adapters, same_rank=spec.same_rank, same_scaling=spec.same_scaling)
    w = _check_weights(weights, len(adapters), spec)
    options = resolve_options(formula, options)
    seed = options.pop(RANDOM_OPTION, None)
    first = adapters[0]
    modules = {}
    with _seeded(seed, next(iter(first.modules.values()))[0].device):
        for module in first.modules:
            As = [a.modules[module][0] for a in adapters]
            Bs = [a.modules[module][1] for a in adapters]
            A, B, scaling = spec.merge(As, Bs, [a.scaling for a in adapters], w, **options)
            # Stored in the inputs' dtype: a bf16 library gives a bf16 adapter.
            modules[module] = (A.to(As[0].dtype).contiguous(), B.to(As[0].dtype).contiguous())
    r = A.shape[0]
    alpha = scaling * r
    return LoraAdapter(
        name=name,
        base_model_name_or_path=first.base_model_name_or_path,
        r=r,
        # alpha is s * r, so PEFT's alpha / r gives back s (rslora would divide by sqrt(r)).
        lora_alpha=round(alpha) if math.isclose(alpha, round(alpha), rel_tol=1e-12) else alpha,
        target_modules=first.target_modules,
        task_type=first.task_type,
        modules=modules,
        fan_in_fan_out=first.fan_in_fan_out,
        use_rslora=False,
    )


def _check_weights(weights, n: int, spec: Formula) -> torch.Tensor | None:
    if spec.fixed_weights:
        if weights is not None:
            raise InputError(f"formula '{spec.name}' sets its own weights (1/k).", "Drop the weights.")
        return None
    if weights is None:
        raise InputError(f"formula '{spec.name}' needs one weight per adapter.", "Give the weights.")
    w = weights if torch.is_tensor(weights) else torch.as_tensor(weights, dtype=torch.float64)
    if w.ndim != 1 or w.numel() != n:
        raise InputError(f"got {w.numel()} weights for {n} adapters.", "Give exactly one weight per adapter.")
    if not torch.isfinite(w).all():
        raise InputError(f"weights must be finite numbers, got {w.tolist()}.", "Replace NaN or inf weights.")
    return w


@contextlib.contextmanager
def _seeded(seed: int | None, device: torch.device):
    """torch's generator seeded with `seed` inside, and the caller's state given back after."""
    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        yield


def resolve_options(formula: str, options: dict) -> dict:
    """Every option of `formula` with its value (defaults filled in), or an InputError naming the bad one."""
    spec = get_formula(formula)
    unknown = set(options) - set(spec.options)
    if unknown:
        allowed = ", ".join(spec.options) or "none"
        raise InputError(f"formula '{spec.name}' takes no option '{min(unknown)}'.", f"Its options: {allowed}.")
    merged = {**spec.options, **{k: v for k, v in options.items() if v is not None}}
    missing = [k for k, v in merged.items() if v is None]
    if missing:
        raise InputError(f"formula '{spec.name}' needs option '{missing[0]}'.", f"Set {missing[0]}.")
    density = merged.get("density")
    if density is not None and not 0 < density <= 1:
        raise InputError(f"density must be in (0, 1], got {density}.", "Use e.g. density 0.5.")
    rank = merged.get("svd_rank")
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 0):
        raise InputError(
            f"svd_rank must be a whole number of 1 or more, got {rank!r}.",
            "Give e.g. --svd-rank 8, or leave it out for the largest module rank.",
        )
    return merged
