"""Batch composition: one composition per shots file of a folder, here or on Ray actors, resumable.

`OUT/<name>/` receives the composition of `TASKS/<name>.jsonl`, written atomically by this process
alone. A folder that already holds a lorahub recipe is kept (the run resumes); `overwrite` replaces
only such folders; any other existing folder is left alone and its task reported failed.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path

from ..compose import pipeline
from ..compose.export import RECIPE_FILE
from ..errors import InputError, LorahubError
from ..io import Example, read_examples, read_json, sha256_file
from ..quiet import no_progress
from .shipping import Folder
from .worker import Worker


@dataclass
class BatchJob:
    name: str
    examples: list[Example]
    shots_meta: dict
    dest: Path

    @property
    def label(self) -> str:
        return self.name


def _row(name: str, dest: Path, status: str, recipe: dict | None = None, seconds: float | None = None, error: str | None = None) -> dict:
    row = {"task": name, "status": status, "out": str(dest)}
    if recipe is not None:
        entries = [recipe] if recipe["level"] == "task" else recipe["compositions"]
        row.update(level=recipe["level"], loss=recipe["loss"] if recipe["level"] == "task" else None,
                   evaluations=sum((e.get("search") or {}).get("evaluations", 0) for e in entries))
    if seconds is not None:
        row["seconds"] = round(seconds, 3)
    if error is not None:
        row["error"] = error
    return row


def plan(tasks_dir: Path, out: Path, overwrite: bool) -> tuple[list[BatchJob], dict[str, dict]]:
    """The tasks to compose, and the rows of those already done or refused, by task name."""
    if not tasks_dir.is_dir():
        raise InputError(f"--tasks '{tasks_dir}' is not a folder.", "Give a folder of <task>.jsonl shots files.")
    files = sorted(tasks_dir.glob("*.jsonl"))
    if not files:
        raise InputError(f"--tasks '{tasks_dir}' has no .jsonl files.", 'Put one <task>.jsonl per task, lines {"input": ..., "target": ...}.')
    if out.exists() and not out.is_dir():
        raise InputError(f"--out '{out}' is a file, not a folder.", "Choose another --out.")
    jobs, rows = [], {}
    for path in files:
        name, dest = path.stem, out / path.stem
        ours = (dest / RECIPE_FILE).is_file()
        if ours and not overwrite:
            rows[name] = _row(name, dest, "done earlier", read_json(dest / RECIPE_FILE, f"Delete {dest} to compose it again."))
        elif dest.exists() and not ours:
            rows[name] = _row(name, dest, "failed", error=f"'{dest}' exists and is not a composition lorahub wrote; it is left alone.")
        else:
            try:
                examples = read_examples(path)
            except LorahubError as error:
                rows[name] = _row(name, dest, "failed", error=str(error))
                continue
            jobs.append(BatchJob(name, examples, {"path": str(path), "sha256": sha256_file(path), "count": len(examples)}, dest))
    return jobs, rows


def base_model_name(store, options: pipeline.ComposeOptions) -> str | None:
    """The model every composition loads, when it is known before the first one: loaded once, shared."""
    if options.model_path or options.base_model:
        return options.model_path or options.base_model
    bases = {r.base_model for r in store.list()}
    return bases.pop() if len(bases) == 1 else None


def _compose(store, job: BatchJob, options, level: str, base, progress=None) -> pipeline.Composition:
    run = pipeline.compose_instance if level == "instance" else pipeline.compose_task
    return run(store, job.examples, job.shots_meta, options, progress=progress, base=base)


class ComposeWorker(Worker):
    def __init__(self, options: pipeline.ComposeOptions, level: str, registry: Folder, model: Folder | None, name: str | None, threads: int):
        super().__init__(threads)
        self.options, self.level, self.registry, self.model, self.name = options, level, registry, model, name

    def prepare(self) -> None:
        from ..models import load_base_model
        from ..registry import Store

        if self.model is not None:
            self.options = dataclasses.replace(self.options, model_path=str(self.model.local()))
            self.name = self.options.model_path
        self.store = Store(self.registry.local())
        self.base = load_base_model(self.name, dtype=self.options.dtype, device=self.options.device) if self.name else None

    def run(self, job: BatchJob) -> tuple[pipeline.Composition, float]:
        start = time.perf_counter()
        return _compose(self.store, job, self.options, self.level, self.base), time.perf_counter() - start


def compose_folder(store, tasks_dir: Path, out: Path, options: pipeline.ComposeOptions, *, level: str = "task",
                   overwrite: bool = False, ray=None, progress_factory=None, on_event=None) -> list[dict]:
    """Compose every shots file of `tasks_dir` into `out/<name>/` (here, or on Ray with `ray`: RayOptions);
    one row per file, in file order: composed, done earlier, or failed (with its error)."""
    jobs, rows = plan(tasks_dir, out, overwrite)
    name = base_model_name(store, options)
    factory = progress_factory or no_progress
    with factory("Composing", len(jobs) + len(rows)) as advance:
        advance(len(rows), description="Composing")
        if jobs and ray is None:
            from ..models import load_base_model

            base = load_base_model(name, dtype=options.dtype, device=options.device) if name else None
            for job in jobs:
                start = time.perf_counter()
                try:
                    composition = _compose(store, job, options, level, base,
                                           progress=lambda best, j=job: advance(0, description=f"{j.name} (best {best:.4f})"))
                except LorahubError as error:
                    rows[job.name] = _row(job.name, job.dest, "failed", error=str(error))
                    continue
                rows[job.name] = _finish(composition, time.perf_counter() - start, job, overwrite)
                advance(description=job.name)
        elif jobs:
            for job, result, error in _on_ray(ray, store, jobs, options, level, name, advance, on_event):
                rows[job.name] = _row(job.name, job.dest, "failed", error=error) if error else _finish(*result, job, overwrite)
    return [rows[path.stem] for path in sorted(tasks_dir.glob("*.jsonl"))]


def _finish(composition: pipeline.Composition, seconds: float, job: BatchJob, overwrite: bool) -> dict:
    pipeline.write(composition, job.dest, overwrite=overwrite)
    return _row(job.name, job.dest, "composed", composition.recipe, seconds)


def _on_ray(options, store, jobs: list[BatchJob], compose_options, level: str, name: str | None, advance, on_event):
    from .cluster import connect, place
    from .eval import data_for_workers
    from .pool import Pool

    with connect(options.address) as ray:
        placement = place(ray, options, compose_options.device)
        advance(0, description=f"Starting {placement.workers} Ray workers")
        model_path = compose_options.model_path or name
        registry, model = data_for_workers(ray, placement, options, store, compose_options.base_model, model_path)
        actor = ray.remote(ComposeWorker).options(**placement.resources)
        pool = Pool(ray, lambda: actor.remote(compose_options, level, registry, model, name, placement.threads), placement.workers, on_event)
        for outcome in pool.run(jobs, lambda job: job, lambda status, step=1: advance(step, description=f"Composing on Ray: {status}")):
            yield outcome.job, outcome.result, outcome.error
