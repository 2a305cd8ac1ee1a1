"""Where output goes: data to stdout, everything for people (messages, tables, progress) to stderr."""

from __future__ import annotations

import json
import sys
from contextlib import contextmanager
from pathlib import Path

from rich import box
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


def table(title: str | None = None) -> Table:
    """A table for the terminal: a title on the left, light rules (fewer columns lost to borders at 80 wide)."""
    return Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False)


def id_column(table: Table, header: str, ids) -> None:
    """A column of ids: never wrapped or cut (an id is copied into the next command); the other columns give way."""
    table.add_column(header, no_wrap=True, min_width=max([len(header), *map(len, ids)]))


SCORE_NAMES = {"data": "cosine", "weights": "weight score", "mixed": "z-score"}


def ranking_table(title: str, results: list[dict], by: str = "data") -> Table:
    """Retrieval results ({id, score}, best first) as a numbered table; a mixed ranking (`by`) also shows which
    card ranked each adapter and that card's own score."""
    ranked = table(title)
    ranked.add_column("#", justify="right")
    id_column(ranked, "adapter", [r["id"] for r in results])
    ranked.add_column(SCORE_NAMES.get(by, "score"), justify="right")
    if by == "mixed":
        ranked.add_column("card")
        ranked.add_column("its score", justify="right")
    for rank, result in enumerate(results, 1):
        row = [str(rank), result["id"], f"{result['score']:.4f}"]
        if by == "mixed":
            row += [result["card"], f"{result['raw']:.4f}"]
        ranked.add_row(*row)
    return ranked


def weights_table(title: str, modules: list[dict], by: str = "data") -> Table:
    """A composition's modules ({id, weight[, score]}, largest |w| first); `by`: what ranked them."""
    chosen = table(title)
    chosen.add_column("weight", justify="right")
    id_column(chosen, "module", [m["id"] for m in modules])
    scored = any("score" in m for m in modules)
    if scored:
        chosen.add_column(SCORE_NAMES.get(by, "score"), justify="right")
    for m in modules:
        chosen.add_row(
            f"{m['weight']:+.3f}", m["id"], *([f"{m['score']:.4f}" if "score" in m else ""] if scored else [])
        )
    return chosen


def short_path(path: str | Path, width: int = 40) -> str:
    """A path as a person reads it in a table: relative to the working folder or ~ when under it, and at most
    `width` characters, whole folder names cut from the start (the end names the thing; --json has it whole)."""
    path = Path(path)
    text = str(path)
    for root, shown in ((Path.cwd(), ""), (Path.home(), "~")):
        if path.is_relative_to(root):
            rest = path.relative_to(root)
            text = str(Path(shown) / rest) if shown else str(rest)
            break
    parts = Path(text).parts
    while len(text) > width and len(parts) > 1:
        parts = parts[1:]
        text = str(Path("…", *parts))
    return text if len(text) <= width else "…" + text[-(width - 1) :]
