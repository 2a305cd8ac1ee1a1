"""`lorahub registry …`: the local store of adapters."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from ..api import open_store
from ..errors import InputError, IntegrityError
from ..settings import CARD_MAX_EXAMPLES, SYNC_WORKERS, home
from ._options import BaseModelOpt, EmbedderOpt, JsonOpt, MaxExamplesOpt, card_options, with_options_of
from ._output import err, id_column, info, out, print_json, progress, short_path, table, warn

app = typer.Typer(
    help="Mirror, list and check the adapters in your local registry ($LORAHUB_HOME).",
    no_args_is_help=True,
)


@app.command(
    epilog="""Examples:\n
  lorahub registry add lorahub/flan_t5_large-ag_news_subset\n
  lorahub registry add ./my-adapter --name sentiment --data train.jsonl\n
  lorahub registry add lorahub/flan_t5_large-ag_news_subset --dataset lorahub/flanv2 --filter task=ag_news_subset"""
)
@with_options_of(card_options, before="force")
def add(
    source: Annotated[str, typer.Argument(help="A Hub repo id (NAMESPACE/NAME) or a local PEFT adapter folder.")],
    revision: Annotated[str | None, typer.Option("--revision", help="Branch, tag or commit (Hub only).")] = None,
    name: Annotated[str | None, typer.Option("--name", help="Registry id (default: repo id or folder name).")] = None,
    base_model: BaseModelOpt = None,
    force: Annotated[bool, typer.Option("--force", help="Mirror again even if this commit is stored.")] = False,
    replace: Annotated[
        bool, typer.Option("--replace", help="Replace an adapter of the same id from another source.")
    ] = False,
    json_: JsonOpt = False,
    **card_data,
) -> None:
    """Add one adapter from the Hub or a folder with its weight card; with --data or --dataset, build its
    embedding card too.

    All or nothing: the adapter appears in the registry only with everything asked for (its cards included)."""
    from .. import api

    card = None
    if card_data["data"] is not None or card_data["dataset"] is not None:
        card = card_options(**card_data)
    result = api.add(
        source,
        revision=revision,
        name=name,
        base_model=base_model,
        force=force,
        replace=replace,
        card=card,
        progress_factory=None if json_ else progress,
        warn=warn,
    )
    record = result.record
    if json_:
        print_json({**result.to_json(), "adapter": record.to_json()})
    else:
        where = f"@{record.revision[:12]}" if record.revision else ""
        card = "with card" if record.has_card else "no card"
        weights = "weight card" if record.has_weight_card else "no weight card"
        info(
            f"{result.status.capitalize()} [bold]{record.id}[/bold]{where} "
            f"({record.base_model}, r={record.r}, {card}, {weights})."
        )


def _summary(results) -> Table:
    """One row per adapter mirrored; failures that share a message (the id aside) share one row."""
    table = Table(title="Sync summary")
    for column in ("adapter", "status", "commit", "message"):
        table.add_column(column, overflow="fold")
    failures: dict[str, list[str]] = {}
    for result in results:
        if result.status == "failed":
            failures.setdefault(result.message.replace(result.id, "{id}"), []).append(result.id)
            continue
        colour = "dim" if result.status == "skipped" else "green"
        table.add_row(result.id, f"[{colour}]{result.status}[/{colour}]", (result.revision or "")[:12], result.message)
    for message, ids in failures.items():
        shown = ", ".join(ids[:3]) + (f" and {len(ids) - 3} more" if len(ids) > 3 else "")
        table.add_row(shown, f"[red]failed ×{len(ids)}[/red]" if len(ids) > 1 else "[red]failed[/red]", "", message)
    return table


@app.command(
    epilog="""Examples:\n
  lorahub registry sync --catalog lorahub-flan-t5-large\n
  lorahub registry sync --catalog lorahub-flan-t5-large --cards\n
  lorahub registry sync --author lorahub --search flan_t5_large"""
)
def sync(
    catalog: Annotated[
        str | None, typer.Option("--catalog", help="A shipped catalogue name or a catalogue JSON file.")
    ] = None,
    author: Annotated[
        str | None, typer.Option("--author", help="Mirror every model repo of this Hub user or org.")
    ] = None,
    search: Annotated[
        str | None, typer.Option("--search", help="With --author: only repos whose id contains this.")
    ] = None,
    cards: Annotated[
        bool, typer.Option("--cards", help="Also build cards from the catalogue's training dataset.")
    ] = False,
    base_model: BaseModelOpt = None,
    workers: Annotated[int, typer.Option("--workers", min=1, max=32, help="Parallel downloads.")] = SYNC_WORKERS,
    max_examples: MaxExamplesOpt = CARD_MAX_EXAMPLES,
    embedder: EmbedderOpt = None,
    json_: JsonOpt = False,
) -> None:
    """Mirror many adapters in parallel.

    Re-running skips what is stored at the same commit; failures do not stop the rest."""
    from .. import api
    from ..registry.catalog import Catalog, list_author

    if (catalog is None) == (author is None):
        raise InputError("give exactly one of --catalog NAME or --author ORG.", "See: lorahub registry sync --help")
    if search and not author:
        raise InputError("--search goes with --author.", "Example: lorahub registry sync --author lorahub --search t5")
    store = open_store()
    loaded = Catalog.load(catalog) if catalog else None
    entries = loaded.entries if loaded else list_author(author, search)
    results = api.sync(
        store,
        entries,
        base_model=base_model or (loaded.base_model if loaded else None),
        workers=workers,
        catalog=loaded,
        cards=cards,
        max_examples=max_examples,
        embedder=embedder,
        progress_factory=progress,
        warn=warn,
    )
    failed = sum(r.status == "failed" for r in results)
    if json_:
        print_json({"results": [r.to_json() for r in results], "failed": failed})
    else:
        err.print(_summary(results))
        counts = {s: sum(r.status == s for r in results) for s in ("added", "updated", "skipped", "failed")}
        info(", ".join(f"{n} {s}" for s, n in counts.items()))
    if failed:
        raise typer.Exit(1)


CARDS = {(True, True): "both", (True, False): "data", (False, True): "weights", (False, False): "-"}


def _list_table(records) -> Table:
    """The registry at 80 columns: ids whole, one base model in the title when all share it, sources shortened
    (`registry list --json` has them whole)."""
    bases = sorted({r.base_model for r in records})
    shown = lambda base: short_path(base) if Path(base).is_absolute() else base  # noqa: E731
    listed = table(f"{len(records)} adapters for {shown(bases[0])}" if len(bases) == 1 else None)
    id_column(listed, "id", [r.id for r in records])
    if len(bases) > 1:
        listed.add_column("base model", overflow="fold")
    for column in ("r", "alpha", "targets"):
        listed.add_column(column, justify="left" if column == "targets" else "right", overflow="fold")
    listed.add_column("source", no_wrap=True, overflow="ellipsis")
    listed.add_column("cards")  # data (an embedding card), weights (a weight card), both or -
    for r in records:
        source = short_path(r.source, 26) if Path(r.source).is_absolute() else r.source
        listed.add_row(
            r.id,
            *([shown(r.base_model)] if len(bases) > 1 else []),
            str(r.r),
            f"{r.lora_alpha:g}",
            ",".join(r.target_modules),
            f"{source}@{r.revision[:8]}" if r.revision else source,
            CARDS[(r.has_card, r.has_weight_card)],
        )
    return listed


@app.command(
    "list",
    epilog="""Examples:\n
  lorahub registry list\n
  lorahub registry list --base-model google/flan-t5-large --json""",
)
def list_(base_model: BaseModelOpt = None, json_: JsonOpt = False) -> None:
    """List the adapters in the registry."""
    records = open_store(readonly=True).list(base_model)
    if json_:
        print_json([r.to_json() for r in records])
        return
    if not records:
        info("The registry is empty. Add adapters with: lorahub registry add SOURCE")
        return
    out.print(_list_table(records))


@app.command(epilog="Examples:\n\n  lorahub registry show lorahub/flan_t5_large-ag_news_subset --json")
def show(adapter_id: Annotated[str, typer.Argument(help="Registry id.")], json_: JsonOpt = False) -> None:
    """Show everything the registry knows about one adapter."""
    record = open_store(readonly=True).get(adapter_id)
    if json_:
        print_json(record.to_json())
        return
    for key, value in record.to_json().items():
        out.print(f"[bold]{key}[/bold]: {value}", highlight=False, markup=True)


@app.command(epilog="Examples:\n\n  lorahub registry remove my-adapter --yes")
def remove(
    adapter_id: Annotated[str, typer.Argument(help="Registry id.")],
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Really delete it.")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Only say what would be deleted.")] = False,
) -> None:
    """Delete an adapter and its card from the registry."""
    store = open_store()
    record = store.get(adapter_id)
    if dry_run:
        info(f"Would delete {record.id} ({record.path}).")
        return
    if not yes:
        raise InputError(
            f"removing '{adapter_id}' deletes its files.", "Confirm with --yes (or look first with --dry-run)."
        )
    store.remove(adapter_id)
    info(f"Removed {adapter_id}.")


LEFTOVER_TEXT = {
    "staging": "staging folder(s) of interrupted adds",
    "superseded": "superseded version(s) left by interrupted replacements",
    "unindexed": "stored adapter(s) missing from the index (restore them with: lorahub registry rebuild)",
    "foreign": "folder(s) or link(s) in the registry's content that lorahub did not store (left alone; move them out)",
}


@app.command(epilog="Examples:\n\n  lorahub registry verify\n\n  lorahub registry verify --prune --json")
def verify(
    prune: Annotated[
        bool, typer.Option("--prune", help="Delete staging folders of interrupted adds and superseded versions.")
    ] = False,
    json_: JsonOpt = False,
) -> None:
    """Re-hash every stored file, check the weights and every weight card against its adapter; exits non-zero if
    any is missing, corrupted, stale or not finite.

    Index rows that name folders or files outside their adapter's folder are reported and never used. Stored
    adapters missing from the index are reported, never deleted: `lorahub registry rebuild` restores them (and
    makes missing or stale weight cards)."""
    from .. import api
    from ..registry.store import WEIGHT_CARD

    store = open_store(readonly=not prune)  # a home that cannot be opened fails before the progress bar starts
    with progress("Verifying", None):
        report = api.verify_registry(prune=prune, store=store)
    problems, leftovers = report["problems"], report["leftovers"]
    if json_:
        print_json(
            {
                "ok": not problems,
                "problems": problems,
                "pruned": prune,
                "leftovers": [{"path": str(item["path"]), "kind": item["kind"]} for item in leftovers],
                "without_weight_card": report["without_weight_card"],
            }
        )
    else:
        for p in problems:
            where = escape(str(p["id"])) + (f": {escape(p['file'])}" if p["file"] is not None else "")
            err.print(f"[red]{where}[/red]: {escape(p['problem'])}")
        for kind, text in LEFTOVER_TEXT.items():
            if count := sum(item["kind"] == kind for item in leftovers):
                prunable = kind in ("staging", "superseded")
                info(
                    f"{count} {text}" + ((" pruned." if prune else "; remove them with --prune.") if prunable else ".")
                )
        if missing := len(report["without_weight_card"]):
            info(
                f"{missing} adapter(s) have no weight card yet "
                "(made when first ranked by weights, or by: lorahub registry rebuild)."
            )
        info(f"{report['adapters']} adapters checked, {len(problems)} problem(s).")
    if problems:
        rows = sum(p["file"] is None for p in problems)
        cards = sum(p["file"] == WEIGHT_CARD for p in problems)
        files = len(problems) - rows - cards
        found = [f"{files} stored file(s) are missing or corrupted"] if files else []
        found += [f"{cards} weight card(s) are damaged or stale"] if cards else []
        found += [f"{rows} index row(s) cannot be trusted"] if rows else []
        hints = ["Re-add the adapters listed above with: lorahub registry add SOURCE --force"] if files else []
        hints += ["make the weight cards again with: lorahub registry rebuild"] if cards else []
        hints += ["drop the untrusted rows with: lorahub registry rebuild"] if rows else []
        raise IntegrityError(" and ".join(found) + ".", "; ".join(hints))


@app.command(epilog="Examples:\n\n  lorahub registry rebuild")
def rebuild(json_: JsonOpt = False) -> None:
    """Rebuild the index (registry.sqlite) from the stored adapter folders, keeping the old index aside, and make
    every missing, damaged or stale weight card again.

    Use it when the index is missing or damaged, or a weight card is; run it while no other lorahub uses this
    registry. Folders that lorahub did not store, or whose metadata fails its checks, are reported and left
    alone (exit 1)."""
    from .. import api

    report = api.rebuild_registry(progress_factory=None if json_ else progress)
    records, kept, skipped, cards = report["records"], report["old_index"], report["skipped"], report["weight_cards"]
    if json_:
        print_json(
            {
                "indexed": [r.id for r in records],
                "old_index": str(kept) if kept else None,
                "skipped": [{"path": str(item["path"]), "problem": item["problem"]} for item in skipped],
                "weight_cards": cards,
            }
        )
    else:
        for item in skipped:
            warn(escape(f"not indexed: {item['path']} {item['problem']}."))
        for item in cards["failed"]:
            warn(escape(f"{item['id']}: no weight card: {item['problem']}"))
        if kept:
            info(f"The old index was kept as {kept}.")
        info(
            f"Indexed {len(records)} adapter(s) from {home() / 'adapters'}; made {len(cards['built'])} weight card(s)."
        )
    if skipped:
        if json_:
            raise typer.Exit(1)
        raise IntegrityError(
            f"{len(skipped)} folder(s) in {home() / 'adapters'} were not indexed (listed above); left as they are.",
            "Move them out of the registry's adapters folder; re-add real adapters with: lorahub registry add SOURCE",
        )


@app.command(epilog="Examples:\n\n  lorahub registry path")
def path() -> None:
    """Print the registry's home folder (set it with LORAHUB_HOME)."""
    print(home())
