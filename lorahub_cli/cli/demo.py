"""`lorahub demo`: retrieve, compose and evaluate on the shipped demo library. Offline, seconds on a CPU."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Annotated

import typer

from ..settings import COMPOSE, DEMO
from ._options import BudgetOpt, JsonOpt, NumModulesOpt
from ._output import info, out, print_json, progress, short_path, weights_table

EXAMPLES = """Examples:\n
  lorahub demo\n
  lorahub demo --task mixed_reverse_add --seed 2 --json\n
  lorahub demo --home ~/lorahub-demo --out my-demo-adapter"""

WIDTH = 80  # the demo's prose is wrapped here, never inside a word (an id is one word)
ANSWERS = (("target", "target"), ("base model", "zero-shot"), ("composed", "composed"))


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
            "--out",
            "-o",
            help="Write the composed adapter here, a new folder (default: HOME/compositions/TASK, in the demo home).",
        ),
    ] = None,
    home: Annotated[
        Path | None,
        typer.Option(
            "--home",
            help="The demo home: its registry, the task's files, the composition; kept for the next commands "
            "(default: LORAHUB_HOME-demo, beside the lorahub home).",
        ),
    ] = None,
    json_: JsonOpt = False,
) -> None:
    """The whole pipeline offline on the embedded demo library: mirror, retrieve, compose, evaluate; it ends with the
    commands that go on from there, offline, on the registry it leaves."""
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
    info(f"Held-out task '{result['task']}' ({result['type']}): {result['description']}.")
    skills = ", ".join(result["skills"])
    info(f"{result['shots']} shots, {result['test']} test inputs (seed {seed}); the skills it needs: {skills}.")
    cosine = {r["id"]: r["score"] for r in result["retrieved"]}
    modules = [{"id": i, "weight": w, "score": cosine[i]} for i, w in result["weights"].items()]
    modules.sort(key=lambda m: -abs(m["weight"]))
    out.print(weights_table("Retrieved for the shots, with the searched weights", modules))
    paragraph("")
    for line in tour.scores(result):
        out.print(line)
    out.print(tour.verdict(result))
    paragraph("")
    paragraph(tour.explain(result) + " For example:")
    for row in result["examples"]:
        out.print(f"  {row['input']}")
        answers = [f"{name} {row[key]!r}" for name, key in ANSWERS]
        line = "    " + "   ".join(answers)
        for shown in [line] if len(line) <= WIDTH else [f"    {a}" for a in answers]:
            out.print(shown[:WIDTH], soft_wrap=True)  # an answer that runs on is cut here (--json has it whole)
    paragraph("")
    home = Path(result["home"])
    composition = Path(result["out"])
    written = f"{composition.relative_to(home)}/" if composition.is_relative_to(home) else short_path(composition, 50)
    paragraph(
        f"Everything stays in {short_path(home, 50)}: the demo registry (registry/), the task's shots and inputs "
        f"(tasks/{result['task']}/) and the composition ({written}); {result['seconds']:.0f} s in all."
    )
    out.print("Next, offline, as with your own adapters and examples:")
    for command in result["next"]:
        out.print(f"  {command}", soft_wrap=True)
    for kept in result["files"]["kept"]:
        info(f"Kept {kept} as it is: it changed since the demo wrote it.")
    info("`lorahub eval demo` runs the full table of docs/demo.md (a few minutes).")


def paragraph(text: str) -> None:
    """Prose on stdout, wrapped at WIDTH between words: an id or a path is never broken."""
    out.print(textwrap.fill(text, WIDTH, break_long_words=False, break_on_hyphens=False), soft_wrap=True)
