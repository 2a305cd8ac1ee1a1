"""The grid of (task, seed, method) cells: each computed once, saved atomically, skipped when resumed.

A cell is `OUT/cells/<task>/seed-<seed>/<method>.json`: the test-set indices, every
prediction, both scores and the cost. A killed run continues from the finished cells;
`OUT/run.json` holds the settings, and a run with other settings is refused.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from ..errors import InputError
from ..io import Example, atomic_write_json, read_json
from . import scoring
from .methods import Context, EvalConfig, MethodResult, run_method
from .tasks import Suite, split

RUN_FILE = "run.json"


@dataclass
class Job:
    """One cell to compute: everything a worker needs, and the test examples the driver scores against."""

    task: str
    seed: int
    method: str
    shots: list[Example]
    inputs: list[str]
    shot_ids: list[int]
    test: list[int]
    targets: list[Example]

    @property
    def label(self) -> str:
        return f"{self.task} · seed {self.seed} · {self.method}"


# A way to compute cells elsewhere (on Ray): yields each job with its answer and seconds as it finishes.
Executor = Callable[[list[Job], Callable], Iterable[tuple[Job, MethodResult, float]]]


def check_run_folder(out: Path) -> Path:
    """Before any work: `out` is new, empty, or a run folder (which resumes); never a folder of other things,
    whose files (a report.md, say) the run would replace. Returns `out` resolved."""
    from ..outputs import check_output

    out = check_output(out, into=True)
    if out.exists():
        if not out.is_dir():
            raise InputError(f"'{out}' is a file, not a folder.", "Choose another --out.")
        if not (out / RUN_FILE).is_file() and any(out.iterdir()):
            raise InputError(
                f"refusing to write into '{out}': it holds files but no {RUN_FILE}, so it is not an eval run folder.",
                "Choose a new or empty --out (an eval run folder resumes).",
            )
    return out


def cell_path(out: Path, task: str, seed: int, method: str) -> Path:
    return out / "cells" / task / f"seed-{seed}" / f"{method}.json"


def _check_run(out: Path, suite: Suite, config: EvalConfig) -> None:
    settings = {"suite": suite.name, "config": config.fingerprint()}
    path = out / RUN_FILE
    if path.exists():
        saved = read_json(path, f"Remove {path} or choose another --out.")
        if saved != settings:
            changed = sorted(k for k in settings["config"] if saved.get("config", {}).get(k) != settings["config"][k])
            what = ", ".join(changed) or "the suite"
            raise InputError(
                f"--out {out} holds a run with other settings ({what}).",
                "Use the same settings to resume, or another --out.",
            )
    else:
        atomic_write_json(path, settings)


def plan(suite: Suite, methods: list[str], seeds: list[int], config: EvalConfig) -> Iterator[Job]:
    """Every cell of the grid, in report order."""
    for task, examples in suite.tasks.items():
        for seed in seeds:
            shot_ids, test = split(examples, seed, config.shots, config.limit)
            shots, inputs = [examples[i] for i in shot_ids], [examples[i].input for i in test]
            for method in methods:
                yield Job(task, seed, method, shots, inputs, shot_ids, test, [examples[i] for i in test])


def _save(out: Path, job: Job, answer: MethodResult, seconds: float) -> dict:
    cell = {
        "task": job.task,
        "seed": job.seed,
        "method": job.method,
        "n": len(job.test),
        "seconds": round(seconds, 3),
        **scoring.score(job.targets, answer.predictions),
        "detail": answer.detail,
        "shots": job.shot_ids,
        "test": job.test,
        "predictions": answer.predictions,
    }
    atomic_write_json(cell_path(out, job.task, job.seed, job.method), cell)
    return cell


def run_grid(
    suite: Suite,
    methods: list[str],
    seeds: list[int],
    ctx: Context,
    out: Path,
    advance=lambda description, step=1: None,
    execute: Executor | None = None,
) -> list[dict]:
    """Every cell's result, computing the missing ones; `advance(description)` after each cell.

    Cells are computed here, one after the other, or by `execute` (which calls `advance` itself);
    either way this process alone writes them."""
    out.mkdir(parents=True, exist_ok=True)
    _check_run(out, suite, ctx.config)
    jobs, cells, missing = list(plan(suite, methods, seeds, ctx.config)), {}, []
    for job in jobs:
        path = cell_path(out, job.task, job.seed, job.method)
        if path.exists():
            cells[job.label] = read_json(path, f"Delete {path} to recompute that cell.")
        elif execute is None:
            cells[job.label] = _save(out, job, *run_method(job.method, ctx, job.shots, job.inputs, job.seed))
        else:
            missing.append(job)
            continue
        advance(job.label)
    if missing:
        for job, answer, seconds in execute(missing, advance):
            cells[job.label] = _save(out, job, answer, seconds)
    return [cells[job.label] for job in jobs]
