"""The tiny byte-level T5, its training loop and its exact-match score.

Everything runs in float32 on the CPU with one seeded generator per run, so a
rebuild on the same machine and library versions repeats itself.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Schedule:
    """Optimisation settings for one training run (the base model or one LoRA)."""

    steps: int
    batch_size: int
    lr: float
    warmup: int = 0
    long_every: int = 4  # with long rows: one step in this many is a batch of them
    long_batch: int = 16


def tokenizer():
    from transformers import ByT5Tokenizer

    return ByT5Tokenizer(extra_ids=0)  # ids: 0 pad, 1 </s>, 2 unk, 3 + byte: no vocabulary file, no download


def tiny_t5(shape: dict, seed: int):
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(seed)
    config = T5Config(
        vocab_size=len(tokenizer()), decoder_start_token_id=0, pad_token_id=0, eos_token_id=1, dropout_rate=0.0, **shape
    )
    return T5ForConditionalGeneration(config)


def encode(tok, rows: list[dict]) -> dict[str, torch.Tensor]:
    batch = tok([r["input"] for r in rows], padding=True, return_tensors="pt")
    labels = tok([r["target"] for r in rows], padding=True, return_tensors="pt").input_ids  # (B, T)
    labels[labels == tok.pad_token_id] = -100
    return {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask, "labels": labels}


def train(
    model,
    tok,
    rows: list[dict],
    recipe: Schedule,
    seed: int,
    advance: Callable[[], None] = lambda: None,
    long_rows: list[dict] | None = None,
) -> float:
    """AdamW with linear warm-up then linear decay, batches drawn with a seeded RNG; returns the last loss.

    `long_rows` (few-shot prompts, about six times longer): every `recipe.long_every`-th step is a batch
    of `recipe.long_batch` of them instead. A batch pads to its longest row, so mixing them into the
    short batches would make every step pay for the longest prompt."""
    rng = random.Random(seed)
    torch.manual_seed(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    optimiser = torch.optim.AdamW(params, lr=recipe.lr, weight_decay=0.0)

    def factor(step: int) -> float:
        if step < recipe.warmup:
            return (step + 1) / recipe.warmup
        return max(0.0, (recipe.steps - step) / max(1, recipe.steps - recipe.warmup))

    schedule = torch.optim.lr_scheduler.LambdaLR(optimiser, factor)
    model.train()
    loss = torch.tensor(float("nan"))
    for step in range(recipe.steps):
        if long_rows and step % recipe.long_every == recipe.long_every - 1:
            batch = rng.sample(long_rows, recipe.long_batch)
        else:
            batch = rng.sample(rows, recipe.batch_size)
        loss = model(**encode(tok, batch)).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimiser.step()
        schedule.step()
        optimiser.zero_grad(set_to_none=True)
        advance()
    model.eval()
    return float(loss.detach())


@torch.no_grad()
def accuracy(model, tok, rows: list[dict], batch_size: int = 100, max_new_tokens: int = 24) -> float:
    """Exact match of greedy answers (eval.scoring.exact_match), in [0, 1]."""
    from ..eval.scoring import exact_match

    model.eval()
    hits = 0
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        batch = tok([r["input"] for r in chunk], padding=True, return_tensors="pt")
        out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1)
        answers = tok.batch_decode(out, skip_special_tokens=True)
        hits += sum(exact_match(a, r["target"]) for a, r in zip(answers, chunk))
    return hits / len(rows)
