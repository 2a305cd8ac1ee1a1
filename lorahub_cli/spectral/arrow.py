"""Arrow routing (Ostapenko et al. 2024; PEFT's `ArrowConfig` / `create_arrow_model`): every token, at every
targeted layer, mixes the k adapters whose prototypes its input aligns with most.

For E adapters of one rank r at a layer, prototypes v_e (unit, d_in), factors A_e (r x d_in), B_e (d_out x r),
scalings s_e, a token input x (d_in), top-k size k and temperature T:

    a_e = |x . v_e|                                 (x is not normalised, as in PEFT)
    S   = the k largest a_e (torch.topk: ties go as it breaks them, the same call PEFT makes)
    p_e = exp(a_e / T) / sum_{j in S} exp(a_j / T) for e in S, else 0
    y   = W0 x + sum_e p_e s_e B_e A_e x

PEFT finds v_e by 15 power-iteration steps on A^T B^T B A from a random start; here v_e is the exact top right
singular vector (spectral/svd.py), which those steps converge to when S_1 > S_2 (docs/weights.md has the
measured gap). PEFT's constraints hold here as one-line errors: every adapter has the same rank and the same
targeted modules of the same shapes.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from ..compose.adapters import LoraAdapter, check_compatible
from ..errors import InputError


def coefficients(
    x: torch.Tensor, prototypes: torch.Tensor, top_k: int, temperature: float, allowed: torch.Tensor | None = None
) -> torch.Tensor:
    """(t, E) routing weights for t token inputs (t x d_in): softmax over the top-k |x . v_e|, zero elsewhere.
    `allowed` (t, E) bool: the experts each token may choose (a serving row's candidates; default all)."""
    alignment = (x @ prototypes.T).abs()
    if allowed is not None:
        alignment = alignment.masked_fill(~allowed, float("-inf"))  # never chosen: exp(-inf) = 0
    values, chosen = torch.topk(alignment, top_k, dim=1)
    return torch.zeros(x.shape[0], prototypes.shape[0], dtype=x.dtype, device=x.device).scatter_(
        1, chosen, torch.softmax(values / temperature, dim=1)
    )


def mixture(x: torch.Tensor, weights: torch.Tensor, A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """sum_e weights[t, e] B_e A_e x_t for t inputs (t x d_in), A (E, r, d_in), B (E, d_out, r): (t, d_out)."""
    low = torch.einsum("td,erd->ter", x, A) * weights[:, :, None]  # (t, E, r)
    return torch.einsum("ter,eor->to", low, B)


@dataclass
class ArrowLayer:
    """One targeted module's experts, stacked."""

    prototypes: torch.Tensor  # (E, d_in)
    A: torch.Tensor  # (E, r, d_in)
    B: torch.Tensor  # (E, d_out, r)
    scaling: torch.Tensor  # (E,)

    def delta(self, x: torch.Tensor, top_k: int, temperature: float) -> torch.Tensor:
        """The routed LoRA output for inputs of shape (..., d_in): (..., d_out), in the adapters' dtype."""
        tokens = x.reshape(-1, x.shape[-1]).to(self.A.dtype)
        p = coefficients(tokens, self.prototypes.to(self.A.dtype), top_k, temperature)
        return mixture(tokens, p * self.scaling.to(p.dtype), self.A, self.B).view(*x.shape[:-1], self.B.shape[1])


def check_arrow(adapters: Sequence[LoraAdapter], top_k: int, temperature: float) -> None:
    """PEFT's preconditions for Arrow, as one-line InputErrors."""
    if not adapters:
        raise InputError("Arrow routing needs at least one adapter.", "Give the adapters to route between.")
    ranks = {a.r for a in adapters}
    if len(ranks) > 1:
        first, other = adapters[0], next(a for a in adapters if a.r != adapters[0].r)
        raise InputError(
            f"Arrow routing needs one rank, but '{other.name}' has r = {other.r} and '{first.name}' r = {first.r}.",
            "Route between adapters of one rank (PEFT's Arrow has the same rule), or compose with --formula linear.",
        )
    check_compatible(adapters)  # one base model and task type; the same modules with the same shapes
    if not 1 <= top_k <= len(adapters):
        raise InputError(
            f"Arrow's top_k is {top_k}, but there are {len(adapters)} adapters to route between.",
            f"Choose a top_k from 1 to {len(adapters)}.",
        )
    if not temperature > 0:
        raise InputError(f"Arrow's temperature is {temperature}; it must be positive.", "Use e.g. 1.0 (PEFT's).")


def arrow_layers(
    adapters: Sequence[LoraAdapter], prototypes: dict[str, torch.Tensor], top_k: int, temperature: float
) -> dict[str, ArrowLayer]:
    """The stacked experts of every targeted module; prototypes[module] is (E, d_in) in the adapters' order."""
    check_arrow(adapters, top_k, temperature)
    layers = {}
    for module in sorted(adapters[0].modules):
        A = torch.stack([a.modules[module][0] for a in adapters])
        layers[module] = ArrowLayer(
            prototypes=prototypes[module],
            A=A,
            B=torch.stack([a.modules[module][1] for a in adapters]).to(A.dtype),
            scaling=torch.tensor([a.scaling for a in adapters], dtype=A.dtype),
        )
    return layers


@contextmanager
def routed(model: torch.nn.Module, layers: dict[str, ArrowLayer], top_k: int, temperature: float):
    """Inside the block, every module in `layers` adds its Arrow-routed delta to its output (forward hooks).

    The reference installation: one routing for the whole batch, for tests and single-model use."""

    def hook(layer: ArrowLayer):
        return lambda _, args, output: output + layer.delta(args[0], top_k, temperature).to(output.dtype)

    handles = [model.get_submodule(m).register_forward_hook(hook(layer)) for m, layer in layers.items()]
    try:
        yield model
    finally:
        for handle in handles:
            handle.remove()
