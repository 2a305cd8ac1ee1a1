"""The HTTP server: FastAPI over a `Batcher` over an `Engine`.

    POST /v1/generate       lorahub's own: {"input", "k"?, "compose"?, "max_new_tokens"?, sampling fields?}
                            -> {"input", "output", "compose", "adapters"}
    POST /v1/completions    OpenAI text completions, streamed with "stream": true (`model` may name one adapter;
                            "k", "compose", "top_k", "repetition_penalty" extra)
    POST /v1/chat/completions  OpenAI chat, rendered with the base model's chat template (decoder-only)
    GET  /v1/models         what `model` can name
    POST /generate          TGI, with LoRAX's adapter_id / merged_adapters
    POST /generate_stream   TGI's server-sent events
    POST /                  TGI's and LoRAX's clients: /generate, or /generate_stream with "stream": true
    GET  /health            status, queue length, batch statistics, the engine's settings (no key needed)

Every request is checked in the handler (4xx, nothing queued) before it enters the
bounded queue (503 with Retry-After when full); an accepted request is always answered.
Errors are JSON: `{"error": {"message", "type", "code"}}` as OpenAI's API shapes them, and
`{"error": message, "error_type": type}` on the TGI routes, as TGI shapes them.
With an API key, every route but /health needs `Authorization: Bearer <key>` (JSON 401).
On SIGINT/SIGTERM no new request is accepted; open ones get `--shutdown-timeout` seconds,
then whatever is still open is answered 503 (see `make_server`).
"""

from __future__ import annotations

import asyncio
import errno
import hmac
import json
import logging
import re
import socket
import time
from concurrent.futures import Future
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass

from fastapi import FastAPI
from fastapi import Request as HttpRequest
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, StrictInt, StrictStr, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..decoding import Sampling
from ..errors import InputError
from ..settings import SERVE
from . import apis
from .batcher import Batcher, QueueFull, ShuttingDown
from .engine import Answer, FieldError, InputTooLong, Request, ServingEngine

TGI_ROUTES = ("/", "/generate", "/generate_stream")
OPEN_ROUTES = ("/health",)  # answered without the API key


@dataclass(frozen=True)
class Limits:
    """What the server takes in (defaults: settings.SERVE)."""

    max_batch: int = SERVE["batch_size"]  # rows decoded together
    window: float = SERVE["batch_window_ms"] / 1000  # seconds an idle server waits for a batch to fill
    max_queue: int = SERVE["max_queue"]  # waiting requests; beyond it, 503
    max_input_chars: int = SERVE["max_input_chars"]
    max_prompts: int = SERVE["max_prompts"]  # prompts in one OpenAI completion

    @property
    def max_body(self) -> int:
        """Room for max_prompts inputs of max_input_chars UTF-8 characters (up to 4 bytes each) and the JSON
        around them."""
        return 4 * self.max_input_chars * self.max_prompts + 65_536


class GenerateBody(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a misspelt option is an error, not silently ignored
    input: StrictStr
    k: StrictInt | None = None
    compose: apis.Compose = None
    max_new_tokens: StrictInt | None = None
    # decoding.Sampling: greedy unless temperature > 0
    temperature: apis.Number = 0.0
    top_p: apis.Number = 1.0
    top_k: StrictInt = 0
    repetition_penalty: apis.Number = 1.0
    seed: StrictInt | None = None


class HttpError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", headers: dict | None = None):
        self.status, self.message, self.kind, self.headers = status, message, kind, headers


def _load_json(body: bytes):
    """The body as JSON, or a 400: malformed, nested too deeply for the parser, or holding a lone surrogate
    (valid JSON escapes, but no text: the tokenizer and the answer's UTF-8 would fail on it)."""
    try:
        data = json.loads(body)
    except ValueError as error:  # malformed, not UTF-8, or an integer of more than Python's 4300 digits
        raise HttpError(400, f"the body is not valid JSON ({error}).") from None
    except RecursionError:
        raise HttpError(400, "the body's JSON is nested too deeply.") from None
    if b"\\u" in body:  # only an escape can spell a surrogate: valid UTF-8 bytes cannot
        try:
            json.dumps(data, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError as error:
            bad = error.object[error.start : error.end].encode("unicode_escape").decode()
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


_TGI_KINDS = {"invalid_request_error": "validation", "server_error": "generation"}  # TGI's error_type names


def _error(status: int, message: str, kind: str, headers: dict | None = None, path: str = "") -> JSONResponse:
    body = (
        {"error": message, "error_type": _TGI_KINDS.get(kind, kind)}
        if path in TGI_ROUTES
        else {"error": {"message": message, "type": kind, "code": status}}
    )
    return JSONResponse(body, status_code=status, headers=headers)


class _Gate:
    """Pure ASGI middleware (no per-request task or body copy, unlike @app.middleware): the API key and the
    body size, checked before any handler runs. A body sent without Content-Length (chunked) is counted as
    it arrives: the read that passes the limit fails with a 413, so no more than the limit is ever held."""

    def __init__(self, app, *, api_key: str | None, max_body: int):
        self.app, self.max_body = app, max_body
        self.expected = f"Bearer {api_key}".encode() if api_key else None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        path = scope["path"]
        refusal = None
        if self.expected is not None and path not in OPEN_ROUTES:
            given = headers.get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):
                what = "a wrong API key" if given else "no API key"
                refusal = _error(
                    401,
                    f"{what}: send the header 'Authorization: Bearer <key>' with the key the server was started with.",
                    "authentication_error",
                    {"WWW-Authenticate": "Bearer"},
                    path,
                )
        length = headers.get(b"content-length", b"")
        if refusal is None and length.isdigit() and int(length) > self.max_body:
            refusal = _error(
                413,
                f"the request body is {int(length)} bytes, more than the limit of {self.max_body}.",
                "invalid_request_error",
                None,
                path,
            )
        if refusal is not None:
            return await refusal(scope, receive, send)
        received = 0

        async def counted():
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_body:
                raise HttpError(
                    413,
                    f"the request body is more than the limit of {self.max_body} bytes.",
                    headers={"Connection": "close"},  # the rest of the body is never read
                )
            return message

        return await self.app(scope, counted, send)


# --- the service the routes share ------------------------------------------------------------------


class Service:
    """The engine behind its batcher, and what every route does with them: check requests (4xx, nothing queued),
    queue them (503 when full), wait for their answers."""

    def __init__(self, engine: ServingEngine, limits: Limits, api_key: str | None):
        self.engine, self.limits, self.auth = engine, limits, api_key is not None
        # Continuous batching steps the engine's sessions; static batching gives `run` whole batches.
        continuous = engine.batching == "continuous"
        self.batcher = Batcher(
            None if continuous else engine.run,
            session=engine.session if continuous else None,
            max_batch=limits.max_batch,
            window=limits.window,
            max_queue=limits.max_queue,
            size=lambda r: len(r.input),
        )
        self.started = int(time.time())

    @asynccontextmanager
    async def lifespan(self, app: FastAPI):
        self.batcher.start()
        yield
        # After an abandon (shutdown deadline) the worker may still hold a batch: do not wait for it.
        await asyncio.to_thread(self.batcher.close, None if self.batcher.accepting else 1.0)

    def check(self, request: Request, fields: dict[str, str]) -> Request:
        """The request checked by the engine; a 4xx naming each field as the route calls it (`fields`)."""
        limit = self.limits.max_input_chars
        if len(request.input) > limit:
            raise HttpError(413, f"the input is {len(request.input)} characters, more than the limit of {limit}.")
        try:
            return self.engine.check(request)
        except InputTooLong as error:
            raise HttpError(413, str(error)) from None
        except FieldError as error:
            raise HttpError(400, f"{error.named(fields.get(error.field, error.field))} {error.hint}") from None
        except InputError as error:
            raise HttpError(400, str(error)) from None

    def submit(self, request: Request, on_token=None) -> Future:
        """Queue a checked request; a 503 when the queue is full or the server is shutting down."""
        try:
            return self.batcher.submit(request, on_token=on_token)
        except (QueueFull, ShuttingDown) as error:
            raise HttpError(503, str(error), "overloaded", {"Retry-After": "1"}) from None

    def stream(self, checked: list[Request]) -> tuple[asyncio.Queue, list[Future]]:
        """Queue checked requests whose tokens come into the returned queue as the worker decodes them: (i, token,
        logprob, the Answer if this token ended request i, else None) for each, then (i, its settled future) (with
        continuous batching the last token comes first; a static batch settles with no token before).
        Cancel the futures to take the requests out of the batch (a client that left)."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()

        def put(item) -> None:  # from the worker thread
            try:
                loop.call_soon_threadsafe(queue.put_nowait, item)
            except RuntimeError:  # the event loop has closed: nobody listens any more
                pass

        futures = []
        try:
            for i, request in enumerate(checked):
                future = self.submit(request, on_token=lambda token, lp, final, i=i: put((i, token, lp, final)))
                future.add_done_callback(lambda f, i=i: put((i, f)))
                futures.append(future)
        except HttpError:  # a full queue: none of them is answered
            for future in futures:
                future.cancel()
            raise
        return queue, futures

    async def events(self, checked: list[Request]):
        """The stream of `checked` as events: ("token", i, token, logprob, Answer or None) as each is decoded, and
        ("done", i, Answer) or ("failed", i, error) when request i settles; its tokens all came before. Leaving
        early (a client that disconnected) cancels what is still open."""
        queue, futures = self.stream(checked)
        open_, sent = set(range(len(checked))), [0] * len(checked)
        try:
            while open_:
                item = await queue.get()
                if isinstance(item[1], Future):
                    i, future = item
                    if i not in open_:
                        continue
                    open_.discard(i)
                    error = None if future.cancelled() else future.exception()
                    if error is not None or future.cancelled():
                        yield ("failed", i, error or ShuttingDown("the request was cancelled."))
                        continue
                    answer = future.result()
                    # A static batch settles without token events: send its tokens first.
                    for token, logprob in list(zip(answer.tokens, answer.logprobs))[sent[i] :]:
                        sent[i] += 1
                        yield ("token", i, token, logprob, answer if sent[i] == len(answer.tokens) else None)
                    yield ("done", i, answer)
                    continue
                i, token, logprob, final = item
                if i in open_:
                    sent[i] += 1
                    yield ("token", i, token, logprob, final)
                    if final is not None:
                        open_.discard(i)
                        yield ("done", i, final)
        finally:
            for i in open_:  # the client disconnected: their rows leave the batch at the next step
                futures[i].cancel()

    async def answer(self, requests: list[Request], fields: dict[str, str]) -> list[Answer]:
        checked = [self.check(r, fields) for r in requests]  # all or nothing: no request is queued if one is bad
        futures = [self.submit(r) for r in checked]
        try:
            return [await asyncio.wrap_future(f) for f in futures]
        except ShuttingDown as error:
            raise HttpError(503, str(error), "overloaded") from None
        except Exception as error:  # noqa: BLE001 - a failed batch is the server's fault, not the client's
            raise HttpError(500, f"generation failed: {error}", "server_error") from None

    def health(self) -> dict:
        s = self.batcher.stats
        return {
            "status": "ok" if self.batcher.accepting else "draining",
            "queued": self.batcher.queued,
            "batches": s.batches,
            "requests": s.requests,
            "largest_batch": s.largest_batch,
            "steps": s.steps,
            "batching": "continuous" if self.batcher.continuous else "static",
            "limits": asdict(self.limits),
            "auth": self.auth,
            "engine": self.engine.info(),
        }


def _translated(make):
    try:
        return make()
    except apis.ApiError as error:
        raise HttpError(error.status, error.message) from None


# --- the routes ----------------------------------------------------------------------------------------


def _service(request: HttpRequest) -> Service:
    return request.app.state.service


async def health(request: HttpRequest):
    return _service(request).health()


async def generate(request: HttpRequest):
    body = await _parse(request, GenerateBody)
    sampling = Sampling(body.temperature, body.top_p, body.top_k, body.repetition_penalty, body.seed)
    wanted = Request(body.input, body.k, body.compose, body.max_new_tokens, sampling=sampling)
    (result,) = await _service(request).answer([wanted], {})
    return result.to_json()


async def completions(request: HttpRequest):
    service = _service(request)
    body = await _parse(request, apis.CompletionBody)
    engine, limits = service.engine, service.limits
    requests = _translated(
        lambda: apis.completion_requests(body, set(engine.names), limits.max_prompts, engine.max_new_tokens)
    )
    return await _openai(service, body, requests, chat=False)


async def chat_completions(request: HttpRequest):
    service = _service(request)
    body = await _parse(request, apis.ChatBody)
    engine, limits = service.engine, service.limits
    messages = _translated(lambda: apis.chat_messages(body, limits.max_input_chars))
    try:
        ids = engine.chat_ids(messages)
    except InputError as error:
        raise HttpError(400, str(error)) from None
    requests = _translated(
        lambda: apis.chat_requests(body, messages, ids, set(engine.names), limits.max_prompts, engine.max_new_tokens)
    )
    return await _openai(service, body, requests, chat=True)


async def _openai(service: Service, body: apis.OpenAiOptions, requests: list[Request], chat: bool):
    """An OpenAI completion or chat completion: one JSON answer, or with "stream": true its server-sent chunks."""
    fields = {
        **apis.OPENAI_FIELDS,
        **({"max_new_tokens": "max_completion_tokens"} if chat and body.max_tokens is None else {}),
    }
    if not body.stream:
        return apis.openai_answer(body, await service.answer(requests, fields), service.engine.base_model, chat)
    checked = [service.check(r, fields) for r in requests]
    stream = apis.OpenAiStream(body, service.engine.base_model, chat)
    tokenizer = service.engine.tokenizer

    async def chunks():
        pieces = [apis.TextPieces(tokenizer, r.stop) for r in checked]
        answers: list[Answer | None] = [None] * len(checked)
        for i in range(len(checked)):
            yield stream.start(i)
        async for event in service.events(checked):
            kind, i = event[0], event[1]
            if kind == "token":
                final = event[4]
                yield stream.piece(i, pieces[i].end(final) if final is not None else pieces[i].push(event[2]), final)
            elif kind == "done":
                answers[i] = event[2]
            else:
                error = event[2]
                status, kind_ = (503, "overloaded") if isinstance(error, ShuttingDown) else (500, "server_error")
                yield stream.error(str(error), kind_, status)
                return
        yield stream.end(answers)

    return StreamingResponse(chunks(), media_type="text/event-stream")


async def list_models(request: HttpRequest):
    service = _service(request)
    return apis.models(service.engine.base_model, service.engine.names, service.started)


async def tgi_generate(request: HttpRequest):
    return await _tgi(request, stream=False)


async def tgi_generate_stream(request: HttpRequest):
    return await _tgi(request, stream=True)


async def tgi_compat(request: HttpRequest):
    return await _tgi(request, stream=None)


async def _tgi(request: HttpRequest, stream: bool | None):
    """TGI's routes: `stream` None follows the body's "stream" (POST /, as TGI's and LoRAX's clients send it)."""
    service = _service(request)
    body = await _parse(request, apis.TgiBody)
    wanted = _translated(lambda: apis.tgi_request(body))
    tokenizer = service.engine.tokenizer
    if stream if stream is not None else body.stream:
        return _tgi_stream(service, service.check(wanted, apis.TGI_FIELDS), body.parameters, tokenizer)
    (result,) = await service.answer([wanted], apis.TGI_FIELDS)
    reply = apis.tgi_answer(result, body.parameters, tokenizer)
    return [reply] if request.url.path == "/" else reply


def _tgi_stream(service: Service, checked: Request, parameters, tokenizer) -> StreamingResponse:
    """TGI's server-sent events, each token's sent as soon as the worker has decoded it (continuous batching;
    static batches send them all when the batch ends). A failure after the first event is an error event, as
    TGI sends it."""

    async def events():
        index = 0
        async for event in service.events([checked]):
            if event[0] == "token":
                _, _, token, logprob, final = event
                yield apis.tgi_event(index, apis.tgi_token(token, logprob, tokenizer), final, parameters)
                index += 1
            elif event[0] == "failed":
                error = event[2]
                kind = "overloaded" if isinstance(error, ShuttingDown) else "generation"
                yield f"data:{json.dumps({'error': str(error), 'error_type': kind})}\n\n"

    return StreamingResponse(events(), media_type="text/event-stream")


ROUTES = [
    ("GET", "/health", health),
    ("POST", "/v1/generate", generate),
    ("POST", "/v1/completions", completions),
    ("POST", "/v1/chat/completions", chat_completions),
    ("GET", "/v1/models", list_models),
    ("POST", "/generate", tgi_generate),
    ("POST", "/generate_stream", tgi_generate_stream),
    ("POST", "/", tgi_compat),
]


# --- errors ----------------------------------------------------------------------------------------------


async def http_error(request: HttpRequest, error: HttpError):
    return _error(error.status, error.message, error.kind, error.headers, request.url.path)


async def routing_error(request: HttpRequest, error: StarletteHTTPException):
    message = {404: f"no route {request.url.path}.", 405: f"{request.method} is not allowed on {request.url.path}."}
    return _error(
        error.status_code,
        message.get(error.status_code, str(error.detail)),
        "invalid_request_error",
        getattr(error, "headers", None),
        request.url.path,
    )


async def unexpected(request: HttpRequest, error: Exception):
    return _error(500, f"internal error: {type(error).__name__}: {error}", "server_error", None, request.url.path)


# --- the app ---------------------------------------------------------------------------------------------


def create_app(
    engine: ServingEngine,
    *,
    max_batch: int = Limits.max_batch,
    window: float = Limits.window,
    max_queue: int = Limits.max_queue,
    max_input_chars: int = Limits.max_input_chars,
    max_prompts: int = Limits.max_prompts,
    api_key: str | None = None,
) -> FastAPI:
    """An app serving `engine`: the routes above over one `Service`, the gate (API key, body size) in front."""
    service = Service(engine, Limits(max_batch, window, max_queue, max_input_chars, max_prompts), api_key)
    app = FastAPI(title="lorahub", lifespan=service.lifespan, openapi_url=None, docs_url=None, redoc_url=None)
    app.state.service, app.state.batcher, app.state.engine = service, service.batcher, engine
    app.add_middleware(_Gate, api_key=api_key, max_body=service.limits.max_body)
    app.add_exception_handler(HttpError, http_error)
    app.add_exception_handler(StarletteHTTPException, routing_error)
    app.add_exception_handler(Exception, unexpected)
    for method, path, handler in ROUTES:
        app.add_api_route(path, handler, methods=[method])
    return app


def is_loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_port(host: str, port: int) -> None:
    """An InputError if (host, port) cannot be bound, before anything is loaded."""
    if port == 0:
        return
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as error:
        raise InputError(
            f"cannot listen on host '{host}' ({error.strerror}).", "Give --host 127.0.0.1 or 0.0.0.0."
        ) from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds: a TIME_WAIT port is free
        try:
            probe.bind(address)
        except OSError as error:
            taken = error.errno == errno.EADDRINUSE
            raise InputError(
                f"{host}:{port} is in use." if taken else f"cannot listen on {host}:{port} ({error.strerror}).",
                "Choose another --port, or stop what listens there.",
            ) from None


# A query parameter whose name says it holds a credential, and a Bearer token: what no log line shows.
_CREDENTIAL = re.compile(
    r"(?i)(?<=[?&;'\"])"
    r"([\w.-]*(?:key|token|secret|passw(?:or)?d|pwd|auth|credential|signature|session|cookie)[\w.-]*)=[^&;#\s'\"]*"
)
_BEARER = re.compile(r"(?i)\b(bearer)\s+[^\s'\",;]+")


def redact(text: str) -> str:
    return _BEARER.sub(r"\1 <redacted>", _CREDENTIAL.sub(r"\1=<redacted>", text))


class RedactCredentials(logging.Filter):
    """On uvicorn's log handlers: a key a client put in the URL (`?api_key=...`) is `<redacted>` in the access
    log, and no Bearer token shows, whatever the level (at trace uvicorn logs every request's scope)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name == "uvicorn.access" and isinstance(record.args, tuple) and len(record.args) == 5:
            client, method, path, version, status = record.args  # what uvicorn's AccessFormatter unpacks
            record.args = (client, method, redact(path), version, status)
        else:
            message = record.getMessage()
            if redact(message) != message:
                record.msg, record.args = redact(message), ()
        return True


def make_server(
    app: FastAPI,
    *,
    host: str = SERVE["host"],
    port: int = SERVE["port"],
    shutdown_timeout: float = SERVE["shutdown_timeout"],
    log_level: str = "info",
):
    """A uvicorn server whose shutdown keeps the promise: on SIGINT/SIGTERM no new request is accepted, open
    ones get `shutdown_timeout` seconds to finish, and those still open then are answered 503 (not dropped)."""
    import copy

    import uvicorn
    from uvicorn.config import LOGGING_CONFIG

    log_config = copy.deepcopy(LOGGING_CONFIG)
    log_config["filters"] = {"redact": {"()": RedactCredentials}}
    for handler in log_config["handlers"].values():
        handler["stream"] = "ext://sys.stderr"  # stdout is for data
        handler["filters"] = ["redact"]
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
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_config=log_config,
        log_level=log_level,
        timeout_graceful_shutdown=shutdown_timeout + _ANSWER_GRACE,
    )
    return Server(config)


_ANSWER_GRACE = 2.0  # seconds between the shutdown deadline's 503s and uvicorn cancelling the connections


def run(
    app: FastAPI,
    *,
    host: str = SERVE["host"],
    port: int = SERVE["port"],
    shutdown_timeout: float = SERVE["shutdown_timeout"],
) -> None:
    """Serve until SIGINT/SIGTERM."""
    make_server(app, host=host, port=port, shutdown_timeout=shutdown_timeout).run()
