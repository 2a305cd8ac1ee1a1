"""Options shared by several commands, declared once."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

JsonOpt = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON on stdout.")]
BaseModelOpt = Annotated[
    Optional[str], typer.Option("--base-model", "-b", help="Only adapters trained on this base model.")
]
EmbedderOpt = Annotated[
    Optional[str],
    typer.Option(
        "--embedder",
        help="Sentence-transformers model id or local path (default: the offline all-MiniLM-L6-v2).",
    ),
]
DataOpt = Annotated[
    Optional[Path], typer.Option("--data", help="The adapter's training data as JSONL (input/target per line).")
]
DatasetOpt = Annotated[
    Optional[str],
    typer.Option("--dataset", help="Training data from a Hub dataset: HUB_ID[:CONFIG][@SPLIT]."),
]
FilterOpt = Annotated[
    Optional[list[str]], typer.Option("--filter", help="Keep dataset rows where FIELD=VALUE (repeatable).")
]
InputFieldOpt = Annotated[Optional[str], typer.Option("--input-field", help="Dataset field with the input text.")]
TargetFieldOpt = Annotated[Optional[str], typer.Option("--target-field", help="Dataset field with the target text.")]
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
