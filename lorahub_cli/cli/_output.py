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


def ranking_table(title: str, results: list[dict]) -> Table:
    """Retrieval results ({id, score}, best first) as a numbered table."""
    table = Table(title=title, title_justify="left")
    table.add_column("#", justify="right")
    table.add_column("adapter", overflow="fold")
    table.add_column("cosine", justify="right")
    for rank, result in enumerate(results, 1):
        table.add_row(str(rank), result["id"], f"{result['score']:.4f}")
    return table
