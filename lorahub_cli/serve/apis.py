"""The request and answer shapes of the APIs clients already speak, translated to and from engine Requests.

- TGI (`POST /generate`, `POST /generate_stream`, `POST /`), with LoRAX's per-request
  `adapter_id` and `merged_adapters`: what `huggingface_hub.InferenceClient.text_generation`
  and `lorax.Client.generate` send. Shapes read from those clients' sources (huggingface_hub
  2.4 `inference/_client.py`, lorax-client 0.6.3 `lorax/types.py`).
- OpenAI text completions (`POST /v1/completions`, `GET /v1/models`), as the `openai` client sends them.

Decoding is greedy: every sampling option is refused with a 400 naming it, never ignored. Every
field is bounded (stop strings in number and length, names in length; the input by the server).
A translation raises `ApiError(status, message)`; the server shapes it per API.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Annotated, Literal, Optional  # noqa: UP035

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr

from ..routing import COMPOSE_MODES
from ..settings import SERVE
from .engine import Answer, Request

Compose = Optional[Literal[tuple(COMPOSE_MODES)]]  # noqa: UP045 - a runtime value, built from a tuple  # the modes the routing module registers
GREEDY = "this server decodes greedily (the same answer every time)"
Id = Annotated[StrictStr, Field(max_length=SERVE["max_id_chars"])]  # an adapter id, a merge strategy


# A Request field -> what each API calls it, so that an error names the field the client sent.
OPENAI_FIELDS = {"max_new_tokens": "max_tokens"}
TGI_FIELDS = {"max_new_tokens": "parameters.max_new_tokens", "k": "parameters.k"}


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
    seed: StrictInt | None = None  # greedy decoding needs no seed
    k: StrictInt | None = None
    compose: Compose = None
    # Refused unless left at their defaults: sampling, penalties, extra outputs this server does not compute.
    do_sample: StrictBool = False
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    typical_p: float | None = None
    best_of: int | None = None
    repetition_penalty: float | None = None
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
    "do_sample": (False, GREEDY),
    "temperature": (None, GREEDY),
    "top_k": (None, GREEDY),
    "top_p": (None, GREEDY),
    "typical_p": (None, GREEDY),
    "best_of": (None, GREEDY),
    "watermark": (False, "watermarking is not supported"),
    "repetition_penalty": (None, "penalties are not supported"),
    "frequency_penalty": (None, "penalties are not supported"),
    "ignore_eos_token": (False, "generation always stops at the end-of-sequence token"),
    "decoder_input_details": (False, "prompt log-probabilities are not computed"),
    "top_n_tokens": (None, "alternative tokens are not computed"),
    "return_k_alternatives": (None, "alternative tokens are not computed"),
    "truncate": (None, "inputs are never truncated (too long an input is refused)"),
    "grammar": (None, "constrained decoding is not supported"),
    "response_format": (None, "constrained decoding is not supported"),
}
_OPTIONAL_ONE = {"best_of": 1}  # TGI clients may send best_of=1, which is greedy


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
    return Request(body.inputs, p.k, p.compose, p.max_new_tokens, _stops("parameters.stop", p.stop), adapters)


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
            "seed": None,
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
            "seed": None,
        }
    return f"data:{json.dumps(event)}\n\n"


def tgi_events(answer: Answer, p: TgiParameters | None, tokenizer) -> list[str]:
    """Every event of a finished answer: one per token, the last with the text and details."""
    items = tokens(answer, tokenizer)
    return [tgi_event(i, token, answer if i == len(items) - 1 else None, p) for i, token in enumerate(items)]


# --- OpenAI ----------------------------------------------------------------------------------------


class CompletionBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    # a served adapter id answers with that adapter; anything else retrieves
    model: Annotated[str, Field(max_length=SERVE["max_model_chars"])] | None = None
    prompt: StrictStr | list[StrictStr]
    max_tokens: StrictInt | None = None  # OpenAI's default is 16 (or the server's limit if lower)
    stop: StrictStr | list[StrictStr] | None = None
    temperature: float | None = None
    top_p: float | None = None
    n: StrictInt | None = 1
    stream: StrictBool | None = False
    seed: int | None = None
    user: Annotated[str, Field(max_length=SERVE["max_id_chars"])] | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict | None = None
    logprobs: int | None = None
    echo: StrictBool | None = None
    best_of: int | None = None
    suffix: str | None = None
    k: StrictInt | None = None
    compose: Compose = None


_OPENAI_UNSUPPORTED = {  # field -> values that mean "not used"
    "logprobs": (None,),
    "echo": (None, False),
    "best_of": (None, 1),
    "suffix": (None,),
    "temperature": (None, 0, 0.0),
    "top_p": (None, 1, 1.0),
    "n": (None, 1),
    "stream": (None, False),
    "presence_penalty": (None, 0, 0.0),
    "frequency_penalty": (None, 0, 0.0),
    "logit_bias": (None, {}),
}
_OPENAI_WHY = {
    "temperature": GREEDY,
    "top_p": GREEDY,
    "n": GREEDY + ": one completion per prompt",
    "stream": "streaming is served by POST /generate_stream (TGI)",
    "logprobs": "log-probabilities are returned by POST /generate with details (TGI)",
}


OPENAI_MAX_TOKENS = 16


def completion_requests(body: CompletionBody, served: set[str], max_prompts: int, max_new_tokens: int) -> list[Request]:
    for name, unused in _OPENAI_UNSUPPORTED.items():
        value = getattr(body, name)
        if value not in unused:
            why = _OPENAI_WHY.get(name, "not supported by this server")
            raise ApiError(400, f"{name} = {_shown(value)} is not supported ({why}). Leave it out.")
    prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
    if not 1 <= len(prompts) <= max_prompts:
        raise ApiError(400, f"give 1 to {max_prompts} prompts, not {len(prompts)}.")
    stop = _stops("stop", body.stop)
    adapters = ((body.model, 1.0),) if body.model in served else None
    if adapters is not None and (body.k is not None or body.compose is not None):
        raise ApiError(400, f"model '{body.model}' names one adapter; k and compose choose retrieval. Drop them.")
    limit = min(OPENAI_MAX_TOKENS, max_new_tokens) if body.max_tokens is None else body.max_tokens
    return [Request(p, body.k, body.compose, limit, stop, adapters) for p in prompts]


def completion_answer(body: CompletionBody, answers: list[Answer], default_model: str) -> dict:
    finish = {"eos_token": "stop", "stop_sequence": "stop", "length": "length"}
    prompt_tokens = sum(a.prompt_tokens for a in answers)
    completion_tokens = sum(len(a.tokens) for a in answers)
    return {
        "id": f"cmpl-{uuid.uuid4().hex}",
        "object": "text_completion",
        "created": int(time.time()),
        "model": body.model or default_model,
        "choices": [
            {
                "index": i,
                "text": a.output,
                "finish_reason": finish[a.finish_reason],
                "logprobs": None,
                "lorahub": a.route,
            }
            for i, a in enumerate(answers)
        ],
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },
    }


def models(default_model: str, adapters: list[str], started: int) -> dict:
    """What `model` can name: the retrieving default (the base model's name) and each served adapter."""
    entry = lambda name, owner: {"id": name, "object": "model", "created": started, "owned_by": owner}  # noqa: E731
    return {
        "object": "list",
        "data": [entry(default_model, "lorahub")] + [entry(a, "lorahub-adapter") for a in adapters],
    }
