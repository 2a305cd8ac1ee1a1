"""`lorahub retriever …`: train the card embedder on the registry's adapters (LoraRetriever)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from ..settings import LORARETRIEVER_INSTRUCTION, RETRIEVER
from ._options import BaseModelOpt, EmbedderOpt, JsonOpt
from ._output import info, out, print_json, progress

app = typer.Typer(
    help="Train a retriever: the card embedder fine-tuned to tell adapters' tasks apart.", no_args_is_help=True
)


@app.command(
    epilog="""Examples:\n
  lorahub retriever train --out my-retriever\n
  lorahub retriever train --tasks-fraction 0.4 --epochs 2 --out my-retriever --json\n
  lorahub card build sentiment --data train.jsonl --inputs-only --embedder my-retriever \\\n
    --instruction "Represent the sentence for similar task retrieval: \""""
)
def train(
    out_dir: Annotated[
        Path, typer.Option("--out", "-o", help="Folder for the trained embedder (sentence-transformers format).")
    ],
    tasks_fraction: Annotated[
        float, typer.Option("--tasks-fraction", help="Share of adapters to train on; the rest are held out.")
    ] = RETRIEVER["tasks_fraction"],
    epochs: Annotated[
        int, typer.Option("--epochs", min=1, help="Passes over the training adapters' examples.")
    ] = RETRIEVER["epochs"],
    batch_size: Annotated[
        int, typer.Option("--batch-size", min=2, help="Adapters per step (in-batch negatives).")
    ] = RETRIEVER["batch_size"],
    lr: Annotated[float, typer.Option("--lr", help="AdamW learning rate (linear warm-up and decay).")] = RETRIEVER[
        "learning_rate"
    ],
    max_examples: Annotated[
        int, typer.Option("--max-examples", min=2, help="Examples read per adapter from its card's data.")
    ] = RETRIEVER["max_examples"],
    eval_queries: Annotated[
        int, typer.Option("--eval-queries", min=1, help="Queries per held-out adapter.")
    ] = RETRIEVER["eval_queries"],
    instruction: Annotated[
        str, typer.Option("--instruction", help="Prefix of every text; use the one your cards use.")
    ] = LORARETRIEVER_INSTRUCTION,
    seed: Annotated[
        int, typer.Option("--seed", help="Seed of the split, the pairs and the initialisation.")
    ] = RETRIEVER["seed"],
    base_model: BaseModelOpt = None,
    embedder: EmbedderOpt = None,
    json_: JsonOpt = False,
) -> None:
    """Fine-tune the embedder contrastively on some adapters' training data; report retrieval of the held-out ones."""
    from .. import api
    from ..retriever.train import RetrieverConfig

    config = RetrieverConfig(
        tasks_fraction=tasks_fraction,
        epochs=epochs,
        batch_size=batch_size,
        learning_rate=lr,
        max_examples=max_examples,
        eval_queries=eval_queries,
        instruction=instruction,
        seed=seed,
    )
    report = api.train_retriever(out_dir, config, base_model=base_model, embedder=embedder, progress_factory=progress)
    if json_:
        print_json(report)
        return
    table = Table(
        title=f"Retrieval of {len(report['held_out_adapters'])} held-out adapters "
        f"({report['untuned']['queries']} queries, "
        f"among all {len(report['train_adapters']) + len(report['held_out_adapters'])})",
        title_justify="left",
    )
    for column in ("embedder", "top-1", "top-3"):
        table.add_column(column, justify="left" if column == "embedder" else "right")
    table.add_row("untuned", f"{report['untuned']['top1']:.3f}", f"{report['untuned']['top3']:.3f}")
    table.add_row("tuned", f"{report['tuned']['top1']:.3f}", f"{report['tuned']['top3']:.3f}")
    out.print(table)
    info(
        f"Saved to {report['out']}. Rebuild cards with it: lorahub card build ID --embedder {report['out']} --data ..."
    )
