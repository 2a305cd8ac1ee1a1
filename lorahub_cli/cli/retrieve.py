"""`lorahub retrieve`: which adapters fit some examples."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from ..settings import COMPOSE, DEFAULT_TOP_K, WEIGHTS
from ._options import BaseModelOpt, ByOpt, DeviceOpt, EmbedderOpt, JsonOpt, ModelPathOpt
from ._output import out, print_json, ranking_table, warn

EXAMPLES = """Examples:\n
  lorahub retrieve --shots examples.jsonl -k 20\n
  lorahub retrieve --shots examples.jsonl --level instance --inputs test.jsonl --json\n
  lorahub retrieve --inputs requests.jsonl -k 3\n
  lorahub retrieve --shots examples.jsonl --by weights --model-path ./base-model\n
  lorahub retrieve --query "Is this review positive or negative? I loved it." -k 5"""


def retrieve(
    shots: Annotated[
        Path | None, typer.Option("--shots", help="Few-shot examples (JSONL with input and target).")
    ] = None,
    query: Annotated[str | None, typer.Option("--query", help="One input text.")] = None,
    inputs: Annotated[
        Path | None,
        typer.Option("--inputs", help="Inputs (JSONL): per-input top-k, or routes with --level instance."),
    ] = None,
    k: Annotated[int, typer.Option("-k", "--top-k", min=1, help="How many adapters to return.")] = DEFAULT_TOP_K,
    level: Annotated[
        str, typer.Option("--level", help="task (BatchComp) or instance (iLoraComp); for --shots.")
    ] = COMPOSE["level"],
    base_model: BaseModelOpt = None,
    by: ByOpt = WEIGHTS["by"],
    model_path: ModelPathOpt = None,
    device: DeviceOpt = "auto",
    embedder: EmbedderOpt = None,
    json_: JsonOpt = False,
) -> None:
    """Rank the registry's adapters by how well their cards match your examples, best first: data cards by cosine,
    adapters without one by their weights (docs/retrieval.md)."""
    from .. import api

    ranking = api.retrieve(
        shots=shots,
        query=query,
        inputs=inputs,
        k=k,
        level=level,
        base_model=base_model,
        embedder=embedder,
        by=by,
        model_path=model_path,
        device=device,
    )
    answer = ranking.to_json()
    skipped = answer.get("weights", {}).get("not_ranked")
    if skipped:
        warn(escape(f"{len(skipped['ids'])} adapter(s) without a data card were not ranked: {skipped['problem']}"))
    if json_:
        print_json(answer)
        return
    by = answer["by"]
    if "results" in answer:
        out.print(ranking_table(f"{answer['level']}-level retrieval", answer["results"], by))
    for group in answer.get("shots", []) + answer.get("inputs", []):
        title = f"{'shot' if 'shots' in answer else 'input'} {group['index']}"
        out.print(ranking_table(title, group["results"], by))
    for r in answer.get("routes", []):
        out.print(f"input {r['input']} -> shot {r['shot']} (cosine {r['score']:.4f})")
