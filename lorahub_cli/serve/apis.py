"""The request and answer shapes of the APIs clients already speak, translated to and from engine Requests.

- TGI (`POST /generate`, `POST /generate_stream`, `POST /`), with LoRAX's per-request
  `adapter_id` and `merged_adapters`: what `huggingface_hub.InferenceClient.text_generation`
  and `lorax.Client.generate` send. Shapes read from those clients' sources (huggingface_hub
  2.4 `inference/_client.py`, lorax-client 0.6.3 `lorax/types.py`).
- OpenAI text completions and chat completions (`POST /v1/completions`, `POST /v1/chat/completions`,
  `GET /v1/models`), streamed or not, as the `openai` client sends them (openai 3.x `types/`).

Each API's sampling fields become one `decoding.Sampling` per request (TGI samples when `do_sample` or a
sampling field asks for it, greedy otherwise; OpenAI's default temperature is 1, as OpenAI's API has it);
an option this server does not compute is refused with a 400 naming it, never ignored. Every field is
bounded (stop strings in number and length, names in length; the input by the server). A translation
raises `ApiError(status, message)`; the server shapes it per API.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Annotated, Any, Literal, Optional  # noqa: UP035

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr

from ..decoding import Sampling
from ..routing import COMPOSE_MODES
from ..settings import SERVE
from .engine import Answer, Request

Compose = Optional[Literal[tuple(COMPOSE_MODES)]]  # noqa: UP045 - a runtime value, built from a tuple  # the modes the routing module registers
Id = Annotated[StrictStr, Field(max_length=SERVE["max_id_chars"])]  # an adapter id, a merge strategy


def _number(value):
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError("give a number")  # JSON's 1 is a number too; "0.5" and true are not
    return value


Number = Annotated[Any, BeforeValidator(_number)]  # kept as sent (an int stays an int in messages)

SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "repetition_penalty", "seed")
# A Request field -> what each API calls it, so that an error names the field the client sent.
OPENAI_FIELDS = {"max_new_tokens": "max_tokens"}
TGI_FIELDS = {
    "max_new_tokens": "parameters.max_new_tokens",
    "k": "parameters.k",
    **{name: f"parameters.{name}" for name in SAMPLING_FIELDS},
}


class ApiError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


# --- TGI and LoRAX ---------------------------------------------------------------------------------


class MergedAdapters(BaseModel):
    model_config = ConfigDict(extra="forbid")
    ids: list[Id]  # at most the adapters served (engine.named_route)
    weights: list[StrictFloat | StrictInt]
    merge_strategy: Id | None = None  # LoRAX: linear (default), ties, dare_linear, dare_ties
    density: StrictFloat | StrictInt | None = None  # ties and dare only
    majority_sign_method: Id | None = None  # ties only


class TgiParameters(BaseModel):
    """Every field the TGI and LoRAX clients send (most as null by default), plus lorahub's k and compose."""

    model_config = ConfigDict(extra="forbid")
    adapter_id: Id | None = None
    adapter_source: Id | None = None
    merged_adapters: MergedAdapters | None = None
    # private Hub adapters; nothing is downloaded here
    api_token: Annotated[str, Field(max_length=SERVE["max_id_chars"])] | None = Field(default=None, repr=False)
    max_new_tokens: StrictInt | None = None
    stop: list[StrictStr] | None = None
    details: StrictBool = False
    return_full_text: StrictBool | None = False
    k: StrictInt | None = None
    compose: Compose = None
    # Sampling (TGI samples when do_sample is true or any of temperature, top_k, top_p asks for it)
    do_sample: StrictBool = False
    temperature: Number | None = None
    top_k: StrictInt | None = None
    top_p: Number | None = None
    seed: StrictInt | None = None
    repetition_penalty: Number | None = None
    # Refused unless left at their defaults: what this server does not compute.
    typical_p: float | None = None
    best_of: int | None = None
    frequency_penalty: float | None = None
    watermark: StrictBool = False
    ignore_eos_token: StrictBool = False
    decoder_input_details: StrictBool | None = False
    top_n_tokens: int | None = None
    return_k_alternatives: int | None = None
    truncate: int | None = None
    grammar: dict | None = None
    response_format: dict | None = None


class TgiBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    inputs: StrictStr
    parameters: TgiParameters | None = None
    stream: StrictBool = False


_TGI_UNSUPPORTED = {  # field -> (its default, why it is refused)
    "typical_p": (None, "typical sampling is not supported (temperature, top_k and top_p are)"),
    "best_of": (None, "one sequence is generated per request (send several requests with their own seeds)"),
    "watermark": (False, "watermarking is not supported"),
    "frequency_penalty": (None, "the frequency penalty is not supported (repetition_penalty is)"),
    "ignore_eos_token": (False, "generation always stops at the end-of-sequence token"),
    "decoder_input_details": (False, "prompt log-probabilities are not computed"),
    "top_n_tokens": (None, "alternative tokens are not computed"),
    "return_k_alternatives": (None, "alternative tokens are not computed"),
    "truncate": (None, "inputs are never truncated (too long an input is refused)"),
    "grammar": (None, "constrained decoding is not supported"),
    "response_format": (None, "constrained decoding is not supported"),
}
_OPTIONAL_ONE = {"best_of": 1}  # TGI clients may send best_of=1: one sequence


def tgi_request(body: TgiBody) -> Request:
    p = body.parameters or TgiParameters()
    for name, (default, why) in _TGI_UNSUPPORTED.items():
        value = getattr(p, name)
        if value not in (default, _OPTIONAL_ONE.get(name, default)):
            raise ApiError(400, f"parameters.{name} = {_shown(value)} is not supported: {why}. Leave it out.")
    adapters = None
    if p.adapter_id is not None and p.merged_adapters is not None:
        raise ApiError(400, "give at most one of parameters.adapter_id and parameters.merged_adapters.")
    if p.adapter_id is not None:
        adapters = ((p.adapter_id, 1.0),)
    elif p.merged_adapters is not None:
        adapters = _merged(p.merged_adapters)
    if adapters is not None and (p.k is not None or p.compose is not None):
        raise ApiError(400, "k and compose choose retrieval; named adapters are not retrieved. Drop k and compose.")
    stops = _stops("parameters.stop", p.stop)
    return Request(body.inputs, p.k, p.compose, p.max_new_tokens, stops, adapters, sampling=tgi_sampling(p))


def tgi_sampling(p: TgiParameters) -> Sampling:
    """TGI's rule: sampling when do_sample is true or a sampling field is set away from its neutral value
    (temperature 1, top_k 0, top_p 1); then temperature defaults to 1. Else greedy, with the repetition penalty
    all the same. The values are checked by the engine (a 400 naming parameters.<field>)."""
    penalty = 1.0 if p.repetition_penalty is None else p.repetition_penalty
    sampled = p.do_sample or p.temperature not in (None, 1) or p.top_k not in (None, 0) or p.top_p not in (None, 1)
    if not sampled:
        return Sampling(repetition_penalty=penalty)
    return Sampling(
        temperature=1.0 if p.temperature is None else p.temperature,
        top_p=1.0 if p.top_p is None else p.top_p,
        top_k=0 if p.top_k is None else p.top_k,
        repetition_penalty=penalty,
        seed=p.seed,
    )


def _stops(field: str, stop: str | list[str] | None) -> tuple[str, ...]:
    """The stop strings, or a 400 naming the field: at most `max_stops` of at most `max_stop_chars` each."""
    stops = (stop,) if isinstance(stop, str) else tuple(stop or ())
    most, longest = SERVE["max_stops"], SERVE["max_stop_chars"]
    if len(stops) > most:
        raise ApiError(400, f"{field}: give at most {most} stop sequences, not {len(stops)}.")
    for i, text in enumerate(stops):
        if len(text) > longest:
            where = field if isinstance(stop, str) else f"{field}[{i}]"
            raise ApiError(400, f"{where} is {len(text)} characters, more than the limit of {longest}.")
    return stops


def _shown(value) -> str:
    """A refused value as JSON, cut short: an error names the value, it does not echo a megabyte."""
    text = json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _merged(m: MergedAdapters) -> tuple[tuple[str, float], ...]:
    strategy = m.merge_strategy or "linear"
    if strategy != "linear":
        raise ApiError(
            400,
            f"merge_strategy '{strategy}' is not served per request (it is a one-off merge of the "
            "adapters' weights). Use 'linear', or merge offline with `lorahub compose --formula "
            f"{strategy.replace('dare_ties', 'ties')}` and register the result.",
        )
    if not m.ids or len(m.ids) != len(m.weights):
        raise ApiError(
            400, f"merged_adapters has {len(m.ids)} ids and {len(m.weights)} weights; give one weight per id."
        )
    return tuple(zip(m.ids, map(float, m.weights)))


def tgi_answer(answer: Answer, p: TgiParameters | None, tokenizer) -> dict:
    """TGI's generate response; details (tokens with log-probabilities) when asked for."""
    p = p or TgiParameters()
    text = answer.input + answer.output if p.return_full_text else answer.output
    out = {"generated_text": text, "lorahub": answer.route}
    if p.details:
        out["details"] = {
            "finish_reason": answer.finish_reason,
            "generated_tokens": len(answer.tokens),
            "prompt_tokens": answer.prompt_tokens,
            "seed": answer.seed,
            "prefill": [],
            "tokens": tokens(answer, tokenizer),
            "best_of_sequences": None,
        }
    return out


def tokens(answer: Answer, tokenizer) -> list[dict]:
    return [tgi_token(t, lp, tokenizer) for t, lp in zip(answer.tokens, answer.logprobs)]


def tgi_token(token: int, logprob: float, tokenizer) -> dict:
    return {
        "id": token,
        "text": tokenizer.decode([token]),
        "logprob": logprob,
        "special": token in tokenizer.all_special_ids,
    }


def tgi_event(index: int, token: dict, answer: Answer | None, p: TgiParameters | None) -> str:
    """One server-sent event of TGI's generate_stream; the last (`answer` given) carries the text and details."""
    p = p or TgiParameters()
    event = {"index": index, "token": token, "generated_text": None, "details": None}
    if answer is not None:
        event["generated_text"] = answer.input + answer.output if p.return_full_text else answer.output
        event["details"] = {
            "finish_reason": answer.finish_reason,
            "generated_tokens": len(answer.tokens),
            "prompt_tokens": answer.prompt_tokens,
            "seed": answer.seed,
        }
    return f"data:{json.dumps(event)}\n\n"


# --- OpenAI ----------------------------------------------------------------------------------------


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: StrictBool | None = None  # a last chunk with `usage` (and no choices) before [DONE]


class OpenAiOptions(BaseModel):
    """The fields completions and chat completions share (OpenAI's, plus lorahub's k and compose and vLLM's top_k
    and repetition_penalty)."""

    model_config = ConfigDict(extra="forbid")  # a misspelt option is an error, not silently ignored
    # a served adapter id answers with that adapter; anything else retrieves
    model: Annotated[str, Field(max_length=SERVE["max_model_chars"])] | None = None
    max_tokens: StrictInt | None = None  # OpenAI's default is 16 (or the server's limit if lower)
    stop: StrictStr | list[StrictStr] | None = None
    temperature: Number | None = None  # OpenAI's default: 1; 0 is greedy
    top_p: Number | None = None
    n: StrictInt | None = None  # choices per prompt
    stream: StrictBool | None = False
    stream_options: StreamOptions | None = None
    seed: StrictInt | None = None  # choice j samples with seed + j
    user: Annotated[str, Field(max_length=SERVE["max_id_chars"])] | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict | None = None
    k: StrictInt | None = None
    compose: Compose = None
    top_k: StrictInt | None = None
    repetition_penalty: Number | None = None


class CompletionBody(OpenAiOptions):
    prompt: StrictStr | list[StrictStr]
    logprobs: int | None = None
    echo: StrictBool | None = None
    best_of: int | None = None
    suffix: str | None = None


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: StrictStr


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "developer", "user", "assistant"]
    content: StrictStr | list[TextPart]
    name: Id | None = None

    @property
    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(part.text for part in self.content)


class ChatBody(OpenAiOptions):
    messages: list[ChatMessage]
    max_completion_tokens: StrictInt | None = None  # the newer name of max_tokens
    logprobs: StrictBool | None = None
    top_logprobs: int | None = None


_OPENAI_UNSUPPORTED = {  # field -> (values that mean "not used", why it is refused)
    "logprobs": ((None, False), "log-probabilities are returned by POST /generate with details (TGI)"),
    "top_logprobs": ((None,), "log-probabilities are returned by POST /generate with details (TGI)"),
    "echo": ((None, False), "the prompt is not echoed"),
    "best_of": ((None, 1), "one sequence is generated per choice (use n)"),
    "suffix": ((None,), "insertion is not supported"),
    "presence_penalty": ((None, 0, 0.0), "use repetition_penalty"),
    "frequency_penalty": ((None, 0, 0.0), "use repetition_penalty"),
    "logit_bias": ((None, {}), "logit biases are not supported"),
}
OPENAI_MAX_TOKENS = 16
FINISH = {"eos_token": "stop", "stop_sequence": "stop", "length": "length"}


def _openai_requests(body: OpenAiOptions, prompts: list, served: set[str], max_prompts: int, max_new_tokens: int):
    """Requests for `prompts` (input text, or (input text, token ids) for chat), n of each: choice j of prompt i
    is request i * n + j, sampled with seed + j."""
    for name, (unused, why) in _OPENAI_UNSUPPORTED.items():
        value = getattr(body, name, None)
        if value not in unused:
            raise ApiError(400, f"{name} = {_shown(value)} is not supported ({why}). Leave it out.")
    n = 1 if body.n is None else body.n
    if n < 1:
        raise ApiError(400, f"n = {n} must be 1 or more.")
    if not 1 <= len(prompts) * n <= max_prompts:
        raise ApiError(400, f"give 1 to {max_prompts} prompts x n, not {len(prompts)} x {n}.")
    if body.seed is not None and not 0 <= body.seed < 2**64:
        raise ApiError(400, f"seed = {_shown(body.seed)} must be in 0..2^64-1.")
    if body.stream_options is not None and not body.stream:
        raise ApiError(400, "stream_options is only for stream: true.")
    stop = _stops("stop", body.stop)
    adapters = ((body.model, 1.0),) if body.model in served else None
    if adapters is not None and (body.k is not None or body.compose is not None):
        raise ApiError(400, f"model '{body.model}' names one adapter; k and compose choose retrieval. Drop them.")
    limit = getattr(body, "max_completion_tokens", None)
    limit = body.max_tokens if limit is None else limit
    limit = min(OPENAI_MAX_TOKENS, max_new_tokens) if limit is None else limit
    requests = []
    for prompt in prompts:
        text, ids = prompt if isinstance(prompt, tuple) else (prompt, None)
        for j in range(n):
            sampling = Sampling(
                temperature=1.0 if body.temperature is None else body.temperature,
                top_p=1.0 if body.top_p is None else body.top_p,
                top_k=0 if body.top_k is None else body.top_k,
                repetition_penalty=1.0 if body.repetition_penalty is None else body.repetition_penalty,
                seed=None if body.seed is None else (body.seed + j) % 2**64,
            )
            requests.append(Request(text, body.k, body.compose, limit, stop, adapters, sampling=sampling, ids=ids))
    return requests


def completion_requests(body: CompletionBody, served: set[str], max_prompts: int, max_new_tokens: int) -> list[Request]:
    prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
    return _openai_requests(body, prompts, served, max_prompts, max_new_tokens)


def chat_messages(body: ChatBody, max_chars: int) -> list[dict]:
    """The messages as a chat template reads them, or a 400/413: at least one, a user message last (what the
    answer follows), at most `max_chars` characters in all."""
    if not body.messages:
        raise ApiError(400, "messages is empty: give at least one {role, content}.")
    messages = [{"role": m.role, "content": m.text} for m in body.messages]
    total = sum(len(m["content"]) for m in messages)
    if total > max_chars:
        raise ApiError(413, f"the messages hold {total} characters, more than the limit of {max_chars}.")
    if messages[-1]["role"] != "user":
        raise ApiError(400, f"the last message is the {messages[-1]['role']}'s; the answer follows a user message.")
    return messages


def chat_requests(
    body: ChatBody, messages: list[dict], ids: list[int], served: set[str], max_prompts: int, max_new_tokens: int
):
    """The requests of a chat: the rendered conversation's ids, retrieval by the last user message."""
    return _openai_requests(body, [(messages[-1]["content"], ids)], served, max_prompts, max_new_tokens)


def _usage(answers: list[Answer]) -> dict:
    prompt_tokens = sum(a.prompt_tokens for a in answers)
    completion_tokens = sum(len(a.tokens) for a in answers)
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def _lorahub(answer: Answer) -> dict:
    return {**answer.route, **({"seed": answer.seed} if answer.seed is not None else {})}


def openai_answer(body: OpenAiOptions, answers: list[Answer], default_model: str, chat: bool) -> dict:
    """A completion (`chat` False: each choice's `text`) or chat completion (its assistant `message`)."""
    return {
        "id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}",
        "object": "chat.completion" if chat else "text_completion",
        "created": int(time.time()),
        "model": body.model or default_model,
        "choices": [
            {
                "index": i,
                **({"message": {"role": "assistant", "content": a.output}} if chat else {"text": a.output}),
                "finish_reason": FINISH[a.finish_reason],
                "logprobs": None,
                "lorahub": _lorahub(a),
            }
            for i, a in enumerate(answers)
        ],
        "usage": _usage(answers),
    }


class TextPieces:
    """One streamed choice's text, in pieces whose concatenation is the answer's text (`Answer.output`): after each
    token, the text decoded so far is sent up to what cannot change any more. Held back: trailing whitespace (the
    answer is stripped), an incomplete character (U+FFFD at the end), and an end that may begin a stop string
    (the answer ends before it). The rest comes with the last token."""

    def __init__(self, tokenizer, stops: tuple[str, ...]):
        self.tokenizer, self.stops, self.tokens, self.sent = tokenizer, stops, [], ""

    def push(self, token: int) -> str:
        self.tokens.append(token)
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True).lstrip()
        for stop in self.stops:
            if stop in text:
                text = text[: text.index(stop)]
        text = text.rstrip("\ufffd").rstrip()
        held = max((n for stop in self.stops for n in range(1, len(stop)) if text.endswith(stop[:n])), default=0)
        text = text[: len(text) - held]
        if not text.startswith(self.sent):
            return ""
        piece, self.sent = text[len(self.sent) :], text
        return piece

    def end(self, answer: Answer) -> str:
        """What remains of the answer's text (nothing when what was sent is not its beginning: never seen)."""
        return answer.output[len(self.sent) :] if answer.output.startswith(self.sent) else ""


class OpenAiStream:
    """The server-sent events of a streamed completion (`chat` False) or chat completion: `data: {chunk}` lines, a
    usage chunk when asked for (`stream_options.include_usage`), then `data: [DONE]`."""

    def __init__(self, body: OpenAiOptions, default_model: str, chat: bool):
        self.chat, self.created, self.model = chat, int(time.time()), body.model or default_model
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.usage = bool(body.stream_options and body.stream_options.include_usage)

    def _chunk(self, choices: list[dict], usage: dict | None = None) -> str:
        chunk = {
            "id": self.id,
            "object": "chat.completion.chunk" if self.chat else "text_completion",
            "created": self.created,
            "model": self.model,
            "choices": choices,
        }
        if self.usage:
            chunk["usage"] = usage  # null on every chunk but the last, as OpenAI sends it
        return f"data: {json.dumps(chunk)}\n\n"

    def start(self, index: int) -> str:
        """Chat: the first chunk of a choice carries the role."""
        return self._choice(index, "", None, role=True) if self.chat else ""

    def piece(self, index: int, text: str, answer: Answer | None = None) -> str:
        """A piece of a choice's text; with `answer`, its last (with the finish reason)."""
        if not text and answer is None:
            return ""
        return self._choice(index, text, answer)

    def _choice(self, index: int, text: str, answer: Answer | None, role: bool = False) -> str:
        finish = None if answer is None else FINISH[answer.finish_reason]
        if self.chat:
            delta = {"role": "assistant", "content": text} if role else ({"content": text} if text else {})
            choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}
        else:
            choice = {"index": index, "text": text, "logprobs": None, "finish_reason": finish}
        if answer is not None:
            choice["lorahub"] = _lorahub(answer)
        return self._chunk([choice])

    def end(self, answers: list[Answer]) -> str:
        return (self._chunk([], _usage(answers)) if self.usage else "") + "data: [DONE]\n\n"

    @staticmethod
    def error(message: str, kind: str, status: int) -> str:
        return f"data: {json.dumps({'error': {'message': message, 'type': kind, 'code': status}})}\n\n"


def models(default_model: str, adapters: list[str], started: int) -> dict:
    """What `model` can name: the retrieving default (the base model's name) and each served adapter."""
    entry = lambda name, owner: {"id": name, "object": "model", "created": started, "owned_by": owner}  # noqa: E731
    return {
        "object": "list",
        "data": [entry(default_model, "lorahub")] + [entry(a, "lorahub-adapter") for a in adapters],
    }
