"""Options shared by several commands, declared once; their defaults live in settings.py."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Annotated

import typer

from ..settings import CARD_MAX_EXAMPLES

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


def with_options_of(template, *, before: str | None = None):
    """A command that also takes the options `template` (a function) declares, as **kwargs: after its own, or
    before its own option `before`. Typer reads a command's options from its signature; this is how commands
    share a block of them."""

    def give(command):
        own = inspect.signature(command, eval_str=True).parameters.values()
        own = [p for p in own if p.kind is not p.VAR_KEYWORD]
        at = [p.name for p in own].index(before) if before else len(own)
        shared = list(inspect.signature(template, eval_str=True).parameters.values())
        command.__signature__ = inspect.Signature([*own[:at], *shared, *own[at:]])
        return command

    return give


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

ByOpt = Annotated[
    str,
    typer.Option(
        "--by",
        help="What ranks an adapter: auto (its data card if it has one, else its weight card), data (data cards "
        "only) or weights (every adapter by its weights; loads the base model).",
    ),
]

# --- the base model and where it runs ---------------------------------------------------------------

ModelPathOpt = Annotated[
    str | None, typer.Option("--model-path", help="Load the base model from this folder or id instead of its name.")
]
DtypeOpt = Annotated[str, typer.Option("--dtype", help="auto (bfloat16 where fast), float32 or bfloat16.")]
DeviceOpt = Annotated[str, typer.Option("--device", help="auto, cpu, cuda or cuda:N.")]

# --- composing and generating ---------------------------------------------------------------------

NumModulesOpt = Annotated[int, typer.Option("-n", "--num-modules", min=1, help="Modules per composition.")]
BudgetOpt = Annotated[int, typer.Option("--budget", min=1, help="Loss evaluations per search.")]
OptimizerOpt = Annotated[
    str,
    typer.Option(
        "--optimizer",
        callback=registered("optimizer"),
        help=choice_help("optimizer", "The weight search (ngopt: LoraHub's; subspace: faster, stops when converged)."),
    ),
]
MaxNewTokensOpt = Annotated[
    int, typer.Option("--max-new-tokens", min=1, help="Most tokens generated per answer (greedy).")
]
GenerationBatchOpt = Annotated[int, typer.Option("--batch-size", min=1, help="Most inputs per forward pass.")]

# --- serving: `generate` and `serve` ----------------------------------------------------------------

KOpt = Annotated[int | None, typer.Option("-k", "--top-k", min=1, help="Adapters retrieved per request (default 3).")]
ComposeModeOpt = Annotated[
    str | None,
    typer.Option(
        "--compose",
        help="mixture (average of outputs, default), fusion (average of A and B), single (top-1), scored "
        "(outputs weighted by retrieval scores) or arrow (every token routed among all the adapters by their "
        "weight cards, PEFT's Arrow, top-k = -k).",
    ),
]
AdapterOpt = Annotated[
    str | None,
    typer.Option(
        "--adapter",
        help="Answer every input with this adapter: a `compose --out` folder, any PEFT LoRA folder, or a registry id.",
    ),
]
CompositionOpt = Annotated[
    Path | None,
    typer.Option(
        "--composition", help="A `compose --level instance` folder: each input goes to its nearest shot's composition."
    ),
]
MaxInputTokensOpt = Annotated[int, typer.Option("--max-input-tokens", min=1, help="Longest input accepted, in tokens.")]
BatchingOpt = Annotated[
    str,
    typer.Option(
        "--batching",
        help="continuous (requests join and leave between decoding steps) "
        "or static (whole batches, each until its longest answer is done).",
    ),
]

# --- an embedding card's training data (`registry add`, `card build`): cards/data.py:CardOptions -----

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
    typer.Option("--inputs-only", help="Embed inputs only (LoraRetriever's text recipe) instead of input + target."),
]
InstructionOpt = Annotated[
    str, typer.Option("--instruction", help="Text put before every input before embedding (with --inputs-only).")
]


def card_options(
    data: DataOpt = None,
    dataset: DatasetOpt = None,
    filters: FilterOpt = None,
    input_field: InputFieldOpt = None,
    target_field: TargetFieldOpt = None,
    max_examples: MaxExamplesOpt = CARD_MAX_EXAMPLES,
    embedder: EmbedderOpt = None,
    inputs_only: InputsOnlyOpt = False,
    instruction: InstructionOpt = "",
):
    """The options an embedding card is built from: `registry add` and `card build` take them with
    `with_options_of(card_options)` and make the checked cards.data.CardOptions with `card_options(**card)`."""
    from ..cards.data import CardOptions

    return CardOptions(
        data, dataset, filters, input_field, target_field, max_examples, embedder, inputs_only, instruction
    )
