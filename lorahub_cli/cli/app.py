"""The root `lorahub` command: assembles the command groups and turns errors into one-line messages."""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from .. import __version__
from ..errors import LorahubError
from ..settings import debug
from ._output import err

HELP = """\
Find, compose, evaluate and publish LoRA adapters for a new task from a handful of examples.

Getting started: mirror adapters into your local registry with embedding cards,
then ask which ones fit your examples.

    lorahub registry add ./my-adapter --data train.jsonl
    lorahub registry sync --catalog lorahub-flan-t5-large --cards
    lorahub retrieve --shots examples.jsonl -k 20

`lorahub walkthrough` runs all of this offline on adapters shipped with lorahub.
State lives under $LORAHUB_HOME (see `lorahub registry path`); set LORAHUB_DEBUG=1 for tracebacks.
"""

app = typer.Typer(
    name="lorahub",
    help=HELP,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode="markdown",
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        print(f"lorahub {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    version: Annotated[
        bool | None, typer.Option("--version", callback=_version, is_eager=True, help="Show the version.")
    ] = None,
) -> None:
    pass


def _register() -> None:
    from . import card, compose, demo, eval, generate, push, registry, retrieve, retriever, serve, walkthrough

    app.add_typer(registry.app, name="registry")
    app.add_typer(card.app, name="card")
    app.add_typer(retriever.app, name="retriever")
    app.command("retrieve", epilog=retrieve.EXAMPLES)(retrieve.retrieve)
    app.command("compose", epilog=compose.EXAMPLES)(compose.compose)
    app.add_typer(eval.app, name="eval")
    app.command("generate", epilog=generate.EXAMPLES)(generate.generate)
    app.command("serve", epilog=serve.EXAMPLES)(serve.serve)
    app.command("push", epilog=push.EXAMPLES)(push.push)
    app.command("walkthrough", epilog=walkthrough.EXAMPLES)(walkthrough.walkthrough)
    app.command("demo", epilog=demo.EXAMPLES)(demo.demo)


_register()


def _usage_errors() -> tuple[type[Exception], ...]:
    """What Typer raises for a usage error: Typer >= 0.24 its own vendored Click exceptions (TyperException),
    older Typer Click's (ClickException); Click itself may not be installed with a new Typer."""
    kinds: list[type[Exception]] = [typer.TyperException] if hasattr(typer, "TyperException") else []
    try:
        import click
    except ImportError:
        return tuple(kinds)
    return (*kinds, click.exceptions.ClickException)


def _number_message(error) -> str | None:
    """Typer checks numbers with pydantic, whose wording ("Input should be less than or equal to 65535") names
    neither the value given nor, for a malformed one, the form wanted: this says both (None: not such an error)."""
    param, details = getattr(error, "param", None), getattr(error.__cause__, "errors", None)
    annotation = getattr(getattr(param, "type_descriptor", None), "annotation", None)
    if details is None or annotation not in (int, float):
        return None
    value = str(details()[0].get("input"))
    low, high = getattr(param, "min", None), getattr(param, "max", None)
    allowed = "a whole number" if annotation is int else "a number"
    if low is not None and high is not None:
        allowed += f" from {low} to {high}"
    elif low is not None:
        allowed += f" of {low} or more"
    elif high is not None:
        allowed += f" of {high} at most"
    message = f"'{value}' is not {allowed}"
    try:
        number = float(value)
    except ValueError:
        return message + "."
    if annotation is int and number.is_integer() and str(int(number)) != value.strip():
        message += f" (write it as {int(number)})"  # 1e3, 40.0: a whole number in another form
    return message + "."


def main() -> None:
    """Console entry point: a LorahubError is one line on stderr and a non-zero exit."""
    from ._scale import optional_address

    try:
        code = app(args=optional_address(sys.argv[1:]), prog_name="lorahub", standalone_mode=False)
    except LorahubError as error:
        if debug():
            raise
        # One unwrapped line, so that scripts and people can both read it.
        sys.stderr.write(f"Error: {error}\n")
        sys.exit(error.exit_code)
    except (KeyboardInterrupt, typer.Abort):
        err.print("Interrupted.")
        sys.exit(130)
    except _usage_errors() as error:
        # Click's usual message: usage, a help hint and "Error: ..."; exit 2 for a usage error.
        if (message := _number_message(error)) is not None:
            error.message = message
        show = getattr(error, "show", None)
        if show is not None:
            show()
        else:
            sys.stderr.write(f"Error: {error.format_message()}\n")
        sys.exit(error.exit_code)
    except Exception as error:  # noqa: BLE001 - the last line of defence before a traceback
        if debug():
            raise
        sys.stderr.write(
            f"Internal error: {type(error).__name__}: {error}\n"
            "  Re-run with LORAHUB_DEBUG=1 for a traceback, and please report it.\n"
        )
        sys.exit(1)
    if code == 130:
        # Typer turns Ctrl-C inside a command into a return value of 130, silently.
        err.print("Interrupted.")
    sys.exit(code if isinstance(code, int) else 0)
