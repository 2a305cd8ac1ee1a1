"""One call from a suite and settings to the finished report (what `lorahub eval ...` runs)."""

from __future__ import annotations

from pathlib import Path

from ..quiet import no_progress
from .methods import COMPOSING, RETRIEVING, Context, EvalConfig
from .report import write_report
from .runner import run_grid
from .tasks import Suite


def _check_registry(store, config: EvalConfig, methods: list[str]) -> None:
    """Fail before any model loads if the registry cannot serve the composing methods."""
    from .. import retrieval
    from ..errors import InputError

    candidates = store.list(config.base_model)
    if len(candidates) < config.num_modules:
        raise InputError(
            f"the registry has {len(candidates)} adapters for base model '{config.base_model}', "
            f"fewer than -n {config.num_modules}.",
            "Add adapters (lorahub registry sync --catalog ... --cards) or lower -n.",
        )
    if any(m in RETRIEVING for m in methods):
        retrieval.CardIndex.from_store(store, config.base_model)  # raises, naming the fix, when no card exists


def evaluate(
    suite: Suite,
    methods: list[str],
    seeds: list[int],
    config: EvalConfig,
    out: Path,
    *,
    store=None,
    title: str | None = None,
    progress_factory=None,
    execute=None,
) -> dict:
    """Run (or resume) every (task, seed, method) cell into `out` and write the report; returns the summary.

    `execute`: compute the missing cells elsewhere (`scale.eval.ray_executor`); this process still writes them."""
    if any(m in COMPOSING for m in methods):
        _check_registry(store, config, methods)
    ctx = Context(config, store)
    total = len(suite.tasks) * len(seeds) * len(methods)
    with (progress_factory or no_progress)("Evaluating", total) as advance:
        cells = run_grid(
            suite, methods, seeds, ctx, out, advance=lambda d, step=1: advance(step, description=d), execute=execute
        )
    setup = {
        "suite": suite.name,
        "base model": config.base_model,
        "model path": config.model_path,
        "shots": config.shots,
        "test limit": config.limit,
        "modules (N)": config.num_modules,
        "optimizer": config.optimizer,
        "budget": config.budget,
        "l1": config.l1,
        "max new tokens": config.max_new_tokens,
    }
    return write_report(out, title or f"{suite.name} evaluation", setup, cells, suite.notes, suite.tasks)
