"""Decoding one step at a time, of a batch whose rows come and go (continuous batching).

    decoder = Decoder(base, bank=bank, mode="linear", max_batch=32)
    decoder.add(key, token_ids, max_new_tokens=16, stop=["\\n"], weights=SparseRow((2, 7), (0.5, 0.5)),
                sampling=Sampling(temperature=0.7, top_p=0.9, seed=4))
    while decoder.busy:
        for key, generated in decoder.step():   # the rows that finished at this step
            ...

A step first admits waiting rows (`Admission`: in groups, within a token budget) and *prefills*
them together (seq2seq: the encoder and the first decoder step; decoder-only: the prompt pass),
which gives each its first token; then it decodes one token for every row that was already
running; then the new rows join the running batch. A row leaves at the step that gives it its
end-of-sequence token, its own `max_new_tokens`-th token, or a token after which its text holds
one of its stop strings: its cache rows, masks, encoder states and bank weights are dropped.

Joining pads, so every row sees exactly its own positions:
- decoder-only: the self-attention caches are left-padded to the longest; the attention mask
  hides the padding and every row passes its own position ids (RoPE and learned positions alike);
- seq2seq (T5): the encoder states and the cross-attention caches are right-padded to the
  longest input under the encoder attention mask; the decoder's self-attention caches are
  left-padded under the decoder attention mask. T5's decoder bias depends on key position minus
  query position only, and a padded row's query and keys are shifted by the same amount.
Columns that every remaining row masks are cut off when rows leave, so padding stays bounded.

Each row chooses its own token (`choose`, `Sampling`): greedy (the arg max, the default) or sampled
with its own temperature, top-k, top-p and repetition penalty from its own seeded generator, so a
seeded row draws the same tokens alone or in any batch. Logits processors of the model's generation
config are applied as `model.generate` does for `suppress_tokens` and `begin_suppress_tokens`; any
other score-changing option is refused.
"""

from __future__ import annotations

import inspect
import math
from collections import deque
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch

from .compose.bank import SparseRow, append_rows, compact_rows
from .errors import InputError
from .settings import SERVE


@dataclass
class Generated:
    text: str
    tokens: list[int]  # the generated ids up to the stop (EOS included when it was generated)
    logprobs: list[float]  # log p of each of them under the distribution it was chosen from
    finish_reason: str  # eos_token | stop_sequence | length
    prompt_tokens: int


def cut(tok, ids: list[int], stops: list[str]) -> tuple[list[int], str | None]:
    """The shortest prefix of `ids` whose text holds a stop string, and the text before that string."""
    if not stops or not any(stop in tok.decode(ids, skip_special_tokens=True) for stop in stops):
        return ids, None
    for end in range(1, len(ids) + 1):
        text = tok.decode(ids[:end], skip_special_tokens=True)
        hits = [text.index(stop) for stop in stops if stop in text]
        if hits:
            return ids[:end], text[: min(hits)]
    return ids, None


def finish(tok, row: list[int], logprobs: list[float], stops: list[str], prompt_tokens: int) -> Generated:
    """One row's generation: up to its first EOS (the rest is padding of a batch that ran on) or stop string."""
    eos = tok.eos_token_id
    reason = "length"
    if eos is not None and eos in row:
        row, reason = row[: row.index(eos) + 1], "eos_token"
    cut_ids, text = cut(tok, row, stops)
    if text is not None:
        row, reason = cut_ids, "stop_sequence"
    else:
        text = tok.batch_decode([row], skip_special_tokens=True)[0]
    return Generated(text.strip(), row, logprobs[: len(row)], reason, prompt_tokens)


# --- choosing a token, per row ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Sampling:
    """How one row chooses its tokens. temperature 0 is greedy (the arg max; top_p, top_k and seed do not
    apply); above 0 the token is drawn from softmax(scores / temperature) cut to the top_k most likely tokens
    (0: all) and then to the smallest set whose probability reaches top_p, with the row's own generator seeded
    with `seed` (None: an unpredictable seed). repetition_penalty (1: none) applies either way."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    seed: int | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def problem(self) -> tuple[str, object, str] | None:
        """(field, value, rule) for the first field out of range, or None."""
        finite = lambda x: isinstance(x, int | float) and math.isfinite(x)  # noqa: E731
        if not finite(self.temperature) or self.temperature < 0:
            return "temperature", self.temperature, "must be 0 (greedy) or more"
        if not finite(self.top_p) or not 0 < self.top_p <= 1:
            return "top_p", self.top_p, "must be in (0, 1]"
        if not isinstance(self.top_k, int) or self.top_k < 0:
            return "top_k", self.top_k, "must be 0 (no cut) or more"
        if not finite(self.repetition_penalty) or self.repetition_penalty <= 0:
            return "repetition_penalty", self.repetition_penalty, "must be more than 0 (1: no penalty)"
        if self.seed is not None and not 0 <= self.seed < 2**64:
            return "seed", self.seed, "must be in 0..2^64-1"
        return None


GREEDY = Sampling()


def repetition_penalised(scores: torch.Tensor, history: Sequence[int], penalty: float) -> torch.Tensor:
    """scores (V,) with every token of `history` penalised as CTRL's repetition penalty (and transformers'
    RepetitionPenaltyLogitsProcessor): s / penalty where s > 0, s * penalty where s < 0, once per distinct token."""
    if penalty == 1 or not history:
        return scores
    seen = torch.tensor(sorted(set(history)), device=scores.device)
    chosen = scores[seen]
    scores = scores.clone()
    scores[seen] = torch.where(chosen < 0, chosen * penalty, chosen / penalty)
    return scores


def top_k_cut(logits: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """logits (R, V) with -inf below each row's k-th largest value (ties with it are kept); k (R,), 0: no cut."""
    kth = logits.sort(dim=-1, descending=True).values.gather(1, (k.clamp(1, logits.shape[-1]) - 1)[:, None])  # (R, 1)
    return logits.masked_fill((logits < kth) & (k > 0)[:, None], -math.inf)


def top_p_cut(logits: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """logits (R, V) with -inf outside each row's nucleus: the most likely tokens whose probabilities, taken in
    decreasing order, first reach p (R,) (a token is kept when the mass strictly before it is below p; ties with
    the last kept are kept too). p = 1 keeps every token."""
    probs = torch.softmax(logits, dim=-1)
    ordered = probs.sort(dim=-1, descending=True).values  # (R, V)
    before = ordered.cumsum(dim=-1) - ordered  # (R, V): the mass of the tokens ranked above each
    kept = (before < p[:, None]).sum(dim=-1, keepdim=True).clamp(min=1)  # (R, 1): at least the most likely
    floor = ordered.gather(1, kept - 1)  # (R, 1): the least probability kept
    return logits.masked_fill((probs < floor) & (p < 1)[:, None], -math.inf)


@dataclass
class Chooser:
    """One row's token choice: its Sampling and, when it samples, its own generator, which draws once per token
    of this row only, so a seeded row gets the same tokens whatever else shares its batch."""

    sampling: Sampling = GREEDY
    generator: torch.Generator | None = None

    @classmethod
    def of(cls, sampling: Sampling, device) -> Chooser:
        if sampling.greedy:
            return cls(sampling)
        generator = torch.Generator(device=device)
        if sampling.seed is None:
            generator.seed()
        else:
            generator.manual_seed(sampling.seed)
        return cls(sampling, generator)


def choose(scores: torch.Tensor, choosers: Sequence[Chooser], histories: Sequence[Sequence[int]]):
    """Each row's token and its log-probability under the distribution it was chosen from (greedy: the scores'
    softmax; sampled: the cut, tempered one). scores (B, V) float32; `histories[b]`: the tokens row b's
    repetition penalty counts. Returns (tokens, logprobs) as lists."""
    rows = [
        repetition_penalised(scores[b], histories[b], c.sampling.repetition_penalty) for b, c in enumerate(choosers)
    ]
    scores = torch.stack(rows) if any(c.sampling.repetition_penalty != 1 for c in choosers) else scores
    tokens, logprobs = [0] * len(choosers), [0.0] * len(choosers)
    greedy = [b for b, c in enumerate(choosers) if c.sampling.greedy]
    if greedy:
        picked = scores[greedy] if len(greedy) < len(choosers) else scores
        for b, token, logprob in zip(
            greedy, picked.argmax(dim=-1).tolist(), torch.log_softmax(picked, dim=-1).amax(dim=-1).tolist()
        ):
            tokens[b], logprobs[b] = token, logprob
    sampled = [b for b, c in enumerate(choosers) if not c.sampling.greedy]
    if sampled:
        settings = [choosers[b].sampling for b in sampled]
        device = scores.device
        tempered = scores[sampled] / torch.tensor([s.temperature for s in settings], device=device)[:, None]
        cut = top_k_cut(tempered, torch.tensor([s.top_k for s in settings], device=device))
        cut = top_p_cut(cut, torch.tensor([s.top_p for s in settings], dtype=cut.dtype, device=device))
        logp = torch.log_softmax(cut, dim=-1)  # (S, V): -inf outside the cut
        for j, b in enumerate(sampled):
            token = int(torch.multinomial(logp[j].exp(), 1, generator=choosers[b].generator))
            tokens[b], logprobs[b] = token, float(logp[j, token])
    return tokens, logprobs


# --- who joins when --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Admission:
    """When waiting rows join a running batch, as TGI's router decides (its launcher options
    --waiting-served-ratio, --max-waiting-tokens, --max-batch-prefill-tokens) and within a step's token budget
    as vLLM's scheduler (max_num_batched_tokens). Each join costs a prefill pass of its own beside the running
    rows' decoding step, so joins are gathered: while rows run, waiting rows join only when at least
    floor(waiting_served_ratio x running) of them can join at once, or when `max_waiting_steps` steps have
    passed since the last join. An idle decoder admits at once. One prefill takes rows while rows x its longest
    input (the padded tokens it computes) stays within `max_prefill_tokens`, and always at least one row."""

    waiting_served_ratio: float = SERVE["waiting_served_ratio"]
    max_waiting_steps: int = SERVE["max_waiting_steps"]
    max_prefill_tokens: int = SERVE["max_prefill_tokens"]

    def __post_init__(self):
        if not (math.isfinite(self.waiting_served_ratio) and self.waiting_served_ratio >= 0):
            raise InputError(
                f"the waiting-served ratio is {self.waiting_served_ratio}.", "Give 0 (join at once) or more."
            )
        if self.max_waiting_steps < 0 or self.max_prefill_tokens < 1:
            raise InputError(
                f"max waiting steps ({self.max_waiting_steps}) and max prefill tokens ({self.max_prefill_tokens}) "
                "must be 0 or more and 1 or more.",
                "Give --max-waiting-steps 0 or more and --max-prefill-tokens 1 or more.",
            )

    def joining(self, lengths: Sequence[int], running: int, room: int, since: int) -> list[int]:
        """Which waiting rows (their input lengths, oldest first) join now: none, or the oldest and the others
        nearest to it in length, as many as `room` and the token budget allow. `since`: steps since the last join."""
        chosen = nearest(lengths, min(room, len(lengths)))
        while len(chosen) > 1 and len(chosen) * max(lengths[i] for i in chosen) > self.max_prefill_tokens:
            chosen.remove(max(chosen, key=lambda i: (abs(lengths[i] - lengths[0]), i)))  # the farthest in length
        if running and since < self.max_waiting_steps and len(chosen) < int(self.waiting_served_ratio * running):
            return []
        return chosen


def nearest(sizes: Sequence[int], n: int) -> list[int]:
    """Indices of the first (oldest) item and the n - 1 others nearest to it in size: the tightest run of sorted
    sizes that holds it (so a batch of them pads little). All of them when n >= len(sizes); ascending."""
    if n >= len(sizes):
        return list(range(len(sizes)))
    if n <= 0:
        return []
    order = sorted(range(len(sizes)), key=lambda i: sizes[i])
    at = order.index(0)
    lo = min(max(0, at - n + 1), len(order) - n)
    best = min(range(lo, min(at, len(order) - n) + 1), key=lambda s: sizes[order[s + n - 1]] - sizes[order[s]])
    return sorted(order[best : best + n])


# Generation-config fields that change greedy scores, at the values that leave them alone.
_UNSUPPORTED_SCORES = {
    "repetition_penalty": (None, 1.0),
    "encoder_repetition_penalty": (None, 1.0),
    "no_repeat_ngram_size": (None, 0),
    "encoder_no_repeat_ngram_size": (None, 0),
    "bad_words_ids": (None,),
    "min_length": (None, 0),
    "min_new_tokens": (None, 0),
    "forced_bos_token_id": (None,),
    "forced_eos_token_id": (None,),
    "sequence_bias": (None,),
    "exponential_decay_length_penalty": (None,),
    "renormalize_logits": (None, False),
}


def steppable(base) -> bool:
    """Whether `Decoder` can run this model exactly: T5-like seq2seq or a decoder-only model with full
    (not sliding-window) attention and per-row position ids, and no score option the loop does not apply."""
    config = base.model.config
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    if getattr(text, "sliding_window", None) or any(
        "sliding" in str(t) for t in getattr(text, "layer_types", None) or ()
    ):
        return False
    params = inspect.signature(type(base.model).forward).parameters
    if not base.is_seq2seq and "position_ids" not in params:
        return False
    gc = getattr(base.model, "generation_config", None)
    return all(getattr(gc, name, None) in ok for name, ok in _UNSUPPORTED_SCORES.items())


@dataclass
class _Row:
    key: object
    prompt: list[int]
    limit: int
    stops: list[str]
    weights: SparseRow | None  # the row's bank columns and weights
    on_token: Callable | None  # (token id, log-probability, Generated when this token ended the row, else None)
    cancelled: Callable[[], bool] | None  # true: nobody waits for the row any more; it leaves with no answer
    chooser: Chooser = field(default_factory=Chooser)
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)


@dataclass
class _Batch:
    rows: list[_Row]
    cache: object  # DynamicCache, or EncoderDecoderCache for seq2seq
    mask: torch.Tensor  # (B, S): the (decoder) self-attention cache's columns, 1 = a real token
    next: torch.Tensor  # (B,): each row's last token, the next step's input
    positions: torch.Tensor | None = None  # (B,): decoder-only, the next token's position id
    encoder_mask: torch.Tensor | None = None  # (B, L): seq2seq, the encoder states' (in the cross-attention caches)
    encoder_like: torch.Tensor | None = None  # a zero of the encoder states' dtype and width (see _decode)
    bank_rows: object = None  # compose.bank.BankRows


class Decoder:
    """Continuous batching for one model (and one bank mode: a forward pass evaluates one); see the module
    docstring. Not thread-safe: one thread adds and steps."""

    def __init__(
        self, base, *, bank=None, mode: str | None = None, max_batch: int = 16, admission: Admission | None = None
    ):
        if not steppable(base):
            raise InputError(
                "this model cannot be decoded step by step here (sliding-window attention, no "
                "position ids, or a generation config option that changes scores).",
                "Use --batching static.",
            )
        if max_batch < 1:
            raise InputError(f"the batch size is {max_batch}.", "Give a batch size of 1 or more.")
        self.base, self.bank, self.mode, self.max_batch = base, bank, mode, max_batch
        self.admission = admission or Admission()
        self.model, self.tok = base.model, base.tokenizer
        self.device = base.device
        params = inspect.signature(type(self.model).forward).parameters
        self._cache_arg = "cache" if "cache" in params else "past_key_values"  # transformers 5 renamed it
        self._keep_last = {"logits_to_keep": 1} if "logits_to_keep" in params else {}
        gc = getattr(self.model, "generation_config", None)
        self._suppress = list(getattr(gc, "suppress_tokens", None) or [])
        self._begin_suppress = list(getattr(gc, "begin_suppress_tokens", None) or [])
        start = getattr(gc, "decoder_start_token_id", None)
        self._start = getattr(self.model.config, "decoder_start_token_id", None) if start is None else start
        self.waiting: deque[_Row] = deque()
        self.batch: _Batch | None = None
        self.prefills = 0  # prefill passes run (groups of rows that joined at one step)
        self._since_join = 0  # steps since rows last joined

    # --- the queue -------------------------------------------------------------------------------

    def add(
        self,
        key,
        ids: list[int],
        *,
        max_new_tokens: int,
        stop=(),
        weights: SparseRow | None = None,
        on_token: Callable | None = None,
        cancelled: Callable[[], bool] | None = None,
        sampling: Sampling = GREEDY,
    ) -> None:
        """Queue a row; `weights`: its composition over the bank; `sampling`: how it chooses its tokens.
        `on_token(token, logprob, Generated or None)` as each token is decoded; `cancelled()` true at a step: the
        row leaves then, reported by `step` with None for its Generated."""
        if (weights is None) != (self.bank is None):
            raise InputError("a row's weights and the decoder's bank must be given together.", "Pass both or neither.")
        if max_new_tokens < 1 or not ids:
            raise InputError(
                f"a row of {len(ids)} tokens asks for {max_new_tokens} new tokens.", "Give both 1 or more."
            )
        row = _Row(key, list(ids), max_new_tokens, list(stop), weights, on_token, cancelled)
        row.chooser = Chooser.of(sampling, self.device)
        self.waiting.append(row)

    @property
    def running(self) -> int:
        return 0 if self.batch is None else len(self.batch.rows)

    @property
    def busy(self) -> bool:
        return bool(self.waiting) or self.batch is not None

    def abandon(self) -> list:
        """Drop every row, waiting or running; their keys."""
        keys = [r.key for r in self.waiting] + ([r.key for r in self.batch.rows] if self.batch else [])
        self.waiting.clear()
        self.batch = None
        return keys

    # --- a step ----------------------------------------------------------------------------------

    @torch.no_grad()
    def step(self) -> list[tuple[object, Generated | None]]:
        """Admit (`Admission`) and prefill waiting rows, decode one token for the running ones; the rows that
        finished (None for a row that was cancelled)."""
        done: list[tuple[object, Generated | None]] = []
        for row in [r for r in self.waiting if r.cancelled is not None and r.cancelled()]:
            self.waiting.remove(row)
            done.append((row.key, None))
        chosen = self.admission.joining(
            [len(r.prompt) for r in self.waiting], self.running, self.max_batch - self.running, self._since_join
        )
        joining = [self.waiting[i] for i in chosen]
        for row in joining:
            self.waiting.remove(row)
        self._since_join = 0 if joining else self._since_join + 1
        self.prefills += bool(joining)
        fresh = self._prefill(joining, done) if joining else None
        if self.batch is not None:
            self.batch = self._decode(self.batch, done)
        if fresh is not None:
            self.batch = (
                fresh if self.batch is None else _merge(self.batch, fresh, self.base.is_seq2seq, self.max_batch)
            )
        return done

    def _composed(self, bank_rows):
        return nullcontext() if bank_rows is None else self.bank.use(bank_rows)

    def _forward(self, cache, **inputs) -> torch.Tensor:
        out = self.model(**inputs, **{self._cache_arg: cache}, use_cache=True, return_dict=True)
        return out.logits[:, -1, :]

    def _prefill(self, rows: list[_Row], done: list) -> _Batch | None:
        from transformers import DynamicCache

        pad = self.tok.pad_token_id if self.tok.pad_token_id is not None else 0
        dev = self.device
        bank_rows = None
        if self.bank is not None:
            bank_rows = self.bank.sparse_rows([r.weights for r in rows], self.mode)
        width = max(len(r.prompt) for r in rows)
        with self._composed(bank_rows):
            if self.base.is_seq2seq:
                from transformers import EncoderDecoderCache
                from transformers.modeling_outputs import BaseModelOutput

                ids = torch.tensor([r.prompt + [pad] * (width - len(r.prompt)) for r in rows], device=dev)
                enc_mask = torch.tensor([[1] * len(r.prompt) + [0] * (width - len(r.prompt)) for r in rows], device=dev)
                encoder = self.model.get_encoder()(
                    input_ids=ids, attention_mask=enc_mask, return_dict=True
                ).last_hidden_state
                encoder_layers = set(bank_rows.grouped.cache) if bank_rows is not None and bank_rows.grouped else set()
                cache = EncoderDecoderCache(DynamicCache(), DynamicCache())
                first = torch.full((len(rows), 1), self._start, dtype=torch.long, device=dev)
                mask = torch.ones(len(rows), 1, dtype=torch.long, device=dev)
                logits = self._forward(
                    cache,
                    encoder_outputs=BaseModelOutput(last_hidden_state=encoder),
                    attention_mask=enc_mask,
                    decoder_input_ids=first,
                    decoder_attention_mask=mask,
                )
                for layer in encoder_layers:  # the decoding steps never use the encoder's layers again
                    bank_rows.grouped.cache.pop(layer, None)
                batch = _Batch(
                    rows,
                    cache,
                    mask,
                    first[:, 0],
                    encoder_mask=enc_mask,
                    bank_rows=bank_rows,
                    encoder_like=encoder.new_zeros((1, 1, encoder.shape[-1])),
                )
            else:
                ids = torch.tensor([[pad] * (width - len(r.prompt)) + r.prompt for r in rows], device=dev)
                mask = torch.tensor([[0] * (width - len(r.prompt)) + [1] * len(r.prompt) for r in rows], device=dev)
                positions = (mask.cumsum(-1) - 1).clamp(min=0)
                cache = DynamicCache()
                logits = self._forward(
                    cache, input_ids=ids, attention_mask=mask, position_ids=positions, **self._keep_last
                )
                batch = _Batch(rows, cache, mask, ids[:, -1], positions=mask.sum(-1), bank_rows=bank_rows)
        _check_layers(cache)
        return self._choose(batch, logits, done)

    def _decode(self, batch: _Batch, done: list) -> _Batch | None:
        ones = torch.ones(len(batch.rows), 1, dtype=batch.mask.dtype, device=batch.mask.device)
        mask = torch.cat([batch.mask, ones], dim=1)
        with self._composed(batch.bank_rows):
            if self.base.is_seq2seq:
                from transformers.modeling_outputs import BaseModelOutput

                # After the first step every layer reads the encoder side from its cross-attention cache: the
                # states themselves only give the mask its shape, so a broadcast zero stands in for them.
                encoder = batch.encoder_like.expand(*batch.encoder_mask.shape, -1)
                logits = self._forward(
                    batch.cache,
                    encoder_outputs=BaseModelOutput(last_hidden_state=encoder),
                    attention_mask=batch.encoder_mask,
                    decoder_input_ids=batch.next[:, None],
                    decoder_attention_mask=mask,
                )
            else:
                logits = self._forward(
                    batch.cache,
                    input_ids=batch.next[:, None],
                    attention_mask=mask,
                    position_ids=batch.positions[:, None],
                )
                batch.positions = batch.positions + 1
        batch.mask = mask
        return self._choose(batch, logits, done)

    def _choose(self, batch: _Batch, logits: torch.Tensor, done: list) -> _Batch | None:
        """Each row's token (`choose`) and its log-probability; finished rows leave (None: no row is left)."""
        scores = logits.float()  # model.generate chooses in float32 too
        if self._suppress:
            scores[:, self._suppress] = -float("inf")
        if self._begin_suppress:
            first = torch.tensor([not r.tokens for r in batch.rows], device=scores.device)
            scores[:, self._begin_suppress] = torch.where(
                first[:, None], -float("inf"), scores[:, self._begin_suppress]
            )
        # The tokens a repetition penalty counts are model.generate's input_ids: seq2seq, the decoder's (its
        # start token and what it generated); decoder-only, the prompt and what it generated.
        histories = [
            ([self._start] if self.base.is_seq2seq else r.prompt) + r.tokens
            if r.chooser.sampling.repetition_penalty != 1
            else ()
            for r in batch.rows
        ]
        tokens, logprobs = choose(scores, [r.chooser for r in batch.rows], histories)
        chosen = torch.tensor(tokens, device=scores.device)
        eos = self.tok.eos_token_id
        keep = []
        for i, (row, token) in enumerate(zip(batch.rows, tokens)):
            if row.cancelled is not None and row.cancelled():
                done.append((row.key, None))
                continue
            row.tokens.append(token)
            row.logprobs.append(logprobs[i])
            ended = (
                token == eos
                or len(row.tokens) >= row.limit
                or (row.stops and any(s in self.tok.decode(row.tokens, skip_special_tokens=True) for s in row.stops))
            )
            generated = finish(self.tok, row.tokens, row.logprobs, row.stops, len(row.prompt)) if ended else None
            if row.on_token is not None:
                row.on_token(token, logprobs[i], generated)
            if ended:
                done.append((row.key, generated))
            else:
                keep.append(i)
        batch.next = chosen
        if len(keep) == len(batch.rows):
            return batch
        return _select(batch, keep, self.base.is_seq2seq) if keep else None


def drain(stepper, n: int, progress=None) -> list:
    """Step a Decoder (or an engine's Session) whose keys are 0..n-1 until it is idle; results by key.
    `progress(k)` after each step that finished k rows."""
    results = [None] * n
    while stepper.busy:
        finished = stepper.step()
        for key, result in finished:
            results[key] = result
        if progress and finished:
            progress(len(finished))
    return results


# --- cache surgery -----------------------------------------------------------------------------------------


def _caches(cache) -> tuple:
    """(self-attention cache, cross-attention cache or None)."""
    if hasattr(cache, "self_attention_cache"):
        return cache.self_attention_cache, cache.cross_attention_cache
    return cache, None


def _tensors(cache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    if hasattr(cache, "layers"):  # transformers >= 4.56
        return [(layer.keys, layer.values) for layer in cache.layers]
    return list(zip(cache.key_cache, cache.value_cache))


def _store(cache, tensors: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    if hasattr(cache, "layers"):
        for layer, (k, v) in zip(cache.layers, tensors):
            layer.keys, layer.values = k, v
    else:
        cache.key_cache[:] = [k for k, _ in tensors]
        cache.value_cache[:] = [v for _, v in tensors]


def _check_layers(cache) -> None:
    for part in _caches(cache):
        for layer in getattr(part, "layers", []) if part is not None else []:
            if getattr(layer, "is_sliding", False):
                raise InputError(
                    "this model's cache slides; continuous batching pads full caches.", "Use --batching static."
                )


def _pad(t: torch.Tensor, dim: int, size: int, left: bool) -> torch.Tensor:
    missing = size - t.shape[dim]
    if missing <= 0:
        return t
    shape = list(t.shape)
    shape[dim] = missing
    zeros = t.new_zeros(shape)
    return torch.cat([zeros, t] if left else [t, zeros], dim=dim)


def _select(batch: _Batch, keep: list[int], seq2seq: bool) -> _Batch:
    """The rows `keep` only (the last kept rows move into the places of the rows that left, so the row
    order changes); then cache columns that no remaining row attends to are cut off."""
    n = len(keep)
    kept = set(keep)
    holes = [i for i in range(n) if i not in kept]
    movers = [i for i in keep if i >= n]
    compact = lambda t: compact_rows(t, holes, movers, n)  # noqa: E731
    rows = batch.rows
    for hole, mover in zip(holes, movers):
        rows[hole] = rows[mover]
    batch.rows = rows[:n]
    self_cache, cross_cache = _caches(batch.cache)
    batch.mask, batch.next = compact(batch.mask), compact(batch.next)
    start = int(batch.mask.any(dim=0).nonzero()[0])  # left padding every remaining row masks
    # Self-attention caches are copied by the next step's concatenation anyway: a view is enough.
    _store(self_cache, [(compact(k)[:, :, start:], compact(v)[:, :, start:]) for k, v in _tensors(self_cache)])
    batch.mask = batch.mask[:, start:]
    if batch.positions is not None:
        batch.positions = compact(batch.positions)
    if seq2seq:
        batch.encoder_mask = compact(batch.encoder_mask)
        cross = [(compact(k), compact(v)) for k, v in _tensors(cross_cache)]
        end = int(batch.encoder_mask.any(dim=0).nonzero()[-1]) + 1  # right padding every remaining row masks
        if end <= 3 * batch.encoder_mask.shape[1] // 4:  # worth a copy (every step reads these)
            batch.encoder_mask = batch.encoder_mask[:, :end].contiguous()
            cross = [(k[:, :, :end].contiguous(), v[:, :, :end].contiguous()) for k, v in cross]
        _store(cross_cache, cross)
    if batch.bank_rows is not None:
        batch.bank_rows = batch.bank_rows.compact(holes, movers, n)
    return batch


def _merge(a: _Batch, b: _Batch, seq2seq: bool, capacity: int) -> _Batch:
    """The rows of a, then those of b, in one batch: a's cache objects, padded (see the module docstring).
    The cross-attention caches and gathered bank factors go into spare rows (room for `capacity` rows) when
    the widths agree; the self-attention caches are concatenated (the next step copies them anyway)."""
    a_self, a_cross = _caches(a.cache)
    b_self, b_cross = _caches(b.cache)
    width = max(a.mask.shape[1], b.mask.shape[1])
    _store(
        a_self,
        [
            (
                torch.cat([_pad(ka, 2, width, True), _pad(kb, 2, width, True)]),
                torch.cat([_pad(va, 2, width, True), _pad(vb, 2, width, True)]),
            )
            for (ka, va), (kb, vb) in zip(_tensors(a_self), _tensors(b_self))
        ],
    )
    a.mask = torch.cat([_pad(a.mask, 1, width, True), _pad(b.mask, 1, width, True)])
    a.rows, a.next = a.rows + b.rows, torch.cat([a.next, b.next])
    if a.positions is not None:
        a.positions = torch.cat([a.positions, b.positions])
    if seq2seq:
        length = max(a.encoder_mask.shape[1], b.encoder_mask.shape[1])
        a.encoder_mask = torch.cat([_pad(a.encoder_mask, 1, length, False), _pad(b.encoder_mask, 1, length, False)])
        _store(
            a_cross,
            [
                (
                    append_rows(_pad(ka, 2, length, False), _pad(kb, 2, length, False), capacity),
                    append_rows(_pad(va, 2, length, False), _pad(vb, 2, length, False), capacity),
                )
                for (ka, va), (kb, vb) in zip(_tensors(a_cross), _tensors(b_cross))
            ],
        )
    if a.bank_rows is not None:
        a.bank_rows = a.bank_rows.cat(b.bank_rows, capacity)
    return a
