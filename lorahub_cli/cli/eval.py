"""`lorahub eval`: score zero-shot, ICL, compositions and fine-tuning on BBH, your own tasks or the demo."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..errors import InputError
from ..settings import COMPOSE, DEMO, EVAL
from ._options import (
    BudgetOpt,
    DeviceOpt,
    DtypeOpt,
    EmbedderOpt,
    GenerationBatchOpt,
    JsonOpt,
    MaxNewTokensOpt,
    ModelPathOpt,
    NumModulesOpt,
    OptimizerOpt,
    choice_help,
    registered,
    with_options_of,
)
from ._output import info, print_json, progress
from ._scale import RayDataOpt, RayOpt, WorkersOpt, ray_options

app = typer.Typer(
    help="Evaluate composition methods against baselines, per task and seed, with a report.", no_args_is_help=True
)

EXAMPLES = """Examples:\n
  lorahub eval bbh --base-model google/flan-t5-large --out bbh-run\n
  lorahub eval bbh --tasks navigate,snarks --methods zero-shot,batchcomp --seeds 1 --limit 20\n
  lorahub eval tasks my-tasks/ --base-model google/flan-t5-large --methods zero-shot,instance\n
  lorahub eval demo --methods zero-shot,lorahub,batchcomp\n
  lorahub eval bbh --ray auto --out bbh-run          # on the running Ray cluster; resumable anywhere"""

Tasks = Annotated[str, typer.Option("--tasks", help="all, or task names a,b,c.")]
Methods = Annotated[
    str,
    typer.Option(
        "--methods", callback=registered("method"), help=choice_help("method", "Comma-separated method names.")
    ),
]
Shots = Annotated[
    int, typer.Option("--shots", min=1, help="Examples per task used as shots; the rest is the test set.")
]
Seeds = Annotated[str, typer.Option("--seeds", help="Comma-separated seeds: one split (and search) per seed.")]
Limit = Annotated[int | None, typer.Option("--limit", min=1, help="Cap the test set per task (quick runs).")]
Out = Annotated[
    Path | None,
    typer.Option(
        "--out",
        "-o",
        help="Run folder: cells, results.json, report.md, plot.png (default: ./eval-SUITE). Resumes if it exists.",
    ),
]
EvaluatedModelOpt = Annotated[
    str | None, typer.Option("--base-model", "-b", help="Base model: its name in the registry, loaded from the Hub.")
]


def _seeds(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        seeds = []
    if not seeds:
        raise InputError(f"--seeds '{text}' is not a list of integers.", "Example: --seeds 1,2,3")
    return list(dict.fromkeys(seeds))


def _print(summary: dict, out: Path, json_: bool) -> None:
    if json_:
        print_json(summary)
        return
    info(f"Wrote {out / 'report.md'}, {out / 'results.json'} and {out / 'plot.png'}.")
    for method, stats in summary["average"].items():
        info(f"  {method:<10} {stats['mean']:5.1f} ± {stats['std']:.1f}")


def _grid_options(
    model_path: ModelPathOpt = None,
    tasks: Tasks = "all",
    methods: Methods = EVAL["methods"],
    shots: Shots = EVAL["shots"],
    seeds: Seeds = EVAL["seeds"],
    num_modules: NumModulesOpt = COMPOSE["num_modules"],
    budget: BudgetOpt = COMPOSE["budget"],
    optimizer: OptimizerOpt = EVAL["optimizer"],
    limit: Limit = None,
    batch_size: GenerationBatchOpt = EVAL["batch_size"],
    max_new_tokens: MaxNewTokensOpt = EVAL["max_new_tokens"],
    out: Out = None,
    embedder: EmbedderOpt = None,
    dtype: DtypeOpt = COMPOSE["dtype"],
    device: DeviceOpt = COMPOSE["device"],
    ray: RayOpt = None,
    workers: WorkersOpt = None,
    ray_data: RayDataOpt = "auto",
    json_: JsonOpt = False,
) -> None:
    """The options `eval bbh` and `eval tasks` share (after their own): with_options_of gives them these."""


def _grid(load, *, title=None, tasks, methods, seeds, out, json_, ray, workers, ray_data, **config) -> None:
    """Evaluate the suite `load()` returns with `eval bbh` / `eval tasks`'s options."""
    from .. import api
    from ..eval.methods import EvalConfig, parse_methods

    scale = ray_options(ray, workers, ray_data)
    suite = load()
    out = out or Path(f"eval-{suite.name}")
    summary = api.evaluate(
        suite.select(tasks),
        parse_methods(methods),
        _seeds(seeds),
        EvalConfig(**config),
        out,
        title=title,
        progress_factory=None if json_ else progress,
        ray=scale,
    )
    _print(summary, out, json_)


@app.command(epilog=EXAMPLES)
@with_options_of(_grid_options)
def bbh(base_model: EvaluatedModelOpt = EVAL["bbh_base_model"], **options) -> None:
    """Big-Bench Hard (shipped, 27 tasks): the papers' protocol for any base model and your registry's adapters."""
    from ..eval.tasks import load_bbh

    _grid(load_bbh, title="Big-Bench Hard", base_model=base_model, **options)


@app.command(epilog=EXAMPLES)
@with_options_of(_grid_options)
def tasks(
    folder: Annotated[
        Path, typer.Argument(help='A folder of <task>.jsonl files, lines {"input": ..., "target": ...}.')
    ],
    base_model: EvaluatedModelOpt = None,
    **options,
) -> None:
    """Your own tasks, one JSONL file each, with the same protocol and report as `eval bbh`."""
    from ..eval.tasks import load_task_dir

    _grid(lambda: load_task_dir(folder), base_model=base_model, **options)


@app.command(epilog=EXAMPLES)
def demo(
    tasks: Tasks = "all",
    methods: Methods = EVAL["methods"],
    shots: Shots = EVAL["shots"],
    seeds: Seeds = EVAL["seeds"],
    num_modules: NumModulesOpt = DEMO["num_modules"],
    budget: BudgetOpt = COMPOSE["budget"],
    optimizer: OptimizerOpt = EVAL["optimizer"],
    limit: Limit = None,
    batch_size: GenerationBatchOpt = DEMO["batch_size"],
    max_new_tokens: MaxNewTokensOpt = DEMO["max_new_tokens"],
    out: Out = None,
    ray: RayOpt = None,
    workers: WorkersOpt = None,
    ray_data: RayDataOpt = "auto",
    json_: JsonOpt = False,
) -> None:
    """The demo library's held-out tasks, offline: its adapters are mirrored into a temporary registry."""
    from .. import api
    from ..eval.methods import EvalConfig, parse_methods

    out = out or Path("eval-demo")
    config = EvalConfig(
        shots=shots,
        num_modules=num_modules,
        budget=budget,
        optimizer=optimizer,
        limit=limit,
        batch_size=batch_size,
        max_new_tokens=max_new_tokens,
    )
    summary = api.evaluate_demo(
        tasks,
        parse_methods(methods),
        _seeds(seeds),
        config,
        out,
        progress_factory=None if json_ else progress,
        ray=ray_options(ray, workers, ray_data),
    )
    _print(summary, out, json_)
