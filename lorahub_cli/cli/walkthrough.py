"""`lorahub walkthrough`: the registry and retrieval, offline, on the example library shipped with lorahub."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..api import scratch_store
from ..errors import InputError
from ..settings import WALKTHROUGH
from ._options import JsonOpt
from ._output import info, out, print_json, progress, ranking_table

EXAMPLES = """Examples:\n
  lorahub walkthrough\n
  lorahub walkthrough --task addition --json"""


def walkthrough(
    task: Annotated[str, typer.Option("--task", help="Which example task's shots to retrieve for.")] = WALKTHROUGH[
        "task"
    ],
    k: Annotated[int, typer.Option("-k", min=1, help="Adapters to show per ranking.")] = WALKTHROUGH["k"],
    home: Annotated[
        Path | None,
        typer.Option("--home", help="Keep the walk-through registry in this folder (default: a temporary one)."),
    ] = None,
    json_: JsonOpt = False,
) -> None:
    """Register the shipped example adapters with embedding cards and retrieve for their held-out examples. Offline.

    Registry and retrieval only: the example adapters have random weights and no shipped base model, so they
    cannot be composed; `lorahub demo` composes on its own library."""
    from ..examples import walkthrough as example

    names = example.tasks()
    if task not in names:
        raise InputError(f"--task '{task}' is not an example task.", f"Choose one of: {', '.join(names)}.")
    with scratch_store("lorahub-walkthrough-", home) as store:
        with progress("Registering example adapters and building cards", len(names)) as advance:
            result = example.run(store, task, k, advance=advance)
    folder = result["registry"]
    if json_:
        print_json(result)
        return
    info(f"Registered {result['adapters']} adapters with cards in {folder}" + ("" if home else " (temporary)") + ".")
    out.print(ranking_table(f"Task-level retrieval for the 5 '{task}' shots", result["task_level"]["results"]))
    routes = result["instance_level"]["routes"]
    out.print(
        f"Instance level: {len(routes)} '{task}' inputs routed to shots "
        f"{sorted({r['shot'] for r in routes})}; each shot's own top-1: "
        f"{sorted({s['results'][0]['id'] for s in result['instance_level']['shots']})}"
    )
    stats = result["per_input"]
    out.print(
        f"Per-input retrieval over {stats['inputs']} mixed inputs of {len(names)} tasks: "
        f"top-1 is the input's own task's adapter for {stats['top1_correct']}/{stats['inputs']}."
    )
    info(
        "These example adapters have random weights and their base model is not shipped: they show the registry "
        "and retrieval, not composition. `lorahub demo` composes trained adapters on a shipped base."
    )
