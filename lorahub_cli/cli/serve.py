"""`lorahub serve`: an HTTP server that answers each request with its own retrieved and composed adapters."""

from __future__ import annotations

from typing import Annotated

import typer

from ..api import build_engine
from ..errors import InputError
from ..settings import SERVE, WEIGHTS
from ._options import (
    AdapterOpt,
    BaseModelOpt,
    BatchingOpt,
    ByOpt,
    ComposeModeOpt,
    CompositionOpt,
    DeviceOpt,
    DtypeOpt,
    EmbedderOpt,
    GenerationBatchOpt,
    KOpt,
    MaxInputTokensOpt,
    MaxNewTokensOpt,
    ModelPathOpt,
)
from ._output import info, warn

API_KEY_ENV = "LORAHUB_API_KEY"
EXAMPLES = """Examples:\n
  lorahub serve --port 8000\n
  lorahub serve -k 3 --compose fusion --batch-size 16 --batch-window-ms 20\n
  lorahub serve --adapter my-lora                  # one composed adapter for every request\n
  lorahub serve --compose arrow -k 2               # every token routed among all adapters (Arrow)\n
  lorahub serve --composition per-example --max-queue 64\n
  curl -s localhost:8000/v1/generate -d '{"input": "What is 12 plus 30?", "k": 3}'"""

HostOpt = Annotated[str, typer.Option("--host", help="Interface to listen on (0.0.0.0 for every one).")]


def serve(
    host: HostOpt = SERVE["host"],
    port: Annotated[int, typer.Option("--port", min=0, max=65535, help="TCP port.")] = SERVE["port"],
    k: KOpt = None,
    compose: ComposeModeOpt = None,
    by: ByOpt = WEIGHTS["by"],
    adapter: AdapterOpt = None,
    composition: CompositionOpt = None,
    batch_size: GenerationBatchOpt = SERVE["batch_size"],
    batching: BatchingOpt = SERVE["batching"],
    window_ms: Annotated[
        float,
        typer.Option(
            "--batch-window-ms",
            min=0,
            help="How long a request that finds the server idle waits for others to start with.",
        ),
    ] = SERVE["batch_window_ms"],
    max_queue: Annotated[
        int, typer.Option("--max-queue", min=1, help="Most waiting requests; beyond it requests get 503.")
    ] = SERVE["max_queue"],
    waiting_served_ratio: Annotated[
        float,
        typer.Option(
            "--waiting-served-ratio",
            min=0,
            help="While rows decode, waiting requests join when this share of the running rows can join at once.",
        ),
    ] = SERVE["waiting_served_ratio"],
    max_waiting_steps: Annotated[
        int,
        typer.Option(
            "--max-waiting-steps", min=0, help="...or when this many decoding steps passed since the last join."
        ),
    ] = SERVE["max_waiting_steps"],
    max_prefill_tokens: Annotated[
        int,
        typer.Option(
            "--max-prefill-tokens", min=1, help="Most padded input tokens (rows x longest) that join in one step."
        ),
    ] = SERVE["max_prefill_tokens"],
    max_new_tokens: MaxNewTokensOpt = SERVE["max_new_tokens"],
    max_input_tokens: MaxInputTokensOpt = SERVE["max_input_tokens"],
    max_input_chars: Annotated[
        int, typer.Option("--max-input-chars", min=1, help="Longest input accepted, in characters.")
    ] = SERVE["max_input_chars"],
    shutdown_timeout: Annotated[
        float, typer.Option("--shutdown-timeout", min=0, help="Seconds to finish open requests on SIGTERM.")
    ] = SERVE["shutdown_timeout"],
    api_key: Annotated[
        str | None,
        typer.Option(
            "--api-key",
            envvar=API_KEY_ENV,
            show_envvar=True,
            show_default=False,
            help="Require 'Authorization: Bearer KEY' on every route but /health.",
        ),
    ] = None,
    base_model: BaseModelOpt = None,
    model_path: ModelPathOpt = None,
    embedder: EmbedderOpt = None,
    dtype: DtypeOpt = SERVE["dtype"],
    device: DeviceOpt = SERVE["device"],
) -> None:
    """Serve generation over HTTP: every request retrieves its top-k adapters (or: one --adapter, or an instance-level
    --composition), and concurrent requests share batches."""
    from ..decoding import Admission
    from ..serve.server import check_port, create_app, is_loopback, run

    if api_key is not None and not api_key.strip():
        raise InputError("the API key is empty.", f"Give a non-empty --api-key or {API_KEY_ENV}, or neither.")
    admission = Admission(waiting_served_ratio, max_waiting_steps, max_prefill_tokens)
    check_port(host, port)  # before minutes of loading, not after
    if api_key is None and not is_loopback(host):
        warn(
            f"{host} is reachable from other machines and no API key is set: anyone who can reach it can use it. "
            f"Set --api-key or {API_KEY_ENV}."
        )
    engine = build_engine(
        adapter=adapter,
        composition=composition,
        k=k,
        compose=compose,
        by=by,
        base_model=base_model,
        model_path=model_path,
        embedder=embedder,
        dtype=dtype,
        device=device,
        max_new_tokens=max_new_tokens,
        max_input_tokens=max_input_tokens,
        batch_size=batch_size,
        batching=batching,
        admission=admission,
    )
    app = create_app(
        engine,
        max_batch=batch_size,
        window=window_ms / 1000,
        max_queue=max_queue,
        max_input_chars=max_input_chars,
        api_key=api_key,
    )
    described = engine.info()
    if described["source"] == "adapter":
        held = f"the adapter {engine.names[0]}"
    elif described["source"] == "composition":
        held = f"{described['compositions']} compositions"
    else:
        held = f"{described['adapters']} adapters"
    info(
        f"Serving {held} on {described['base_model']} at http://{host}:{port} (POST /v1/generate, /v1/completions, "
        f"/v1/chat/completions, /generate, /generate_stream, /; GET /v1/models, /health)"
        f"{'; API key required' if api_key else ''}."
    )
    run(app, host=host, port=port, shutdown_timeout=shutdown_timeout)
