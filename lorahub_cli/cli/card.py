"""`lorahub card …`: build and inspect embedding cards."""

from __future__ import annotations

from typing import Annotated

import typer

from ..api import open_store
from ._options import JsonOpt, card_options, with_options_of
from ._output import info, out, print_json, progress

app = typer.Typer(help="Build and inspect adapters' embedding cards.", no_args_is_help=True)


@app.command(
    epilog="""Examples:\n
  lorahub card build sentiment --data train.jsonl\n
  lorahub card build lorahub/flan_t5_large-ag_news_subset --dataset lorahub/flanv2 --filter task=ag_news_subset\n
  lorahub card build sentiment --data train.jsonl --inputs-only \\\n
    --instruction "Represent the sentence for similar task retrieval: \""""
)
@with_options_of(card_options, before="json_")
def build(adapter_id: Annotated[str, typer.Argument(help="Registry id.")], json_: JsonOpt = False, **card_data) -> None:
    """Build (or rebuild) an adapter's card from its training data."""
    from ..registry.cards import card_from_source

    options = card_options(**card_data)
    record, card = card_from_source(open_store(), adapter_id, options, progress_factory=None if json_ else progress)
    if json_:
        print_json({"id": record.id, **card.metadata()})
    else:
        info(f"Card for [bold]{record.id}[/bold]: {card.n_examples} examples, {card.dim}-d, {card.embedder_key}.")


@app.command(epilog="Examples:\n\n  lorahub card show sentiment\n\n  lorahub card show sentiment --json")
def show(adapter_id: Annotated[str, typer.Argument(help="Registry id.")], json_: JsonOpt = False) -> None:
    """Show an adapter's card: embedder, recipe, size and its most central training examples."""
    from ..cards.card import Card

    record = open_store(readonly=True).get(adapter_id)
    card = Card.load(record.path, record.id)
    if json_:
        print_json({"id": record.id, **card.metadata()})
        return
    meta = card.metadata()
    out.print(f"[bold]{record.id}[/bold]")
    out.print(f"embedder: {card.embedder_key} ({card.dim}-d)", markup=False)
    out.print(
        f"examples: {card.n_examples} (kept {meta['example_embeddings']} embeddings); recipe: {meta['recipe']}",
        markup=False,
    )
    out.print(f"source: {card.source}", markup=False)
    for example in card.nearest:
        out.print(f"  - {example['input'][:100]!r} -> {str(example['target'])[:60]!r}", markup=False)
