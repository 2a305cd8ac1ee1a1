"""Where output goes: data to stdout, everything for people (messages, tables, progress) to stderr."""

from __future__ import annotations

import json
import sys
from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

err = Console(stderr=True, highlight=False)
out = Console(highlight=False, soft_wrap=True)


def print_json(data) -> None:
    sys.stdout.write(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
    sys.stdout.flush()


def info(message: str) -> None:
    err.print(message)


def warn(message: str) -> None:
    err.print(f"[yellow]Warning:[/yellow] {message}")


@contextmanager
def progress(description: str, total: int | None):
    """A progress bar on stderr; yields a callable that advances it by one step."""
    bar = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=err,
        transient=False,
    )
    with bar:
        task = bar.add_task(description, total=total)

        def advance(step: int = 1, description: str | None = None) -> None:
            bar.update(task, advance=step, description=description or bar.tasks[0].description)

        yield advance


SCORE_NAMES = {"data": "cosine", "weights": "weight score", "mixed": "z-score"}


def ranking_table(title: str, results: list[dict], by: str = "data") -> Table:
    """Retrieval results ({id, score}, best first) as a numbered table; a mixed ranking (`by`) also shows which
    card ranked each adapter and that card's own score."""
    table = Table(title=title, title_justify="left")
    table.add_column("#", justify="right")
    table.add_column("adapter", overflow="fold")
    table.add_column(SCORE_NAMES.get(by, "score"), justify="right")
    if by == "mixed":
        table.add_column("card")
        table.add_column("its score", justify="right")
    for rank, result in enumerate(results, 1):
        row = [str(rank), result["id"], f"{result['score']:.4f}"]
        if by == "mixed":
            row += [result["card"], f"{result['raw']:.4f}"]
        table.add_row(*row)
    return table
