"""The singular value decomposition of a LoRA delta, without forming the delta.

One targeted layer has A (r x d_in), B (d_out x r) and scaling s; its delta is s B A (d_out x d_in).
With the thin QR factorisations A^T = Q_a R_a and B = Q_b R_b,

    s B A = Q_b (s R_b R_a^T) Q_a^T,

so the SVD of the small core M = s R_b R_a^T = U' S V'^T gives the delta's: U = Q_b U', S, V = Q_a V'.
It costs O((d_in + d_out) r^2 + r^3) instead of O(d_out d_in r) for the delta plus its SVD.

K = U'^T (s R_b), an r x r matrix, maps the rows of A to the scaled right singular vectors:
S V^T = K A (because R_a^T Q_a^T = A). A weight card stores S and K; the adapter file has A.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Spectrum:
    """The thin SVD of one layer's delta, padded to r triplets: delta = U diag(S) Vh.

    Singular values are descending; those below the numerical-rank tolerance are exactly 0, and so are
    their U columns, Vh rows and K rows (such a direction is not defined by the adapter). U and Vh are None
    when only S and K were asked for (`vectors=False`: what a weight card stores, without forming Q_a, Q_b)."""

    S: torch.Tensor  # (r,)
    K: torch.Tensor  # (r, r): diag(S) Vh = K A
    U: torch.Tensor | None = None  # (d_out, r)
    Vh: torch.Tensor | None = None  # (r, d_in): the right singular vectors as rows


def zero_tolerance(S: torch.Tensor, shape: tuple[int, int]) -> float:
    """The numerical-rank tolerance of a matrix of `shape` with singular values S (NumPy's matrix_rank rule)."""
    return float(S.max()) * max(shape) * torch.finfo(S.dtype).eps if S.numel() else 0.0


def pivot_signs(rows: torch.Tensor) -> torch.Tensor:
    """+1 or -1 per row: the sign of its largest-magnitude entry (the first, on a tie); +1 for a zero row."""
    pivot = rows[torch.arange(rows.shape[0]), rows.abs().argmax(dim=1)]
    return torch.where(pivot < 0, -1.0, 1.0).to(rows.dtype)


def normalise_signs(U: torch.Tensor, Vh: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Flip each singular pair so the largest-magnitude entry of its right vector is positive."""
    sign = pivot_signs(Vh)
    return U * sign, Vh * sign[:, None]


def lora_svd(
    A: torch.Tensor, B: torch.Tensor, scaling: float, dtype: torch.dtype = torch.float64, vectors: bool = True
) -> Spectrum:
    """The SVD of scaling * B @ A from QR of A^T and of B and one small SVD, computed in `dtype`.

    Signs: each right singular vector's largest-magnitude entry is positive (read from the rows of K A)."""
    r, d_in = A.shape
    d_out = B.shape[0]
    if B.shape[1] != r:
        raise ValueError(f"A is {tuple(A.shape)} and B is {tuple(B.shape)}: B must have r = {r} columns")
    A, B = A.to(dtype), B.to(dtype)
    mode = "reduced" if vectors else "r"  # "r": R alone, Q is never formed
    Q_a, R_a = torch.linalg.qr(A.T, mode=mode)  # (d_in, k_a), (k_a, r), k_a = min(d_in, r)
    Q_b, R_b = torch.linalg.qr(B, mode=mode)  # (d_out, k_b), (k_b, r)
    core = scaling * R_b  # (k_b, r)
    U_small, S, Vh_small = torch.linalg.svd(core @ R_a.T, full_matrices=False)  # k = min(k_a, k_b) triplets
    K = U_small.T @ core  # (k, r)
    zero = S <= zero_tolerance(S, (d_out, d_in))
    S, K = S.masked_fill(zero, 0), K.masked_fill(zero[:, None], 0)
    sign = pivot_signs(K @ A)  # K A = diag(S) Vh: the same pivots as Vh's rows
    K = K * sign[:, None]
    pad = r - S.shape[0]  # the delta has at most min(r, d_in, d_out) non-zero singular values
    spectrum = Spectrum(torch.cat([S, S.new_zeros(pad)]), torch.cat([K, K.new_zeros(pad, r)]))
    if vectors:
        U = (Q_b @ U_small).masked_fill(zero, 0) * sign
        Vh = (Vh_small @ Q_a.T).masked_fill(zero[:, None], 0) * sign[:, None]
        spectrum.U = torch.cat([U, U.new_zeros(d_out, pad)], dim=1)
        spectrum.Vh = torch.cat([Vh, Vh.new_zeros(pad, d_in)])
    return spectrum
