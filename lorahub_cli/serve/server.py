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
import errno
import json
import socket
import time
import uuid
from contextlib import asynccontextmanager
from typing import Literal, Optional, Union

from fastapi import FastAPI, Request as HttpRequest
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, StrictInt, StrictStr, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import InputError
from .batcher import Batcher, QueueFull, ShuttingDown
from .engine import InputTooLong, Request
from .routing import COMPOSE_MODES

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


def _load_json(body: bytes):
    """The body as JSON, or a 400: malformed, nested too deeply for the parser, or holding a lone surrogate
    (valid JSON escapes, but no text: the tokenizer and the answer's UTF-8 would fail on it)."""
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise HttpError(400, f"the body is not valid JSON ({error}).") from None
    except RecursionError:
        raise HttpError(400, "the body's JSON is nested too deeply.") from None
    if b"\\u" in body:  # only an escape can spell a surrogate: valid UTF-8 bytes cannot
        try:
            json.dumps(data, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError as error:
            bad = error.object[error.start:error.end].encode("unicode_escape").decode()
            raise HttpError(400, f"the body holds a lone surrogate ({bad}), which is no text.") from None
    return data


async def _parse(request: HttpRequest, model: type[BaseModel]) -> BaseModel:
    """The body as `model`, whatever its Content-Type (`curl -d` sends form-encoded); a 400 naming the bad field."""
    data = _load_json(await request.body())
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
        # After an abandon (shutdown deadline) the worker may still hold a batch: do not wait for it.
        await asyncio.to_thread(batcher.close, None if batcher.accepting else 1.0)

    app = FastAPI(title="lorahub", lifespan=lifespan)
    app.state.batcher, app.state.engine = batcher, engine

    @app.exception_handler(HttpError)
    async def http_error(_, error: HttpError):
        return _error(error.status, error.message, error.kind, error.headers)

    @app.exception_handler(StarletteHTTPException)
    async def routing_error(request: HttpRequest, error: StarletteHTTPException):
        message = {404: f"no route {request.url.path}.", 405: f"{request.method} is not allowed on {request.url.path}."}
        return _error(error.status_code, message.get(error.status_code, str(error.detail)), "invalid_request_error",
                      getattr(error, "headers", None))

    @app.exception_handler(Exception)
    async def unexpected(_, error: Exception):
        return _error(500, f"internal error: {type(error).__name__}: {error}", "server_error")

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
        except ShuttingDown as error:
            raise HttpError(503, str(error), "overloaded") from None
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


def check_port(host: str, port: int) -> None:
    """An InputError if (host, port) cannot be bound, before anything is loaded."""
    if port == 0:
        return
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as error:
        raise InputError(f"cannot listen on host '{host}' ({error.strerror}).", "Give --host 127.0.0.1 or 0.0.0.0.") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds: a TIME_WAIT port is free
        try:
            probe.bind(address)
        except OSError as error:
            taken = error.errno == errno.EADDRINUSE
            raise InputError(f"{host}:{port} is in use." if taken else f"cannot listen on {host}:{port} ({error.strerror}).",
                             "Choose another --port, or stop what listens there.") from None


def make_server(app: FastAPI, *, host: str = "127.0.0.1", port: int = 8000, shutdown_timeout: float = 60.0,
                log_level: str = "info"):
    """A uvicorn server whose shutdown keeps the promise: on SIGINT/SIGTERM no new request is accepted, open
    ones get `shutdown_timeout` seconds to finish, and those still open then are answered 503 (not dropped)."""
    import copy

    import uvicorn
    from uvicorn.config import LOGGING_CONFIG

    logging = copy.deepcopy(LOGGING_CONFIG)
    for handler in logging["handlers"].values():
        handler["stream"] = "ext://sys.stderr"  # stdout is for data
    batcher = app.state.batcher

    class Server(uvicorn.Server):
        async def shutdown(self, sockets=None):
            batcher.stop_accepting()
            deadline = asyncio.get_running_loop().call_later(shutdown_timeout, batcher.abandon)
            try:
                await super().shutdown(sockets)
            finally:
                deadline.cancel()

    # uvicorn cancels whatever is still open after its own timeout: give the 503s time to be written first.
    config = uvicorn.Config(app, host=host, port=port, log_config=logging, log_level=log_level,
                            timeout_graceful_shutdown=shutdown_timeout + _ANSWER_GRACE)
    return Server(config)


_ANSWER_GRACE = 2.0  # seconds between the shutdown deadline's 503s and uvicorn cancelling the connections


def run(app: FastAPI, *, host: str = "127.0.0.1", port: int = 8000, shutdown_timeout: float = 60.0) -> None:
    """Serve until SIGINT/SIGTERM."""
    make_server(app, host=host, port=port, shutdown_timeout=shutdown_timeout).run()
