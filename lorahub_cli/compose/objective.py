"""The few-shot loss of many compositions at once: a LoRA bank on a base model and K encoded shots."""

from __future__ import annotations

import torch

from ..models import BaseModel, EncodedBatch, mean_token_loss, token_losses
from .bank import LoraBank


def loss_function(base: BaseModel, bank: LoraBank, shots: EncodedBatch, *, mode: str, max_rows: int = 64):
    """loss_fn(W: (P, N)) -> (P,): mean target-token cross-entropy over the K shots for every row of W.

    Candidates are evaluated together, P*K rows per forward pass, in chunks of at most
    `max_rows` rows; the result does not depend on the chunking.
    """
    k = int(shots.labels.shape[0])
    per_pass = max(1, max_rows // k)

    def loss_fn(W: torch.Tensor) -> torch.Tensor:
        losses = []
        for chunk in W.split(per_pass):
            batch = shots.repeat(chunk.shape[0])  # candidate-major: rows p*K .. p*K+K-1 use chunk[p]
            with bank.weights(chunk, mode):
                sums = token_losses(base, batch)
            losses.append(mean_token_loss(sums, batch.n_tokens, chunk.shape[0]))
        return torch.cat(losses)

    return loss_fn
