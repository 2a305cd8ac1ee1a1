"""Batch composition (`api.compose_batch`): which shots files to compose, and the Ray side of it.

`OUT/<name>/` receives the composition of `TASKS/<name>.jsonl`. A folder that already holds a lorahub
recipe is kept (the run resumes) unless `overwrite`; any other existing folder is left alone and its task
reported failed.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path

from ..compose import pipeline
from ..compose.folder import check_destination, holds_composition
from ..errors import InputError, LorahubError
from ..io import Example, read_examples, sha256_file
from ..outputs import check_output
from .shipping import Folder, data_for_workers
from .worker import Worker


@dataclass
class BatchJob:
    name: str
    path: Path
    examples: list[Example]
    shots_meta: dict
    dest: Path

    @property
    def label(self) -> str:
        return self.name


def plan(tasks_dir: Path, out: Path, overwrite: bool) -> tuple[list[BatchJob], list[str], dict[str, str]]:
    """The tasks to compose, the names composed earlier, and the tasks refused with their error."""
    if not tasks_dir.is_dir():
        raise InputError(f"--tasks '{tasks_dir}' is not a folder.", "Give a folder of <task>.jsonl shots files.")
    files = sorted(tasks_dir.glob("*.jsonl"))
    if not files:
        raise InputError(
            f"--tasks '{tasks_dir}' has no .jsonl files.",
            'Put one <task>.jsonl per task, lines {"input": ..., "target": ...}.',
        )
    check_output(out, into=True)  # the folder of every composition: it may exist (the batch resumes)
    if out.exists() and not out.is_dir():
        raise InputError(f"--out '{out}' is a file, not a folder.", "Choose another --out.")
    jobs, done, refused = [], [], {}
    for path in files:
        name, dest = path.stem, out / path.stem
        ours = holds_composition(dest)
        if ours and not overwrite:
            done.append(name)
        elif dest.exists() and not ours:
            refused[name] = f"'{dest}' exists and is not a composition lorahub wrote; it is left alone."
        else:
            try:
                check_destination(dest, overwrite, inputs=(path,))  # the one check of where it goes, before any work
                examples = read_examples(path)
            except LorahubError as error:
                refused[name] = str(error)
                continue
            jobs.append(
                BatchJob(
                    name, path, examples, {"path": str(path), "sha256": sha256_file(path), "count": len(examples)}, dest
                )
            )
    return jobs, done, refused


def base_model_name(store, options: pipeline.ComposeOptions) -> str | None:
    """The model every composition loads, when it is known before the first one."""
    if options.model_path or options.base_model:
        return options.model_path or options.base_model
    bases = {r.base_model for r in store.list()}
    return bases.pop() if len(bases) == 1 else None


def load_shared_base(store, options: pipeline.ComposeOptions):
    """The base model loaded once for the whole batch, or None (each composition then loads its own)."""
    from ..models import load_base_model

    name = base_model_name(store, options)
    # In fp32: it is every composition's answer model; each search makes its own copy in its precision.
    return load_base_model(name, dtype="float32", device=options.device) if name else None


def _compose(store, job: BatchJob, options, level: str, base) -> tuple[pipeline.Composition, float]:
    start = time.perf_counter()
    run = pipeline.compose_instance if level == "instance" else pipeline.compose_task
    return run(store, job.examples, job.shots_meta, options, base=base), time.perf_counter() - start


def here(store, jobs: list[BatchJob], options, level: str, base, advance):
    """Yields (job, (composition, seconds), None) or (job, None, error), one job after the other in this process."""
    for job in jobs:
        try:
            outcome = job, _compose(store, job, options, level, base), None
        except LorahubError as error:
            outcome = job, None, str(error)
        advance(description=job.name)
        yield outcome


class ComposeWorker(Worker):
    def __init__(
        self, options: pipeline.ComposeOptions, level: str, registry: Folder, model: Folder | None, threads: int
    ):
        super().__init__(threads)
        self.options, self.level, self.registry, self.model = options, level, registry, model

    def prepare(self) -> None:
        from ..registry import Store

        if self.model is not None:
            self.options = dataclasses.replace(self.options, model_path=str(self.model.local()))
        self.store = Store(self.registry.local())
        self.base = load_shared_base(self.store, self.options)

    def run(self, job: BatchJob) -> tuple[pipeline.Composition, float]:
        return _compose(self.store, job, self.options, self.level, self.base)


def on_ray(options, store, jobs: list[BatchJob], compose_options, level: str, advance, on_event=None):
    """Yields (job, (composition, seconds), None) or (job, None, error) as Ray actors finish them."""
    from .cluster import connect, place
    from .pool import Pool

    with connect(options.address) as ray:
        placement = place(ray, options, compose_options.device)
        advance(0, description=f"Starting {placement.workers} Ray workers")
        model_path = compose_options.model_path or base_model_name(store, compose_options)
        registry, model = data_for_workers(ray, placement, options, store, compose_options.base_model, model_path)
        actor = ray.remote(ComposeWorker).options(**placement.resources)
        pool = Pool(
            ray,
            lambda: actor.remote(compose_options, level, registry, model, placement.threads),
            placement.workers,
            on_event,
        )
        status = lambda text, step=1: advance(step, description=f"Composing on Ray: {text}")  # noqa: E731
        for outcome in pool.run(jobs, lambda job: job, status):
            yield outcome.job, outcome.result, outcome.error
