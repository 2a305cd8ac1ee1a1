"""The evaluation grid on Ray: actors that each hold a loaded base model (and the LoRA bank it builds)
for many cells. The driver keeps the queue and writes every finished cell (eval/runner.py), so a run
can be resumed locally or on another cluster, and the other way round."""

from __future__ import annotations

import dataclasses

from ..errors import LorahubError
from ..eval.methods import Context, EvalConfig, run_method
from .cluster import RayOptions, connect, place
from .pool import Pool
from .shipping import Folder, data_for_workers
from .worker import Worker


class EvalWorker(Worker):
    def __init__(self, config: EvalConfig, registry: Folder | None, model: Folder | None, threads: int):
        super().__init__(threads)
        self.config, self.registry, self.model = config, registry, model

    def prepare(self) -> None:
        from ..registry import Store

        config = self.config
        if self.model is not None:
            config = dataclasses.replace(config, model_path=str(self.model.local()))
        self.ctx = Context(config, Store(self.registry.local()) if self.registry else None)
        self.ctx.base  # noqa: B018 - load the model now, so that a model that cannot load fails the start

    def run(self, payload: tuple):
        method, shots, inputs, seed = payload
        return run_method(method, self.ctx, shots, inputs, seed)


def ray_executor(options: RayOptions, config: EvalConfig, store=None, on_event=None):
    """An executor for `evaluate(..., execute=...)` that computes the missing cells on Ray actors (Ray starts
    only when some cell is missing). `on_event(kind, job, actor)`: started, done, retried, failed."""

    def execute(jobs, advance):
        with connect(options.address) as ray:
            placement = place(ray, options, config.device)
            advance(f"Starting {placement.workers} Ray workers", step=0)
            registry, model = data_for_workers(ray, placement, options, store, config.base_model, config.model_path)
            actor = ray.remote(EvalWorker).options(**placement.resources)
            pool = Pool(
                ray, lambda: actor.remote(config, registry, model, placement.threads), placement.workers, on_event
            )
            failures = []
            status = lambda text, step=1: advance(f"Evaluating on Ray: {text}", step=step)  # noqa: E731
            for outcome in pool.run(jobs, lambda job: (job.method, job.shots, job.inputs, job.seed), status):
                if outcome.error:
                    failures.append(f"{outcome.job.label}: {outcome.error}")
                else:
                    yield (outcome.job, *outcome.result)
        if failures:
            listed = "; ".join(failures[:3]) + (f"; and {len(failures) - 3} more" if len(failures) > 3 else "")
            raise LorahubError(
                f"{len(failures)} of {len(jobs)} cells failed ({listed}).",
                "The finished cells are saved: fix the cause and run the same command to compute the rest.",
            )

    return execute
