"""`lorahub retrieve`: which adapters fit some examples."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..api import open_store
from ..errors import InputError
from ..settings import DEFAULT_TOP_K
from ._options import BaseModelOpt, EmbedderOpt, JsonOpt
from ._output import out, print_json, ranking_table

EXAMPLES = """Examples:\n
  lorahub retrieve --shots examples.jsonl -k 20\n
  lorahub retrieve --shots examples.jsonl --level instance --inputs test.jsonl --json\n
  lorahub retrieve --inputs requests.jsonl -k 3\n
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
    ] = "task",
    base_model: BaseModelOpt = None,
    embedder: EmbedderOpt = None,
    json_: JsonOpt = False,
) -> None:
    """Rank the registry's adapters by how well their cards match your examples (cosine, most similar first)."""
    from .. import retrieval
    from ..io import Example, read_examples

    if level not in ("task", "instance"):
        raise InputError(f"--level must be 'task' or 'instance', not '{level}'.", "Example: --level instance")
    if (shots is not None) + (query is not None) + (inputs is not None and shots is None) != 1:
        raise InputError(
            "give --shots FILE, --query TEXT or --inputs FILE (with --shots only for --level instance).",
            "See: lorahub retrieve --help",
        )
    if query is not None and not query.strip():
        raise InputError("--query is empty.", "Give some text to match.")
    if inputs is not None and shots is not None and level != "instance":
        raise InputError(
            "--inputs with --shots routes inputs to shots, which needs --level instance.", "Add --level instance."
        )
    index = retrieval.CardIndex.from_store(open_store(readonly=True), base_model)
    model = index.embedder(embedder)
    if shots is not None:
        examples = read_examples(shots)
        if level == "task":
            answer = retrieval.task_level(index, model, examples, k)
        else:
            answer = retrieval.instance_level(
                index, model, examples, k, read_examples(inputs, require_target=False) if inputs else None
            )
    elif query is not None:
        answer = {"level": "query", **retrieval.per_input(index, model, [Example(query)], k)["inputs"][0]}
        del answer["index"]
    else:
        answer = retrieval.per_input(index, model, read_examples(inputs, require_target=False), k)
    if json_:
        print_json(answer)
        return
    if "results" in answer:
        out.print(ranking_table(f"{answer['level']}-level retrieval", answer["results"]))
    for group in answer.get("shots", []) + answer.get("inputs", []):
        out.print(ranking_table(f"{'shot' if 'shots' in answer else 'input'} {group['index']}", group["results"]))
    for r in answer.get("routes", []):
        out.print(f"input {r['input']} -> shot {r['shot']} (cosine {r['score']:.4f})")
