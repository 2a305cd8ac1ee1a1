"""`lorahub demo`: retrieve, compose and evaluate on the shipped demo library. Offline, seconds on a CPU."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..settings import COMPOSE, DEMO
from ._options import BudgetOpt, JsonOpt, NumModulesOpt
from ._output import info, out, print_json, progress

EXAMPLES = """Examples:\n
  lorahub demo\n
  lorahub demo --task mixed_reverse_add --seed 2 --out my-demo-adapter --json"""


def demo(
    task: Annotated[
        str | None,
        typer.Option("--task", help="Held-out task of the demo library (default: the one with the median gain)."),
    ] = DEMO["task"],
    seed: Annotated[int, typer.Option("--seed", help="Seed of the shots/test split and of the search.")] = DEMO["seed"],
    num_modules: NumModulesOpt = DEMO["num_modules"],
    budget: BudgetOpt = COMPOSE["budget"],
    out_dir: Annotated[
        Path | None,
        typer.Option(
            "--out", "-o", help="Where to write the composed adapter (default: ./lorahub-demo-TASK, never overwritten)."
        ),
    ] = None,
    home: Annotated[
        Path | None, typer.Option("--home", help="Keep the demo registry in this folder (default: a temporary one).")
    ] = None,
    json_: JsonOpt = False,
) -> None:
    """The whole pipeline offline on the embedded demo library: mirror, retrieve, compose, evaluate, write."""
    from .. import api
    from ..demo import tour

    result = api.demo(
        task,
        seed=seed,
        num_modules=num_modules,
        budget=budget,
        out=out_dir,
        home=home,
        progress_factory=None if json_ else progress,
    )
    if json_:
        print_json(result)
        return
    info(f"Held-out task '{result['task']}' ({result['type']}): {result['description']}")
    skills = ", ".join(result["skills"])
    info(f"{result['shots']} shots, {result['test']} test inputs (seed {seed}); the skills it needs: {skills}.")
    info("Retrieved for the shots: " + ", ".join(f"{r['id']} ({r['score']:.2f})" for r in result["retrieved"]))
    info("Searched weights: " + ", ".join(f"{k}={v:+.3f}" for k, v in result["weights"].items()))
    em = result["exact_match"]
    out.print(f"Exact match on the test set: zero-shot {em['zero-shot']:.1f}%, composed {em['composed']:.1f}%.")
    info(f"Always giving the most frequent answer would score {result['majority_answer']:.1f}%.")
    out.print(tour.explain(result))
    out.print(tour.verdict(result))
    for row in result["examples"]:
        info(
            f"  {row['input']!r} -> base {row['zero-shot']!r}, composed {row['composed']!r} (target {row['target']!r})"
        )
    info(
        f"Wrote the composed adapter to {result['out']} ({result['seconds']:.0f} s in all). "
        "Next: `lorahub eval demo` for the full table."
    )
