"""The few-shot loss of many compositions at once (a LoRA bank on a base model and K encoded shots), its
gradient, and its second-order model at w = 0.

    loss = FewShotLoss(base, bank, shots, formula="elementwise")
    loss(W)                    # (P, N) -> (P,): the loss of every row of W, no gradient
    loss.value_and_grad(w)     # (N,) -> (loss, dloss/dw): one forward + backward
    loss.curvature()           # the model L(w) ~ L(0) + g.w + 1/2 w.H.w at w = 0, from one forward + backward

For the elementwise formula the delta of a layer is s (sum_i w_i B_i)(sum_j w_j A_j), quadratic in w, so
the gradient at w = 0 is exactly zero and the Hessian there is exactly

    H_ij = s sum_layers sum_t (u_i(t) . z_j(t) + u_j(t) . z_i(t)),   z_j(t) = A_j x_t,   u_i(t) = B_i^T d_t,

with x_t a targeted layer's input and d_t = dL/dy_t its output gradient at the base model (t runs over every
token of the K shots): the first-order change of the loss under the delta s B_i A_j. So one backward pass at
the base model gives all N^2 second derivatives (docs/compose.md, section 3).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..models import BaseModel, EncodedBatch, mean_token_loss, token_losses
from .bank import BankedLayer, LoraBank
from .formulas import get_formula


@dataclass
class Curvature:
    """The second-order model of the loss at w = 0: L(w) ~ loss + gradient . w + 1/2 w . hessian . w."""

    loss: float
    gradient: np.ndarray  # (N,); exactly 0 for the elementwise formula
    hessian: np.ndarray | None  # (N, N), exact for the elementwise formula; None where one pass cannot give it

    def restrict(self, columns: list[int]) -> Curvature:
        """The model of the loss of `columns` alone, the other weights held at 0."""
        index = np.asarray(columns)
        hessian = None if self.hessian is None else self.hessian[np.ix_(index, index)]
        return Curvature(self.loss, self.gradient[index], hessian)


def hessian_terms(z: torch.Tensor, u: torch.Tensor, scaling: float) -> torch.Tensor:
    """One layer's share of the elementwise Hessian at w = 0: s sum_t (u_i . z_j + u_j . z_i), float64 (N, N).

    z: (T, N, r), z[t, j] = A_j x_t; u: (T, N, r), u[t, i] = B_i^T d_t (d_t = dL/dy_t)."""
    M = torch.einsum("tir,tjr->ij", u.double(), z.double())  # (N, N): sum_t u_i(t) . z_j(t)
    return scaling * (M + M.T)


class FewShotLoss:
    """Mean target-token cross-entropy over the K shots, for compositions given as rows of W.

    Candidates are evaluated together, P*K rows per forward pass, in chunks of at most `max_rows` rows; the
    result does not depend on the chunking. Gradients and the curvature are computed `grad_rows` rows at a
    time (the backward pass keeps every activation of its rows)."""

    def __init__(
        self,
        base: BaseModel,
        bank: LoraBank,
        shots: EncodedBatch,
        *,
        formula: str,
        max_rows: int = 64,
        grad_rows: int | None = None,
    ):
        self.base, self.bank, self.shots, self.formula = base, bank, shots, formula
        self.k = int(shots.labels.shape[0])
        self.per_pass = max(1, max_rows // self.k)
        self.grad_rows = max(1, min(grad_rows or max_rows, self.k))
        self.n = bank.n
        self._curvature: Curvature | None = None

    def __call__(self, W: torch.Tensor) -> torch.Tensor:
        """(P, N) -> (P,); differentiable when W requires a gradient (one graph for all rows)."""
        losses = []
        for chunk in W.split(self.per_pass):
            batch = self.shots.repeat(chunk.shape[0])  # candidate-major: rows p*K .. p*K+K-1 use chunk[p]
            with self.bank.weights(chunk, self.formula):
                sums = token_losses(self.base, batch)
            losses.append(mean_token_loss(sums, batch.n_tokens, chunk.shape[0]))
        return torch.cat(losses)

    def _backward(self, w: torch.Tensor) -> tuple[float, torch.Tensor]:
        """The loss at w and its gradient, back-propagated `grad_rows` shots at a time."""
        w = w.detach().to(torch.float32).reshape(1, -1).requires_grad_(True)
        total = float(self.shots.n_tokens.sum().clamp_min(1))
        value = 0.0
        for rows in _row_chunks(self.k, self.grad_rows):
            batch = _select(self.shots, rows)
            with self.bank.weights(w, self.formula):
                part = token_losses(self.base, batch).sum() / total
            part.backward()
            value += float(part.detach())
        return value, w.grad[0].detach()

    def value_and_grad(self, w: torch.Tensor) -> tuple[float, torch.Tensor]:
        """The loss at one weight vector (N,) and its exact gradient: one forward and one backward pass."""
        return self._backward(w)

    def curvature(self) -> Curvature:
        """The second-order model at w = 0 (computed once, then kept): the loss of the base model, the gradient,
        and for the elementwise formula the exact Hessian (module docstring), from one forward + backward."""
        if self._curvature is None:
            elementwise = get_formula(self.formula).bank_mode == "elementwise"
            hessian = torch.zeros(self.n, self.n, dtype=torch.float64)
            hooks = []
            if elementwise:
                hooks = [
                    layer.register_forward_hook(_collector(hessian))
                    for layer in self.base.model.modules()
                    if isinstance(layer, BankedLayer)
                ]
            try:
                loss, gradient = self._backward(torch.zeros(self.n))
            finally:
                for hook in hooks:
                    hook.remove()
            self._curvature = Curvature(
                loss, gradient.double().numpy(), hessian.numpy() if elementwise and hooks else None
            )
        return self._curvature


def _collector(hessian: torch.Tensor):
    """A forward hook for a BankedLayer that adds its Hessian terms to `hessian` when its output's gradient
    arrives: z is computed from the layer's input now, u from the output gradient later."""

    def hook(layer: BankedLayer, inputs, output):
        x = inputs[0].detach()
        dtype = layer.lora_A.dtype
        z = (x.reshape(-1, x.shape[-1]).to(dtype) @ layer.lora_A.T).view(-1, layer.n, layer.rank)  # (T, N, r)
        scaling = float(layer.col_scaling[0])

        def on_grad(grad: torch.Tensor) -> None:
            d = grad.detach().reshape(-1, grad.shape[-1]).to(dtype)  # (T, d_out)
            u = (d @ layer.lora_B).view(-1, layer.n, layer.rank)  # (T, N, r): u[t, i] = B_i^T d_t
            hessian.add_(hessian_terms(z, u, scaling))

        if output.requires_grad:
            output.register_hook(on_grad)

    return hook


def _row_chunks(k: int, size: int) -> list[list[int]]:
    return [list(range(start, min(start + size, k))) for start in range(0, k, size)]


def _select(shots: EncodedBatch, rows: list[int]) -> EncodedBatch:
    if len(rows) == int(shots.labels.shape[0]):
        return shots
    index = torch.tensor(rows)
    return EncodedBatch({k: v[index] for k, v in shots.inputs.items()}, shots.labels[index], shots.n_tokens[index])


class OnColumns:
    """A loss of N weights that places them in `columns` of a wider bank's loss, zeros elsewhere (instance
    level: each shot searches its own modules in one shared bank)."""

    def __init__(self, loss: FewShotLoss, columns: list[int]):
        self.loss, self.columns, self.n = loss, list(columns), len(columns)
        self._index = torch.tensor(self.columns)

    def _widen(self, W: torch.Tensor) -> torch.Tensor:  # (P, N) -> (P, width)
        return torch.zeros(W.shape[0], self.loss.n, dtype=W.dtype).index_copy(1, self._index, W)

    def __call__(self, W: torch.Tensor) -> torch.Tensor:
        return self.loss(self._widen(W))

    def value_and_grad(self, w: torch.Tensor) -> tuple[float, torch.Tensor]:
        value, grad = self.loss.value_and_grad(self._widen(w.reshape(1, -1))[0])
        return value, grad[self._index]

    def curvature(self) -> Curvature:
        return self.loss.curvature().restrict(self.columns)
