"""`lorahub push`: publish a composed folder to the Hub."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..publish import DEFAULT_MESSAGE
from ._options import JsonOpt
from ._output import info, print_json, warn

EXAMPLES = """Examples:\n
  lorahub push ./my-composition --repo me/my-lora\n
  lorahub push ./my-composition --repo my-org/my-lora --private --message "Sentiment, 20 modules"\n
  lorahub push ./per-example --repo me/my-lora --branch instance-level --json"""


def push(
    folder: Annotated[Path, typer.Argument(help="A folder written by `lorahub compose --out`.")],
    repo: Annotated[str, typer.Option("--repo", help="Hub repo id NAMESPACE/NAME; created if missing.")],
    private: Annotated[
        bool, typer.Option("--private", help="Create the repo private (an existing repo keeps its visibility).")
    ] = False,
    branch: Annotated[
        str | None, typer.Option("--branch", help="Commit to this branch, created from main if missing.")
    ] = None,
    message: Annotated[str, typer.Option("--message", "-m", help="Commit message.")] = DEFAULT_MESSAGE,
    json_: JsonOpt = False,
) -> None:
    """Check a composed folder offline, then upload its adapter, recipe and cards to a Hub repo in one commit."""
    from ..publish import push_folder

    where = f"{repo}@{branch}" if branch else repo
    info(f"Pushing {folder} to {where}…")
    result = push_folder(folder, repo, private=private, branch=branch, message=message, warn=warn)
    info(f"{len(result.files)} files on {where} at commit {result.commit[:12]}.")
    if json_:
        print_json(result.to_json())
    else:
        print(result.url)
