"""`lorahub generate`: answer a file of requests, each with its own retrieved and composed adapters."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated

import typer

from ..api import open_store
from ..errors import InputError
from ..settings import SERVE
from ._options import (
    BaseModelOpt,
    BatchingOpt,
    ComposeModeOpt,
    CompositionOpt,
    DeviceOpt,
    DtypeOpt,
    EmbedderOpt,
    GenerationBatchOpt,
    JsonOpt,
    KOpt,
    MaxInputTokensOpt,
    MaxNewTokensOpt,
    ModelPathOpt,
)
from ._output import info, print_json, progress

EXAMPLES = """Examples:\n
  lorahub generate --inputs requests.jsonl -k 3 --out answers.jsonl\n
  lorahub generate --inputs requests.jsonl --compose fusion --max-new-tokens 64\n
  lorahub generate --inputs requests.jsonl --compose single --json\n
  lorahub generate --inputs requests.jsonl --composition per-example --out answers.jsonl"""


def build_engine(*, composition, k, compose, base_model, model_path, embedder, dtype, device, **limits):
    """The engine `generate` and `serve` share: per-input retrieval over the registry, or a composition's router."""
    from ..generation import check_batching
    from ..serve.engine import Engine

    check_batching(limits.get("batching", "continuous"))  # before minutes of loading
    if composition is not None:
        if k is not None or compose is not None or base_model is not None:
            raise InputError(
                "--composition routes each input to a shot's composition; -k, --compose and --base-model do not apply.",
                "Drop them, or drop --composition to retrieve per input.",
            )
        return Engine.from_composition(
            composition, model_path=model_path, embedder=embedder, dtype=dtype, device=device, **limits
        )
    return Engine.from_registry(
        open_store(),
        base_model=base_model,
        model_path=model_path,
        embedder=embedder,
        dtype=dtype,
        device=device,
        k=SERVE["k"] if k is None else k,
        compose=compose or SERVE["compose"],
        **limits,
    )


def generate(
    inputs: Annotated[
        Path, typer.Option("--inputs", help="Requests (JSONL): input, optionally k, compose, max_new_tokens per line.")
    ],
    k: KOpt = None,
    compose: ComposeModeOpt = None,
    composition: CompositionOpt = None,
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="Write the answers (JSONL) here instead of stdout.")
    ] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace the file --out if it exists.")] = False,
    max_new_tokens: MaxNewTokensOpt = SERVE["max_new_tokens"],
    max_input_tokens: MaxInputTokensOpt = SERVE["max_input_tokens"],
    batch_size: GenerationBatchOpt = SERVE["batch_size"],
    batching: BatchingOpt = SERVE["batching"],
    base_model: BaseModelOpt = None,
    model_path: ModelPathOpt = None,
    embedder: EmbedderOpt = None,
    dtype: DtypeOpt = SERVE["dtype"],
    device: DeviceOpt = SERVE["device"],
    json_: JsonOpt = False,
) -> None:
    """Answer every request with the adapters retrieved for it (LoraRetriever), composed per row in shared batches."""
    from ..outputs import check_destination, write_file
    from ..serve.engine import read_requests

    if out is not None:
        check_destination(out, overwrite, file=True, inputs=(inputs,))  # before minutes of loading
    requests = read_requests(inputs)
    start = time.perf_counter()
    engine = build_engine(
        composition=composition,
        k=k,
        compose=compose,
        base_model=base_model,
        model_path=model_path,
        embedder=embedder,
        dtype=dtype,
        device=device,
        max_new_tokens=max_new_tokens,
        max_input_tokens=max_input_tokens,
        batch_size=batch_size,
        batching=batching,
    )
    loaded = time.perf_counter()
    with progress("Generating", len(requests)) as advance:
        answers = [a.to_json() for a in engine.run(requests, progress=advance)]
    seconds = time.perf_counter() - loaded
    lines = "".join(json.dumps(a, ensure_ascii=False) + "\n" for a in answers)
    if out is not None:
        write_file(out, lines.encode("utf-8"))
    summary = {
        "requests": len(answers),
        "out": str(out) if out else None,
        "load_seconds": round(loaded - start, 3),
        "generate_seconds": round(seconds, 3),
        "engine": engine.info(),
    }
    if json_:
        print_json({**summary, "answers": answers})
    elif out is None:
        typer.echo(lines, nl=False)
    info(f"{len(answers)} answers in {seconds:.1f} s" + (f", written to {out}." if out else "."))
