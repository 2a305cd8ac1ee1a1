"""`lorahub eval`: score zero-shot, ICL, compositions and fine-tuning on BBH, your own tasks or the demo."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ..errors import InputError
from ._options import EmbedderOpt, JsonOpt
from ._scale import RayDataOpt, RayOpt, WorkersOpt, ray_options
from ._output import info, print_json, progress

app = typer.Typer(help="Evaluate composition methods against baselines, per task and seed, with a report.", no_args_is_help=True)

EXAMPLES = """Examples:\n
  lorahub eval bbh --base-model google/flan-t5-large --out bbh-run\n
  lorahub eval bbh --tasks navigate,snarks --methods zero-shot,batchcomp --seeds 1 --limit 20\n
  lorahub eval tasks my-tasks/ --base-model google/flan-t5-large --methods zero-shot,instance\n
  lorahub eval demo --methods zero-shot,lorahub,batchcomp\n
  lorahub eval bbh --ray auto --out bbh-run          # on the running Ray cluster; resumable anywhere"""

Tasks = Annotated[str, typer.Option("--tasks", help="all, or task names a,b,c.")]
Methods = Annotated[str, typer.Option("--methods", help="Comma-separated: zero-shot, icl, lorahub, batchcomp, instance, fft.")]
Shots = Annotated[int, typer.Option("--shots", min=1, help="Examples per task used as shots; the rest is the test set.")]
Seeds = Annotated[str, typer.Option("--seeds", help="Comma-separated seeds: one split (and search) per seed.")]
NumModules = Annotated[int, typer.Option("-n", "--num-modules", min=1, help="Modules per composition.")]
Budget = Annotated[int, typer.Option("--budget", min=1, help="Loss evaluations per search.")]
Limit = Annotated[Optional[int], typer.Option("--limit", min=1, help="Cap the test set per task (quick runs).")]
BatchSize = Annotated[int, typer.Option("--batch-size", min=1, help="Inputs per generation batch.")]
MaxNew = Annotated[int, typer.Option("--max-new-tokens", min=1, help="Greedy decoding stops after this many tokens.")]
Out = Annotated[Optional[Path], typer.Option("--out", "-o", help="Run folder: cells, results.json, report.md, plot.png. Resumes if it exists.")]
BaseModel = Annotated[Optional[str], typer.Option("--base-model", "-b", help="Base model: its name in the registry, loaded from the Hub.")]
ModelPath = Annotated[Optional[str], typer.Option("--model-path", help="Load the base model from this folder instead of its name.")]
Optimizer = Annotated[str, typer.Option("--optimizer", help="ngopt, cma, de, random or adam.")]
Dtype = Annotated[str, typer.Option("--dtype", help="auto (bfloat16 where fast), float32 or bfloat16.")]
Device = Annotated[str, typer.Option("--device", help="auto, cpu, cuda or cuda:N.")]


def _seeds(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        seeds = []
    if not seeds:
        raise InputError(f"--seeds '{text}' is not a list of integers.", "Example: --seeds 1,2,3")
    return list(dict.fromkeys(seeds))


def _run(suite, *, tasks, methods, seeds, out, json_, store=None, title=None, ray=None, **config) -> None:
    from ..eval.api import evaluate
    from ..eval.methods import COMPOSING, EvalConfig, parse_methods

    chosen = parse_methods(methods)
    if store is None and any(m in COMPOSING for m in chosen):
        from .registry import open_store

        store = open_store()
    config = EvalConfig(**config)
    run = lambda execute=None: evaluate(suite.select(tasks), chosen, _seeds(seeds), config, out, store=store, title=title,  # noqa: E731
                                        progress_factory=None if json_ else progress, execute=execute)
    if ray is None:
        summary = run()
    else:
        from ..scale.eval import ray_executor

        summary = run(ray_executor(ray, config, store))
    if json_:
        print_json(summary)
        return
    info(f"Wrote {out / 'report.md'}, {out / 'results.json'} and {out / 'plot.png'}.")
    for method, stats in summary["average"].items():
        info(f"  {method:<10} {stats['mean']:5.1f} ± {stats['std']:.1f}")


@app.command(epilog=EXAMPLES)
def bbh(
    base_model: BaseModel = "google/flan-t5-large",
    model_path: ModelPath = None,
    tasks: Tasks = "all",
    methods: Methods = "zero-shot,icl,lorahub,batchcomp,instance,fft",
    shots: Shots = 5,
    seeds: Seeds = "1,2,3",
    num_modules: NumModules = 20,
    budget: Budget = 40,
    optimizer: Optimizer = "ngopt",
    limit: Limit = None,
    batch_size: BatchSize = 16,
    max_new_tokens: MaxNew = 256,
    out: Out = None,
    embedder: EmbedderOpt = None,
    dtype: Dtype = "auto",
    device: Device = "auto",
    ray: RayOpt = None,
    workers: WorkersOpt = None,
    ray_data: RayDataOpt = "auto",
    json_: JsonOpt = False,
) -> None:
    """Big-Bench Hard (shipped, 27 tasks): the papers' protocol for any base model and your registry's adapters."""
    from ..eval.tasks import load_bbh

    _run(load_bbh(), tasks=tasks, methods=methods, seeds=seeds, out=out or Path("eval-bbh"), json_=json_,
         ray=ray_options(ray, workers, ray_data), title="Big-Bench Hard", base_model=base_model, model_path=model_path,
         shots=shots, num_modules=num_modules,
         budget=budget, optimizer=optimizer, limit=limit, batch_size=batch_size, max_new_tokens=max_new_tokens,
         embedder=embedder, dtype=dtype, device=device)


@app.command(epilog=EXAMPLES)
def tasks(
    folder: Annotated[Path, typer.Argument(help="A folder of <task>.jsonl files, lines {\"input\": ..., \"target\": ...}.")],
    base_model: BaseModel = None,
    model_path: ModelPath = None,
    tasks: Tasks = "all",
    methods: Methods = "zero-shot,icl,lorahub,batchcomp,instance,fft",
    shots: Shots = 5,
    seeds: Seeds = "1,2,3",
    num_modules: NumModules = 20,
    budget: Budget = 40,
    optimizer: Optimizer = "ngopt",
    limit: Limit = None,
    batch_size: BatchSize = 16,
    max_new_tokens: MaxNew = 256,
    out: Out = None,
    embedder: EmbedderOpt = None,
    dtype: Dtype = "auto",
    device: Device = "auto",
    ray: RayOpt = None,
    workers: WorkersOpt = None,
    ray_data: RayDataOpt = "auto",
    json_: JsonOpt = False,
) -> None:
    """Your own tasks, one JSONL file each, with the same protocol and report as `eval bbh`."""
    from ..eval.tasks import load_task_dir

    scale = ray_options(ray, workers, ray_data)
    suite = load_task_dir(folder)
    _run(suite, tasks=tasks, methods=methods, seeds=seeds, out=out or Path(f"eval-{suite.name}"), json_=json_, ray=scale,
         base_model=base_model, model_path=model_path, shots=shots, num_modules=num_modules, budget=budget,
         optimizer=optimizer, limit=limit, batch_size=batch_size, max_new_tokens=max_new_tokens, embedder=embedder,
         dtype=dtype, device=device)


@app.command(epilog=EXAMPLES)
def demo(
    tasks: Tasks = "all",
    methods: Methods = "zero-shot,icl,lorahub,batchcomp,instance,fft",
    shots: Shots = 5,
    seeds: Seeds = "1,2,3",
    num_modules: Annotated[int, typer.Option("-n", "--num-modules", min=1, help="Modules per composition (the demo library has about 20).")] = 5,
    budget: Budget = 40,
    optimizer: Optimizer = "ngopt",
    limit: Limit = None,
    batch_size: BatchSize = 32,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", min=1, help="Greedy decoding stops after this many tokens (demo answers are short).")] = 32,
    out: Out = None,
    ray: RayOpt = None,
    workers: WorkersOpt = None,
    ray_data: RayDataOpt = "auto",
    json_: JsonOpt = False,
) -> None:
    """The demo library's held-out tasks, offline: its adapters are mirrored into a temporary registry."""
    from ..demo import library
    from ..eval.tasks import load_demo
    from ..models import torch_threads
    from .registry import scratch_store

    scale = ray_options(ray, workers, ray_data, max_threads=library.THREADS)
    suite = load_demo()
    with scratch_store("lorahub-eval-demo-") as store:
        with progress("Mirroring the demo adapters", len(library.upstream_tasks())) as advance:
            library.mirror(store, progress=advance)
        with torch_threads(library.THREADS):
            _run(suite, tasks=tasks, methods=methods, seeds=seeds, out=out or Path("eval-demo"), json_=json_, store=store, ray=scale,
                 title="Demo library: held-out tasks", base_model=library.BASE_MODEL, model_path=str(library.base_model_path()),
                 shots=shots, num_modules=num_modules, budget=budget, optimizer=optimizer, limit=limit,
                 batch_size=batch_size, max_new_tokens=max_new_tokens, dtype="float32", device="cpu")
