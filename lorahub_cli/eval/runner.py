"""The grid of (task, seed, method) cells: each computed once, saved atomically, skipped when resumed.

A cell is `OUT/cells/<task>/seed-<seed>/<method>.json`: the test-set indices, every
prediction, both scores and the cost. A killed run continues from the finished cells;
`OUT/run.json` holds the settings, and a run with other settings is refused.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import InputError
from ..io import atomic_write_json, read_json
from . import scoring
from .methods import Context, run_method
from .tasks import Suite, split

RUN_FILE = "run.json"


def cell_path(out: Path, task: str, seed: int, method: str) -> Path:
    return out / "cells" / task / f"seed-{seed}" / f"{method}.json"


def _check_run(out: Path, suite: Suite, ctx: Context) -> None:
    settings = {"suite": suite.name, "config": ctx.config.fingerprint()}
    path = out / RUN_FILE
    if path.exists():
        saved = read_json(path, f"Remove {path} or choose another --out.")
        if saved != settings:
            changed = sorted(k for k in settings["config"] if saved.get("config", {}).get(k) != settings["config"][k])
            what = ", ".join(changed) or "the suite"
            raise InputError(f"--out {out} holds a run with other settings ({what}).", "Use the same settings to resume, or another --out.")
    else:
        atomic_write_json(path, settings)


def run_grid(suite: Suite, methods: list[str], seeds: list[int], ctx: Context, out: Path, advance=lambda description: None) -> list[dict]:
    """Every cell's result, computing the missing ones; `advance(description)` after each cell."""
    out.mkdir(parents=True, exist_ok=True)
    _check_run(out, suite, ctx)
    cells = []
    for task, examples in suite.tasks.items():
        for seed in seeds:
            shot_ids, test = split(examples, seed, ctx.config.shots, ctx.config.limit)
            shots = [examples[i] for i in shot_ids]
            inputs = [examples[i].input for i in test]
            for method in methods:
                path = cell_path(out, task, seed, method)
                if path.exists():
                    cell = read_json(path, f"Delete {path} to recompute that cell.")
                else:
                    answer, seconds = run_method(method, ctx, shots, inputs, seed)
                    cell = {"task": task, "seed": seed, "method": method, "n": len(test), "seconds": round(seconds, 3),
                            **scoring.score([examples[i] for i in test], answer.predictions), "detail": answer.detail,
                            "shots": shot_ids, "test": test, "predictions": answer.predictions}
                    atomic_write_json(path, cell)
                cells.append(cell)
                advance(f"{task} · seed {seed} · {method}")
    return cells
