"""Generation for many inputs, each row under its own composition weights and its own sampling.

    texts = generate(base, inputs, bank=bank, weights=W)   # W: (len(inputs), N) or (N,), or one SparseRow each

Rows run longest input first, up to `batch_size` at a time, each under its own weight
vector in the bank, so inputs that use different adapters share forward passes (weights given
as SparseRows, a route's adapters and weights, stay sparse down to the bank). Without a
bank it is the base model. Decoding is greedy by default (one beam), as in the papers' protocol;
`sampling` gives each input its own `decoding.Sampling` (temperature, top-p, top-k, repetition
penalty, seed). `max_new_tokens` may be one limit per input. `batching="continuous"` (default, settings.SERVE):
`decoding.Decoder`'s step loop, where a row leaves at its end and the next input takes its
place; "static": batches through `model.generate`, each decoding to its largest limit (each
row keeps its own first tokens, which greedy decoding makes equal to stopping there).

`generate_details` also returns each row's token ids, their log-probabilities (of the
distribution each token was chosen from) and why it stopped: "eos_token", "stop_sequence"
(a row's own stop strings: the text is cut before the first one) or "length";
`generate_tokens` does the same from token ids (a server tokenises each request once, to check it).
"""

from __future__ import annotations

import torch

from .compose.bank import SparseRow, sparse
from .decoding import GREEDY, Admission, Chooser, Decoder, Generated, Sampling, choose, drain, finish, steppable
from .errors import InputError
from .models import BaseModel
from .settings import SERVE


def _batches(lengths: list[int], batch_size: int) -> list[list[int]]:
    """Indices grouped into batches of similar length (longest first), so little padding is computed."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def _row_weights(weights, rows: int, n: int) -> list[SparseRow] | None:
    """One SparseRow per input: `weights` as given (a list of them), or the rows of a dense (rows, n) or (n,) one."""
    if weights is None:
        return None
    if isinstance(weights, list | tuple) and all(isinstance(w, SparseRow) for w in weights):
        if len(weights) != rows:
            raise InputError(f"{len(weights)} weight rows do not fit {rows} inputs.", "Give one row per input.")
        return list(weights)
    W = torch.as_tensor(weights, dtype=torch.float32)
    W = W.expand(rows, n) if W.ndim == 1 else W
    if W.shape != (rows, n):
        raise InputError(
            f"weights of shape {tuple(W.shape)} do not fit {rows} inputs and {n} adapters.",
            f"Give one weight vector of length {n}, or one per input.",
        )
    return sparse(W)


class _Choosing:
    """A last logits processor for `model.generate` (greedy): it chooses each row's token with `decoding.choose`
    (the row's own sampling and generator, as the step loop does) and leaves that token the only one possible,
    so greedy decoding takes it. Records each step's log-probabilities, (rows,) per step."""

    def __init__(self, choosers: list[Chooser], prompts: list[list[int]], seq2seq: bool, width: int):
        self.choosers, self.prompts, self.seq2seq, self.width = choosers, prompts, seq2seq, width
        self.steps: list[list[float]] = []

    def __call__(self, input_ids, scores):
        rows = input_ids.tolist()
        # The penalty counts model.generate's own input_ids: the decoder's (seq2seq), or the prompt without its
        # left padding and what was generated (decoder-only).
        histories = [
            (row if self.seq2seq else row[self.width - len(prompt) :]) if c.sampling.repetition_penalty != 1 else ()
            for row, prompt, c in zip(rows, self.prompts, self.choosers)
        ]
        tokens, logprobs = choose(scores.float(), self.choosers, histories)
        self.steps.append(logprobs)
        only = torch.full_like(scores, -float("inf"))
        only[torch.arange(len(tokens)), torch.tensor(tokens, device=scores.device)] = 0
        return only


def generate(base: BaseModel, inputs: list[str], **options) -> list[str]:
    """The greedy continuation of every input, in input order; `progress(n)` after each batch of n."""
    return [g.text for g in generate_details(base, inputs, **options)]


def generate_details(base: BaseModel, inputs: list[str], *, max_input_length: int = 1024, **options) -> list[Generated]:
    """As `generate`, with each row's tokens, log-probabilities and finish reason (`generate_tokens`)."""
    ids = base.tokenizer(list(inputs), truncation=True, max_length=max_input_length)["input_ids"]
    return generate_tokens(base, ids, **options)


@torch.no_grad()
def generate_tokens(
    base: BaseModel,
    ids: list[list[int]],
    *,
    bank=None,
    weights=None,
    mode: str | None = None,
    max_new_tokens: int | list[int] = 256,
    stop: list[list[str]] | None = None,
    batch_size: int = 16,
    progress=None,
    batching: str = SERVE["batching"],
    sampling: list[Sampling] | None = None,
    admission: Admission | None = None,
) -> list[Generated]:
    """The continuation of every tokenised input; `weights`: a (rows, N) or (N,) tensor, or one SparseRow per
    input; `mode`: the bank mode (default: the bank's); `stop`: strings per input; `sampling`: one
    `decoding.Sampling` per input (default: greedy). `batching`: "continuous" (the step loop of `Decoder`, which
    admits waiting rows as `admission` says) or "static" (whole batches through `model.generate`)."""
    if weights is not None and bank is None:
        raise InputError(
            "weights were given without a LoRA bank.", "Pass bank= with the adapters the weights refer to."
        )
    limits = [max_new_tokens] * len(ids) if isinstance(max_new_tokens, int) else list(max_new_tokens)
    if batch_size < 1 or len(limits) != len(ids) or min(limits, default=1) < 1:
        raise InputError(
            f"batch size {batch_size} and max new tokens {max_new_tokens} must be 1 or more, one limit "
            "or one per input.",
            "Give --batch-size and --max-new-tokens of 1 or more.",
        )
    check_batching(batching)
    rows = _row_weights(weights, len(ids), bank.n) if bank is not None else None
    stops = stop or [[] for _ in ids]
    samplings = sampling or [GREEDY] * len(ids)
    if len(samplings) != len(ids):
        raise InputError(f"{len(samplings)} samplings do not fit {len(ids)} inputs.", "Give one per input.")
    if batching == "static" or not steppable(base):
        return _generate_static(base, ids, bank, rows, mode, limits, stops, batch_size, progress, samplings)
    decoder = Decoder(base, bank=bank, mode=mode, max_batch=batch_size, admission=admission)
    for i in _batches([len(x) for x in ids], len(ids))[0]:  # longest first, as static batches go
        decoder.add(
            i,
            ids[i],
            max_new_tokens=limits[i],
            stop=stops[i],
            weights=None if rows is None else rows[i],
            sampling=samplings[i],
        )
    return drain(decoder, len(ids), progress)


BATCHING = ("continuous", "static")


def check_batching(batching: str) -> str:
    if batching not in BATCHING:
        raise InputError(
            f"batching '{batching}' is not one of {', '.join(BATCHING)}.", "Use --batching continuous or static."
        )
    return batching


def _generate_static(base, ids, bank, weights, mode, limits, stops, batch_size, progress, samplings) -> list[Generated]:
    """Whole batches of similar length through `model.generate`: a batch decodes until its longest row is
    done (finished rows are padded), and nothing joins it. Kept as the baseline of continuous batching."""
    from transformers import LogitsProcessorList

    tok = base.tokenizer
    pad = tok.pad_token_id
    outputs: list[Generated | None] = [None] * len(ids)
    for batch in _batches([len(x) for x in ids], batch_size):
        rows = [ids[i] for i in batch]
        width = max(map(len, rows))
        if base.is_seq2seq:
            input_ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows])
            mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
        else:
            # Left padding: every prompt ends at the last position, where generation continues.
            input_ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
            mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
        recorder = _Choosing([Chooser.of(samplings[i], base.device) for i in batch], rows, base.is_seq2seq, width)
        kwargs = dict(
            input_ids=input_ids.to(base.device),
            attention_mask=mask.to(base.device),
            do_sample=False,
            num_beams=1,
            max_new_tokens=max(limits[i] for i in batch),
            pad_token_id=pad,
            eos_token_id=tok.eos_token_id,
            logits_processor=LogitsProcessorList([recorder]),
        )
        if weights is None:
            out = base.model.generate(**kwargs)
        else:
            with bank.use(bank.sparse_rows([weights[i] for i in batch], mode)):
                out = base.model.generate(**kwargs)
        # A seq2seq output starts with the decoder start token; a causal one with the prompt.
        out = (out[:, 1:] if base.is_seq2seq else out[:, width:]).tolist()
        chosen = (
            [list(step) for step in zip(*recorder.steps)] if recorder.steps else [[] for _ in batch]
        )  # (rows, steps)
        for row, i in enumerate(batch):
            outputs[i] = finish(tok, out[row][: limits[i]], chosen[row], stops[i], len(ids[i]))
        if progress:
            progress(len(batch))
    return outputs
