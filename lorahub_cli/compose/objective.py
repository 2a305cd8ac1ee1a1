"""The few-shot loss of many compositions at once (a LoRA bank on a base model and K encoded shots), its
gradient, and its second-order model at w = 0.

    loss = FewShotLoss(base, bank, shots, mode="elementwise")
    loss(W)                    # (P, N) -> (P,): the loss of every row of W, no gradient
    loss.value_and_grad(w)     # (N,) -> (loss, dloss/dw): one forward + backward (formulas below)
    loss.curvature()           # the model L(w) ~ L(0) + g.w + 1/2 w.H.w at w = 0, from one forward + backward

For the elementwise formula the delta of a layer is s (sum_i w_i B_i)(sum_j w_j A_j), quadratic in w, so
the gradient at w = 0 is exactly zero and the Hessian there is exactly

    H_ij = s sum_layers sum_t (u_i(t) . z_j(t) + u_j(t) . z_i(t)),   z_j(t) = A_j x_t,   u_i(t) = B_i^T d_t,

with x_t a targeted layer's input and d_t = dL/dy_t its output gradient at the base model (t runs over every
token of the K shots): the first-order change of the loss under the delta s B_i A_j. So one backward pass at
the base model gives all N^2 second derivatives (docs/compose.md, section 3).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import numpy as np
import torch

from ..models import BaseModel, EncodedBatch, mean_token_loss, token_losses
from .bank import BankedLayer, LoraBank


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
        mode: str,
        max_rows: int = 64,
        grad_rows: int | None = None,
    ):
        self.base, self.bank, self.shots, self.mode = base, bank, shots, mode
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
            with self.bank.weights(chunk, self.mode):
                sums = token_losses(self.base, batch)
            losses.append(mean_token_loss(sums, batch.n_tokens, chunk.shape[0]))
        return torch.cat(losses)

    def base_loss(self) -> float:
        """The loss of the base model alone: without weights the bank's layers pass their input through. The
        curvature's pass, when it ran, was that forward pass already (same value, another order of summation)."""
        if self._curvature is not None:
            return self._curvature.loss
        with torch.no_grad():
            return float(mean_token_loss(token_losses(self.base, self.shots), self.shots.n_tokens, 1)[0])

    def _pass(self, w: torch.Tensor | None, collect) -> float:
        """One forward + backward of the shots, `grad_rows` at a time, under weights w (None: the base model,
        w = 0), with nothing differentiated with respect to w: the backward pass starts from the embeddings'
        outputs, and `collect(layer, z, u)` receives, for every bank layer, z = x A_cat^T and u = d B_cat (both
        (T, R): the layer's input x and output gradient d through each adapter's factors). So no LoRA factor and
        no composed factor is kept for the backward pass. Returns the loss."""
        W = None if w is None else w.detach().to(torch.float32).reshape(1, -1)
        layers = [layer for layer in self.base.model.modules() if isinstance(layer, BankedLayer)]
        hooks = [layer.register_forward_hook(_collector(collect)) for layer in layers]
        embeddings = [m for m in self.base.model.modules() if isinstance(m, torch.nn.Embedding)]
        hooks += [embedding.register_forward_hook(_from_here) for embedding in embeddings]  # T5: one per stack
        total = float(self.shots.n_tokens.sum().clamp_min(1))
        value = 0.0
        try:
            for rows in _row_chunks(self.k, self.grad_rows):
                with contextlib.nullcontext() if W is None else self.bank.weights(W, self.mode):
                    part = token_losses(self.base, _select(self.shots, rows)).sum() / total
                part.backward()
                value += float(part.detach())
        finally:
            for hook in hooks:
                hook.remove()
        return value

    @property
    def _elementwise(self) -> bool:
        return self.mode == "elementwise"

    def value_and_grad(self, w: torch.Tensor) -> tuple[float, torch.Tensor]:
        """The loss at one weight vector (N,) and its exact gradient, from one forward and one backward pass:

            elementwise: g_i = s sum_t (u_i . A(w) x_t + B(w)^T d_t . z_i)
                         with A(w) x = sum_j w_j z_j and B(w)^T d = sum_j w_j u_j
            linear:      g_i = s_i sum_t sum_{c in i's rank columns} u_c z_c

        (the derivative of each layer's delta times its output gradient, summed over layers and tokens)."""
        w = w.detach().to(torch.float64).reshape(-1)
        gradient = torch.zeros(self.n, dtype=torch.float64)

        def collect(layer: BankedLayer, z: torch.Tensor, u: torch.Tensor) -> None:
            if self._elementwise:
                shape, wr = (-1, layer.n, layer.rank), w.to(z.dtype)[None, :, None]  # (1, N, 1)
                z, u = z.view(shape), u.view(shape)  # (T, N, r)
                zw, uw = (z * wr).sum(1, keepdim=True), (u * wr).sum(1, keepdim=True)  # (T, 1, r)
                gradient.add_(float(layer.col_scaling[0]) * ((u * zw).sum((0, 2)) + (uw * z).sum((0, 2))).double())
            else:
                gradient.index_add_(0, layer.owner, ((u * z).sum(0) * layer.col_scaling).double())

        value = self._pass(w if w.any() else None, collect)
        return value, gradient.to(torch.float32)

    def curvature(self) -> Curvature:
        """The second-order model at w = 0 (computed once, then kept): the loss of the base model, the gradient,
        and for the elementwise formula the exact Hessian (module docstring), from one forward + backward of the
        base model itself (`_pass`)."""
        if self._curvature is None:
            if not self._elementwise:
                value, gradient = self.value_and_grad(torch.zeros(self.n))
                self._curvature = Curvature(value, gradient.double().numpy(), None)
                return self._curvature
            hessian = torch.zeros(self.n, self.n, dtype=torch.float64)

            def collect(layer: BankedLayer, z: torch.Tensor, u: torch.Tensor) -> None:
                shape = (-1, layer.n, layer.rank)  # (T, N, r)
                hessian.add_(hessian_terms(z.view(shape), u.view(shape), float(layer.col_scaling[0])))

            value = self._pass(None, collect)
            self._curvature = Curvature(value, np.zeros(self.n), hessian.numpy())
        return self._curvature


def _from_here(module, inputs, output: torch.Tensor) -> torch.Tensor:
    """A forward hook on an embedding: the backward pass of a frozen model starts from its output."""
    return output if output.requires_grad else output.requires_grad_()


def _collector(collect):
    """A forward hook for a BankedLayer that calls collect(layer, z, u) when its output's gradient arrives: z is
    computed from the layer's input now, u from the output gradient then."""

    def hook(layer: BankedLayer, inputs, output):
        if not output.requires_grad:
            return
        x = inputs[0].detach()
        dtype = layer.lora_A.dtype
        z = x.reshape(-1, x.shape[-1]).to(dtype) @ layer.lora_A.T  # (T, R): z[t, c] = (A_cat x_t)_c

        def on_grad(grad: torch.Tensor) -> None:
            u = grad.detach().reshape(-1, grad.shape[-1]).to(dtype) @ layer.lora_B  # (T, R): (B_cat^T d_t)_c
            collect(layer, z, u)

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
