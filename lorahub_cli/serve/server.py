"""The HTTP server: FastAPI over a `Batcher` over an `Engine`.

    POST /v1/generate      {"input", "k"?, "compose"?, "max_new_tokens"?} -> {"input", "output", "compose", "adapters"}
    POST /v1/completions   OpenAI-style text completions (greedy; "k" and "compose" as extra fields)
    GET  /health           status, queue length, batch statistics, the engine's settings

Every request is checked in the handler (4xx, nothing queued) before it enters the
bounded queue (503 with Retry-After when full); an accepted request is always answered.
Errors are `{"error": {"message", "type", "code"}}`, as OpenAI's API shapes them.
On SIGINT/SIGTERM uvicorn stops accepting connections and waits for open requests;
then the batcher answers what is still queued and stops.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from contextlib import asynccontextmanager
from typing import Literal, Optional, Union

from fastapi import FastAPI, Request as HttpRequest
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, StrictInt, StrictStr, ValidationError

from ..errors import InputError
from .batcher import Batcher, QueueFull, ShuttingDown
from .engine import InputTooLong, Request
from ..routing import COMPOSE_MODES

LIMITS = {"max_batch": 32, "window": 0.01, "max_queue": 256, "max_input_chars": 16_000, "max_prompts": 64}
Compose = Optional[Literal[tuple(COMPOSE_MODES)]]  # the modes the routing module registers


class GenerateBody(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a misspelt option is an error, not silently ignored
    input: StrictStr
    k: Optional[StrictInt] = None
    compose: Compose = None
    max_new_tokens: Optional[StrictInt] = None


class CompletionBody(BaseModel):
    model_config = ConfigDict(extra="ignore")  # OpenAI clients send fields that greedy decoding does not use
    model: Optional[str] = None
    prompt: Union[StrictStr, list[StrictStr]]
    max_tokens: Optional[StrictInt] = None
    temperature: Optional[float] = None
    n: StrictInt = 1
    stream: bool = False
    k: Optional[StrictInt] = None
    compose: Compose = None


class HttpError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", headers: dict | None = None):
        self.status, self.message, self.kind, self.headers = status, message, kind, headers


async def _parse(request: HttpRequest, model: type[BaseModel]) -> BaseModel:
    """The body as `model`, whatever its Content-Type (`curl -d` sends form-encoded); a 400 naming the bad field."""
    try:
        data = json.loads(await request.body())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise HttpError(400, f"the body is not valid JSON ({error}).") from None
    try:
        return model.model_validate(data)
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(part) for part in first.get("loc", ()))
        raise HttpError(400, f"{where + ': ' if where else ''}{first.get('msg', 'invalid request')}") from None


def _error(status: int, message: str, kind: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "code": status}}, status_code=status, headers=headers)


def create_app(engine, *, max_batch: int = LIMITS["max_batch"], window: float = LIMITS["window"],
               max_queue: int = LIMITS["max_queue"], max_input_chars: int = LIMITS["max_input_chars"],
               max_prompts: int = LIMITS["max_prompts"]) -> FastAPI:
    """An app serving `engine` (anything with check(Request), run(list[Request]) and info())."""
    batcher = Batcher(engine.run, max_batch=max_batch, window=window, max_queue=max_queue)
    # Room for max_prompts inputs of max_input_chars UTF-8 characters (up to 4 bytes each) and the JSON around them.
    max_body = 4 * max_input_chars * max_prompts + 65_536

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        batcher.start()
        yield
        await asyncio.to_thread(batcher.close)

    app = FastAPI(title="lorahub", lifespan=lifespan)
    app.state.batcher, app.state.engine = batcher, engine

    @app.exception_handler(HttpError)
    async def http_error(_, error: HttpError):
        return _error(error.status, error.message, error.kind, error.headers)

    @app.middleware("http")
    async def limit_body(request: HttpRequest, call_next):
        length = request.headers.get("content-length")
        if length and length.isdigit() and int(length) > max_body:
            return _error(413, f"the request body is {length} bytes, more than the limit of {max_body}.", "invalid_request_error")
        return await call_next(request)

    def check(request: Request) -> Request:
        if len(request.input) > max_input_chars:
            raise HttpError(413, f"the input is {len(request.input)} characters, more than the limit of {max_input_chars}.")
        try:
            return engine.check(request)
        except InputTooLong as error:
            raise HttpError(413, str(error)) from None
        except InputError as error:
            raise HttpError(400, str(error)) from None

    async def answer(requests: list[Request]) -> list:
        checked = [check(r) for r in requests]  # all or nothing: no request is queued if one is bad
        try:
            futures = [batcher.submit(r) for r in checked]
        except (QueueFull, ShuttingDown) as error:
            raise HttpError(503, str(error), "overloaded", {"Retry-After": "1"}) from None
        try:
            return [await asyncio.wrap_future(f) for f in futures]
        except Exception as error:  # noqa: BLE001 - a failed batch is the server's fault, not the client's
            raise HttpError(500, f"generation failed: {error}", "server_error") from None

    @app.get("/health")
    async def health():
        s = batcher.stats
        return {"status": "ok" if batcher.accepting else "draining", "queued": batcher.queued,
                "batches": s.batches, "requests": s.requests, "largest_batch": s.largest_batch,
                "limits": {"max_batch": max_batch, "window": window, "max_queue": max_queue,
                           "max_input_chars": max_input_chars, "max_prompts": max_prompts},
                "engine": engine.info()}

    @app.post("/v1/generate")
    async def generate(request: HttpRequest):
        body = await _parse(request, GenerateBody)
        (result,) = await answer([Request(body.input, body.k, body.compose, body.max_new_tokens)])
        return result.to_json()

    @app.post("/v1/completions")
    async def completions(request: HttpRequest):
        body = await _parse(request, CompletionBody)
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if body.stream or body.n != 1 or (body.temperature or 0) > 0:
            raise HttpError(400, "this server decodes greedily: one completion per prompt, no streaming, temperature 0.")
        if not 1 <= len(prompts) <= max_prompts:
            raise HttpError(400, f"give 1 to {max_prompts} prompts, not {len(prompts)}.")
        results = await answer([Request(p, body.k, body.compose, body.max_tokens) for p in prompts])
        return {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": body.model or engine.info().get("base_model", "lorahub"),
                "choices": [{"index": i, "text": r.output, "finish_reason": None, "logprobs": None, "lorahub": r.route}
                            for i, r in enumerate(results)]}

    return app


def run(app: FastAPI, *, host: str = "127.0.0.1", port: int = 8000, shutdown_timeout: float | None = 60.0) -> None:
    """Serve until SIGINT/SIGTERM; uvicorn's logs go to stderr (stdout is for data)."""
    import copy

    import uvicorn
    from uvicorn.config import LOGGING_CONFIG

    logging = copy.deepcopy(LOGGING_CONFIG)
    for handler in logging["handlers"].values():
        handler["stream"] = "ext://sys.stderr"
    uvicorn.run(app, host=host, port=port, log_config=logging, timeout_graceful_shutdown=shutdown_timeout)
