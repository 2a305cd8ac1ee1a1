"""`lorahub compose --tasks DIR`: the summary of a batch of compositions, as a table or JSON."""

from __future__ import annotations

from pathlib import Path

from rich.table import Table

from ..errors import LorahubError
from ._output import err, print_json, progress


def _table(rows: list[dict]) -> Table:
    table = Table(title="Compositions", title_justify="left")
    for column, justify in (
        ("task", "left"),
        ("status", "left"),
        ("loss", "right"),
        ("evaluations", "right"),
        ("seconds", "right"),
        ("out / error", "left"),
    ):
        table.add_column(column, justify=justify)
    for row in rows:
        loss = f"{row['loss']:.4f}" if row.get("loss") is not None else "–"
        table.add_row(
            row["task"],
            row["status"],
            loss,
            str(row.get("evaluations", "–")),
            f"{row['seconds']:.1f}" if "seconds" in row else "–",
            row.get("error") or row["out"],
        )
    return table


def compose_batch(tasks: Path, out: Path, options, *, level: str, overwrite: bool, ray, json_: bool) -> None:
    from .. import api

    rows = api.compose_batch(
        tasks, out, options, level=level, overwrite=overwrite, ray=ray, progress_factory=None if json_ else progress
    )
    counts = {status: sum(r["status"] == status for r in rows) for status in ("composed", "done earlier", "failed")}
    if json_:
        print_json({"tasks": rows, **{k.replace(" ", "_"): v for k, v in counts.items()}})
    else:
        err.print(_table(rows))
    if counts["failed"]:
        raise LorahubError(
            f"{counts['failed']} of {len(rows)} tasks failed (see the table).",
            "The finished compositions are kept: fix the cause and run the same command to compose the rest.",
        )
