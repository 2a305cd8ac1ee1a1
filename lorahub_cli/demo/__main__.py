"""An entry point at the CLI layer (so it may use Typer and cli._output).

`python -m lorahub_cli.demo build [--out DIR] [--reduced] [--seed S] [--threads N]`: rebuild the demo library."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from ..cli._output import info, progress
from ..errors import LorahubError
from ..settings import debug
from .library import MANIFEST, demo_dir

app = typer.Typer(no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False)


@app.callback()
def main() -> None:
    """Build the demo library shipped in registry/demo/."""


@app.command()
def build(
    out: Annotated[
        Path | None, typer.Option(help="Folder to write (replaced once complete). Default: registry/demo.")
    ] = None,
    reduced: Annotated[
        bool, typer.Option(help="A much smaller model and fewer tasks and steps, for CI (seconds).")
    ] = False,
    seed: Annotated[int, typer.Option(help="Seed of the data, the initial weights and every training run.")] = 0,
    threads: Annotated[
        int, typer.Option(min=1, help="Torch threads (results can differ in the last bits between thread counts).")
    ] = 1,
) -> None:
    """Train the tiny base model and the upstream LoRAs, write cards, held-out tasks and the manifest."""
    from .build import build as run

    target = out or demo_dir()
    meta = run(target, reduced=reduced, seed=seed, threads=threads, progress_factory=progress)
    info(
        f"Wrote {target} ({meta['total_size'] / 1e6:.1f} MB in {len(meta['files'])} files, "
        f"{meta['build']['seconds']} s); see {target / MANIFEST}."
    )


if __name__ == "__main__":
    try:
        app()
    except LorahubError as error:
        if debug():
            raise
        # One line, as the lorahub CLI reports it.
        sys.stderr.write(f"Error: {error}\n")
        sys.exit(error.exit_code)
