"""`lorahub compose`: a few examples in, a composed LoRA adapter out."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..errors import InputError
from ..settings import COMPOSE, WEIGHTS
from ._options import (
    BaseModelOpt,
    BudgetOpt,
    ByOpt,
    DeviceOpt,
    EmbedderOpt,
    JsonOpt,
    ModelPathOpt,
    NumModulesOpt,
    OptimizerOpt,
    choice_help,
    registered,
)
from ._output import info, out, print_json, progress, short_path, weights_table
from ._scale import RayDataOpt, RayOpt, WorkersOpt, ray_options

EXAMPLES = """Examples:\n
  lorahub compose --shots examples.jsonl --out my-lora\n
  lorahub compose --shots examples.jsonl --modules random -n 20 --optimizer ngopt --budget 40 --out lorahub-style\n
  lorahub compose --shots examples.jsonl --level instance --out per-example\n
  lorahub compose --shots examples.jsonl --by weights -n 5 --out from-weights\n
  lorahub compose --shots examples.jsonl --modules a,b,c --weights a=0.5,b=0.3,c=-0.2 --out fixed\n
  lorahub compose --from-recipe my-lora/lorahub_recipe.json --out rebuilt\n
  lorahub compose --formula list\n
  lorahub compose --tasks shots-folder/ --out compositions/ --ray      # one per shots file, resumable"""


LEGACY_DTYPE_FLAG = {"float32": "fp32", "bfloat16": "bf16"}  # the hidden --dtype (before --search-precision)


def parse_weights(text: str) -> dict[str, float]:
    weights = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, sep, value = item.rpartition("=")
        try:
            weights[name] = float(value)
        except ValueError:
            name = ""
        if not sep or not name:
            raise InputError(f"--weights item '{item}' is not ID=NUMBER.", "Example: --weights a=0.5,b=-0.25")
    return weights


def parse_modules(text: str) -> str | list[str]:
    if text in ("auto", "random"):
        return text
    path = Path(text)
    if path.is_file():
        ids = [
            line.strip()
            for line in path.read_text(encoding="utf-8").splitlines()
            if line.strip() and not line.startswith("#")
        ]
        if not ids:
            raise InputError(f"module list '{path}' is empty.", "Put one registry id per line.")
        return ids
    return [part.strip() for part in text.split(",") if part.strip()]


def compose(
    shots: Annotated[
        Path | None, typer.Option("--shots", help="Few-shot examples of the task (JSONL, input + target).")
    ] = None,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Folder to write the composed adapter to.")] = None,
    base_model: BaseModelOpt = None,
    model_path: ModelPathOpt = None,
    formula: Annotated[
        str,
        typer.Option(
            "--formula",
            callback=registered("formula"),
            help=choice_help("formula", "How the modules combine (elementwise: LoraHub's)."),
        ),
    ] = COMPOSE["formula"],
    density: Annotated[
        float | None, typer.Option("--density", help="For ties and dare_linear: fraction of entries kept.")
    ] = None,
    svd_rank: Annotated[
        int | None,
        typer.Option("--svd-rank", help="For svd: rank of the result (default: the largest module rank)."),
    ] = None,
    modules: Annotated[
        str, typer.Option("--modules", help="auto (retrieval by card), random (LoraHub), ids a,b,c, or a file of ids.")
    ] = COMPOSE["modules"],
    by: ByOpt = WEIGHTS["by"],
    num_modules: NumModulesOpt = COMPOSE["num_modules"],
    optimizer: OptimizerOpt = COMPOSE["optimizer"],
    budget: BudgetOpt = COMPOSE["budget"],
    l1: Annotated[float, typer.Option("--l1", min=0.0, help="Penalty on mean |w| added to the loss.")] = COMPOSE["l1"],
    seed: Annotated[
        int, typer.Option("--seed", help="Seed of the search, of random module selection and of dare_linear.")
    ] = COMPOSE["seed"],
    population: Annotated[
        int, typer.Option("--population", min=1, help="Candidates per forward pass (cma, de, random).")
    ] = COMPOSE["population"],
    level: Annotated[
        str, typer.Option("--level", help="task (one composition) or instance (one per shot + router).")
    ] = COMPOSE["level"],
    warm_start: Annotated[
        bool, typer.Option("--warm-start", help="Instance level: start each shot's search from a task-level search.")
    ] = False,
    weights: Annotated[
        str | None, typer.Option("--weights", help="Fixed weights id=w,...: compose without search.")
    ] = None,
    from_recipe: Annotated[
        Path | None, typer.Option("--from-recipe", help="Rebuild the adapter a lorahub_recipe.json describes.")
    ] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace --out if lorahub compose wrote it.")] = False,
    search_precision: Annotated[
        str,
        typer.Option(
            "--search-precision",
            help="What the search evaluates candidates in: auto (fp32 today), fp32, "
            "bf16 (faster with AMX / AVX512-BF16 / CUDA) or int8. The answer is fp32.",
        ),
    ] = COMPOSE["search_precision"],
    dtype: Annotated[
        str | None, typer.Option("--dtype", hidden=True, help="Old name of --search-precision: float32 or bfloat16.")
    ] = None,
    device: DeviceOpt = COMPOSE["device"],
    batch_size: Annotated[
        int, typer.Option("--batch-size", min=1, help="Most rows (candidates x shots) per forward pass.")
    ] = COMPOSE["max_rows"],
    embedder: EmbedderOpt = None,
    tasks: Annotated[
        Path | None,
        typer.Option("--tasks", help="A folder of shots files: one composition each, into --out/<name>/ (resumable)."),
    ] = None,
    ray: RayOpt = None,
    workers: WorkersOpt = None,
    ray_data: RayDataOpt = "auto",
    json_: JsonOpt = False,
) -> None:
    """Compose registry adapters into one LoRA for the task your examples show, with weights found by search."""
    from .. import api
    from ..compose.pipeline import ComposeOptions
    from ..compose.search import SearchConfig

    if out is None:
        raise InputError("--out is required.", "Example: --out my-lora")
    scale = ray_options(ray, workers, ray_data)
    if tasks is not None and (shots is not None or from_recipe is not None):
        raise InputError("--tasks composes every shots file of a folder.", "Drop --shots and --from-recipe.")
    if scale is not None and tasks is None:
        raise InputError(
            "--ray spreads the compositions of a --tasks folder over workers.", "Add --tasks FOLDER, or drop --ray."
        )
    if from_recipe is not None:
        if shots is not None:
            raise InputError("--from-recipe rebuilds without shots.", "Drop --shots.")
        summary = api.rebuild(from_recipe, out, overwrite=overwrite)
        print_json(summary) if json_ else info(f"Rebuilt {summary['out']} from {from_recipe}.")
        return
    if shots is None and tasks is None:
        raise InputError("--shots is required (or --tasks, or --from-recipe).", "Example: --shots examples.jsonl")
    formula_options = {k: v for k, v in {"density": density, "svd_rank": svd_rank}.items() if v is not None}
    options = ComposeOptions(
        base_model=base_model,
        model_path=model_path,
        formula=formula,
        formula_options=formula_options,
        modules=parse_modules(modules),
        num_modules=num_modules,
        weights=parse_weights(weights) if weights else None,
        search=SearchConfig(
            optimizer=optimizer,
            budget=budget,
            l1=l1,
            seed=seed,
            population=population,
            precision=LEGACY_DTYPE_FLAG.get(dtype, dtype) if dtype and search_precision == "auto" else search_precision,
        ),
        warm_start=warm_start,
        device=device,
        max_rows=batch_size,
        embedder=embedder,
        by=by,
    )
    if tasks is not None:
        from .compose_batch import compose_batch

        return compose_batch(tasks, out, options, level=level, overwrite=overwrite, ray=scale, json_=json_)
    summary = api.compose(shots, out, options, level=level, overwrite=overwrite, progress_factory=progress)
    if json_:
        print_json(summary)
        return
    show_summary(summary)


STOPS = {
    "budget": "its budget was spent",
    "converged": "it converged",
    "stalled": "it stopped improving",
    "nonfinite": "the loss became non-finite",
}


def show_summary(summary: dict) -> None:
    """What compose chose (the modules and their weights, on stdout) and what it means (stderr), at 80 columns."""
    before, count = summary.get("base_loss"), summary["shots"]
    if summary.get("level") == "instance":
        for c in summary["compositions"]:
            out.print(weights_table(f"shot {c['shot']}: few-shot loss {c['loss']:.4f}", c["modules"]))
        searches = [c["search"] for c in summary["compositions"] if c["search"]]
        if before is not None:
            info(f"Few-shot loss of the base model alone on the {count} examples (fp32): {before:.4f}.")
    else:
        modules = summary["modules"]
        out.print(weights_table(f"{len(modules)} modules, largest |weight| first", modules, summary.get("by", "data")))
        start = f"base model {before:.4f}, " if before is not None else ""
        info(f"Few-shot loss on the {count} examples (fp32): {start}composed {summary['loss']:.4f}.")
        searches = [summary["search"]] if summary["search"] else []
    info(_search_line(searches) if searches else "No search: the weights were given (--weights).")
    info(f"Wrote {short_path(summary['out'], 50)} ({summary['seconds']:.1f} s in all). Next:")
    for command in summary["next"]:
        info(f"  {command}")


def _search_line(searches: list[dict]) -> str:
    first = searches[0]
    ran = sum(s["evaluations"] for s in searches)
    budget = sum(s["budget"] for s in searches)
    text = f"The search ({first['engine'] or first['optimizer']}) ran {ran} of {budget} evaluations"
    if len(searches) > 1:
        text += f" over {len(searches)} searches"
    stops = sorted({s["stop"] for s in searches if s.get("stop")})
    if stops:
        text += ": " + "; ".join(STOPS.get(stop, stop) for stop in stops)
    return text + "."
