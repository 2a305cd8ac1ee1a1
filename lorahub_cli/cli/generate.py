"""`lorahub generate`: answer a file of requests, each with its own retrieved and composed adapters, or all with
one adapter (`--adapter`) or an instance-level composition (`--composition`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

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
  lorahub generate --inputs requests.jsonl --temperature 0.7 --top-p 0.9 --seed 1\n
  lorahub generate --inputs requests.jsonl --compose single --json\n
  lorahub generate --inputs requests.jsonl --adapter my-lora                # a `compose --out` folder\n
  lorahub generate --inputs requests.jsonl --composition per-example --out answers.jsonl"""

# -k/--top-k already names the adapters retrieved per request, so the sampling top-k is --top-k-tokens.
TemperatureOpt = Annotated[
    float, typer.Option("--temperature", help="0: greedy (default); above 0, sample from softmax(scores / T).")
]
TopPOpt = Annotated[float, typer.Option("--top-p", help="Sample from the most likely tokens whose mass reaches P.")]
TopKTokensOpt = Annotated[int, typer.Option("--top-k-tokens", help="Sample from the K most likely tokens (0: all).")]
RepetitionPenaltyOpt = Annotated[
    float,
    typer.Option("--repetition-penalty", help="Divide (or multiply) the scores of tokens already seen (1: none)."),
]
SeedOpt = Annotated[
    int | None, typer.Option("--seed", help="Request i (from 0) samples with seed + i; a line's own seed wins.")
]


def generate(
    inputs: Annotated[
        Path,
        typer.Option(
            "--inputs",
            help="Requests (JSONL): input, optionally k, compose, max_new_tokens and sampling fields per line.",
        ),
    ],
    k: KOpt = None,
    compose: ComposeModeOpt = None,
    by: ByOpt = WEIGHTS["by"],
    adapter: AdapterOpt = None,
    composition: CompositionOpt = None,
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="Write the answers (JSONL) here instead of stdout.")
    ] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace the file --out if it exists.")] = False,
    max_new_tokens: MaxNewTokensOpt = SERVE["max_new_tokens"],
    max_input_tokens: MaxInputTokensOpt = SERVE["max_input_tokens"],
    batch_size: GenerationBatchOpt = SERVE["batch_size"],
    batching: BatchingOpt = SERVE["batching"],
    temperature: TemperatureOpt = 0.0,
    top_p: TopPOpt = 1.0,
    top_k: TopKTokensOpt = 0,
    repetition_penalty: RepetitionPenaltyOpt = 1.0,
    seed: SeedOpt = None,
    base_model: BaseModelOpt = None,
    model_path: ModelPathOpt = None,
    embedder: EmbedderOpt = None,
    dtype: DtypeOpt = SERVE["dtype"],
    device: DeviceOpt = SERVE["device"],
    json_: JsonOpt = False,
) -> None:
    """Answer every request with the adapters retrieved for it (LoraRetriever), composed per row in shared batches,
    or with one adapter (--adapter) or an instance-level composition (--composition)."""
    from .. import api
    from ..decoding import Sampling

    summary = api.generate(
        inputs,
        out=out,
        overwrite=overwrite,
        progress_factory=progress,
        sampling=Sampling(temperature, top_p, top_k, repetition_penalty, seed),
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
    )
    answers = summary["answers"]
    if json_:
        print_json(summary)
    elif out is None:
        typer.echo("".join(json.dumps(a, ensure_ascii=False) + "\n" for a in answers), nl=False)
    seconds = summary["generate_seconds"]
    info(f"{len(answers)} answers in {seconds:.1f} s" + (f", written to {out}." if out else "."))
