"""Options shared by several commands, declared once."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

JsonOpt = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON on stdout.")]
BaseModelOpt = Annotated[
    str | None, typer.Option("--base-model", "-b", help="Only adapters trained on this base model.")
]
EmbedderOpt = Annotated[
    str | None,
    typer.Option(
        "--embedder",
        help="Sentence-transformers model id or local path (default: the offline all-MiniLM-L6-v2).",
    ),
]
DataOpt = Annotated[
    Path | None, typer.Option("--data", help="The adapter's training data as JSONL (input/target per line).")
]
DatasetOpt = Annotated[
    str | None,
    typer.Option("--dataset", help="Training data from a Hub dataset: HUB_ID[:CONFIG][@SPLIT]."),
]
FilterOpt = Annotated[
    list[str] | None, typer.Option("--filter", help="Keep dataset rows where FIELD=VALUE (repeatable).")
]
InputFieldOpt = Annotated[str | None, typer.Option("--input-field", help="Dataset field with the input text.")]
TargetFieldOpt = Annotated[str | None, typer.Option("--target-field", help="Dataset field with the target text.")]
MaxExamplesOpt = Annotated[
    int, typer.Option("--max-examples", min=1, help="Use at most this many training examples for the card.")
]
InputsOnlyOpt = Annotated[
    bool,
    typer.Option("--inputs-only", help="Embed inputs only (LoraRetriever's recipe) instead of input + target."),
]
InstructionOpt = Annotated[
    str, typer.Option("--instruction", help="Text put before every input before embedding (with --inputs-only).")
]


# --- choices that live in the library's registries -------------------------------------------------
# The registries import torch, which `lorahub --help` must not wait for: an option's help names its
# registry, `--OPTION list` prints it, and the library checks a value against it before any work.

REGISTRIES = {
    "formula": ("lorahub_cli.compose.formulas", "FORMULAS"),
    "optimizer": ("lorahub_cli.compose.search", "OPTIMIZERS"),
    "method": ("lorahub_cli.eval.methods", "RUNNERS"),
}


def registry(kind: str) -> dict[str, str]:
    """name -> one-line summary of every entry in the library registry `kind`."""
    import importlib

    module, name = REGISTRIES[kind]
    entries = getattr(importlib.import_module(module), name)
    return {
        key: getattr(value, "summary", None) or (value.__doc__ or "").strip().split("\n")[0]
        for key, value in entries.items()
    }


def registered(kind: str):
    """A Typer callback: `list` prints the registry `kind` (name -> summary) and exits."""

    def check(value: str | None) -> str | None:
        if value == "list":
            from ._output import print_json

            print_json(registry(kind))
            raise typer.Exit()
        return value

    return check


def choice_help(kind: str, text: str) -> str:
    return f"{text} `list` prints every registered {kind} with its summary."
