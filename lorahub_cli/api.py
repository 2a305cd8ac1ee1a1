"""The Python API behind every command: the one module that combines the registry, retrieval,
models, composition and evaluation.

    from lorahub_cli import api
    summary = api.compose(Path("shots.jsonl"), Path("my-lora"), ComposeOptions(num_modules=20))  # compose.pipeline

The module imports nothing heavy at load time, so the CLI can import it for every command.
Each `lorahub` command parses its options, makes one call here and prints what it returns.
`progress_factory(description, total)` is the optional progress display (a context manager
that yields `advance`); without it everything runs silently.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import InputError
from .quiet import no_progress
from .settings import CARD_MAX_EXAMPLES, DEFAULT_TOP_K, DEMO, SYNC_WORKERS, WEIGHTS, home

# --- registries ----------------------------------------------------------------------------------


def _weight_card(folder: Path, adapter_id: str, weights_sha256: str) -> dict[str, str]:
    """Every add's weight card (registry/store.py: `Store.weight_card`), imported only when an add runs."""
    from .spectral.card import write_weight_card

    return write_weight_card(folder, adapter_id, weights_sha256)


def open_store(readonly: bool = False):
    """The user's registry, in $LORAHUB_HOME; `readonly` for commands that only read (they work on a read-only home).
    Every adapter added through it gets its weight card."""
    from .registry import Store

    return Store(home(), readonly=readonly, weight_card=_weight_card)


@contextmanager
def scratch_store(prefix: str, keep: Path | None = None) -> Iterator:
    """A registry in `keep`, or in a temporary folder that is removed afterwards (the demos' registries)."""
    from .registry import Store

    folder = keep or Path(tempfile.mkdtemp(prefix=prefix))
    try:
        yield Store(folder, weight_card=_weight_card)
    finally:
        if keep is None:
            shutil.rmtree(folder, ignore_errors=True)


def add(
    source: str,
    *,
    revision: str | None = None,
    name: str | None = None,
    base_model: str | None = None,
    force: bool = False,
    replace: bool = False,
    card=None,
    store=None,
    progress_factory=None,
    warn=None,
):
    """Add one adapter from the Hub or a folder, with its weight card and, given `card` (a cards.data.CardOptions),
    its embedding card: all or nothing. Returns the registry.mirror.MirrorResult."""
    from .registry.cards import prepare_card
    from .registry.mirror import add_hub, add_local, is_local_source

    store = store or open_store()
    local = is_local_source(source)
    if local and revision:
        raise InputError("--revision applies to Hub repos only.", f"Drop it, or check that '{source}' is a repo id.")
    card_job = None if card is None else prepare_card(card, progress_factory=progress_factory)
    options = {"name": name, "base_model": base_model, "replace": replace, "card_job": card_job}
    if warn is not None:
        options["warn"] = warn
    if local:
        return add_local(store, Path(source), **options)
    return add_hub(store, source, revision=revision, force=force, **options)


def sync(
    store,
    entries,
    *,
    base_model: str | None = None,
    workers: int = SYNC_WORKERS,
    catalog=None,
    cards: bool = False,
    max_examples: int = CARD_MAX_EXAMPLES,
    embedder: str | None = None,
    progress_factory=None,
    warn=None,
) -> list:
    """Mirror catalogue or author `entries` into `store`; with `cards`, build the missing cards from the
    catalogue's training dataset. Returns one MirrorResult per entry; an adapter whose card failed is a failure."""
    from huggingface_hub.utils import disable_progress_bars

    from .cards.data import CardOptions
    from .registry.cards import card_from_source
    from .registry.catalog import sync as sync_entries

    stage = progress_factory or no_progress
    if cards and not (catalog and catalog.dataset):
        raise InputError(
            "--cards needs a catalogue that names a training dataset.",
            "Build cards with: lorahub card build ID --dataset ...",
        )
    disable_progress_bars()  # lorahub's bar is the one progress display; the client's would interleave with it
    with stage(f"Mirroring {len(entries)} adapters", len(entries)) as advance:
        results = sync_entries(
            store, entries, base_model=base_model, workers=workers, on_result=lambda r: advance(), warn=warn
        )
    if cards:
        tasks = {e.repo_id: e.task for e in entries if e.task}
        todo = [r for r in results if r.status != "failed" and tasks.get(r.id) and not (r.record and r.record.has_card)]
        with stage(f"Building {len(todo)} cards", len(todo)) as advance:
            for result in todo:
                try:
                    source = CardOptions(
                        dataset=catalog.dataset,
                        filters=[f"{catalog.task_field}={tasks[result.id]}"],
                        max_examples=max_examples,
                        embedder=embedder,
                    )
                    card_from_source(store, result.id, source)
                    result.message = "card built"
                except Exception as error:  # noqa: BLE001 - one card failing must not end the sync
                    # The adapter is stored, but the sync did not do what was asked: a failure.
                    result.status, result.message = "failed", f"mirrored, but its card failed: {error}"
                advance()
    return results


def verify_registry(prune: bool = False, store=None) -> dict:
    """`registry verify`: every stored file re-hashed and the weights checked finite (registry/store.py), and
    every weight card checked against its adapter's weights. Returns {"problems", "leftovers", "adapters",
    "without_weight_card"}; a problem is {"id", "file", "problem"}."""
    from .registry.store import SAFETENSORS_FILE, WEIGHT_CARD
    from .spectral.library import card_problem

    store = store or open_store(readonly=not prune)
    problems, leftovers = store.verify(prune=prune)
    hashed_wrong = {p["id"] for p in problems if p["file"] in (WEIGHT_CARD, SAFETENSORS_FILE)}
    records, _ = store.trusted()
    for record in records:
        if record.has_weight_card and record.id not in hashed_wrong and (problem := card_problem(record)):
            problems.append({"id": record.id, "file": WEIGHT_CARD, "problem": problem})
    return {
        "problems": problems,
        "leftovers": leftovers,
        "adapters": len(records),
        "without_weight_card": [r.id for r in records if not r.has_weight_card],
    }


def rebuild_registry(progress_factory=None) -> dict:
    """`registry rebuild`: the index re-created from the stored folders (registry/store.py), then every indexed
    adapter's weight card made where it is missing, damaged, stale or of an older format (temp file, then
    rename). Returns {"records", "old_index", "skipped", "weight_cards": {"built", "failed"}}."""
    from .registry import Store
    from .spectral.library import ensure_cards

    records, kept, skipped = Store.for_rebuild(home()).rebuild()
    store = open_store()
    with (progress_factory or no_progress)("Checking weight cards", len(records)) as advance:
        records, built, failed = ensure_cards(store, records, progress=advance)
    return {
        "records": records,
        "old_index": kept,
        "skipped": skipped,
        "weight_cards": {"built": built, "failed": failed},
    }


# --- retrieve ------------------------------------------------------------------------------------


def retrieve(
    *,
    shots: Path | None = None,
    query: str | None = None,
    inputs: Path | None = None,
    k: int = DEFAULT_TOP_K,
    level: str = "task",
    base_model: str | None = None,
    embedder: str | None = None,
    by: str = WEIGHTS["by"],
    model_path: str | None = None,
    device: str = "auto",
    store=None,
):
    """The registry's adapters ranked against `shots` (task level, or per shot with `level="instance"`, which
    also routes `inputs` to their nearest shot), one `query` text, or each of `inputs` on its own, by their data
    cards, their weight cards or both (`by`; weight cards are scored on the base model, loaded in float32 from
    `model_path` or its name); returns a retrieval.Ranking (`to_json()` is what `retrieve --json` prints)."""
    from .compose.recipe import check_level
    from .io import read_examples
    from .retrieval import check_by

    check_level(level)
    check_by(by)
    if (shots is not None) + (query is not None) + (inputs is not None and shots is None) != 1:
        raise InputError(
            "give --shots FILE, --query TEXT or --inputs FILE (with --shots only for --level instance).",
            "See: lorahub retrieve --help",
        )
    if query is not None and not query.strip():
        raise InputError("--query is empty.", "Give some text to match.")
    if inputs is not None and shots is not None and level != "instance":
        raise InputError(
            "--inputs with --shots routes inputs to shots, which needs --level instance.", "Add --level instance."
        )
    examples = read_examples(shots) if shots is not None else None  # a bad line fails before any model loads
    routed = read_examples(inputs, require_target=False) if inputs is not None else None
    retriever = retriever_of(store or open_store(readonly=True), by, base_model, embedder, model_path, device)
    if examples is not None:
        return retriever.task(examples, k) if level == "task" else retriever.instance(examples, k, routed)
    if query is not None:
        return retriever.query(query, k)
    return retriever.per_input(routed, k)


def retriever_of(store, by: str, base_model=None, embedder=None, model_path=None, device="auto", base=None):
    """The retrieval.Retriever of `store` (see `retrieve`); `base`: a loaded base model to score weight cards on
    (its float32 copy is used) instead of loading one."""
    from .retrieval import Retriever

    def load(name: str):
        if base is not None:
            return base.fp32()
        from .models import load_base_model

        return load_base_model(model_path or name, dtype="float32", device=device)

    return Retriever.from_store(store, by, base_model, embedder, load)


# --- compose -------------------------------------------------------------------------------------


def compose(
    shots: Path,
    out: Path,
    options,
    *,
    level: str = "task",
    overwrite: bool = False,
    store=None,
    progress_factory=None,
    base=None,
) -> dict:
    """Compose registry adapters for the task `shots` shows and write them to `out`; returns the summary.

    `options`: a compose.pipeline.ComposeOptions (imported there: this module loads torch only when called).

    `base`: a loaded base model to use (and leave unchanged) instead of loading one."""
    from .compose import pipeline
    from .compose.folder import check_destination, write_composition
    from .compose.recipe import check_level
    from .io import read_examples, sha256_file

    check_level(level)
    check_destination(out, overwrite, inputs=(shots,))  # before any work: nothing is lost to a late refusal
    store = store or open_store()
    start = time.perf_counter()
    examples = read_examples(shots)
    shots_meta = {"path": str(shots), "sha256": sha256_file(shots), "count": len(examples)}
    run = pipeline.compose_instance if level == "instance" else pipeline.compose_task
    searches = len(examples) + options.warm_start if level == "instance" else 1
    with (progress_factory or no_progress)("Searching weights", options.search.budget * searches) as advance:
        composition = run(
            store,
            examples,
            shots_meta,
            options,
            base=base,
            progress=lambda best: advance(description=f"Searching weights (best {best:.4f})"),
        )
    folder = write_composition(out, composition.recipe, composition.adapters, composition.router, overwrite=overwrite)
    summary = _summary(
        folder, composition.recipe, sum(r.evaluations for r in composition.results if r), time.perf_counter() - start
    )
    summary["shots"], summary["base_loss"] = len(examples), composition.base_loss
    summary["next"] = next_commands(out, composition.recipe.level)
    return summary


def _summary(folder: Path, recipe, evaluations: int | None = None, seconds: float | None = None) -> dict:
    """What `compose` returns for the composition in `folder`: its modules with their weights, largest |w| first
    (and their score, when retrieval chose them: `by` says whose, data cards' cosines, weight scores or the
    z-scores of both), the fp32 few-shot loss, and how the search ran
    (`search`: optimiser, engine, evaluations, budget, and why it stopped where the recipe records it)."""
    summary = {"out": str(folder)}
    if recipe.level == "instance":
        summary["level"] = "instance"
    else:
        summary.update(weights=recipe.weights, loss=recipe.loss, modules=_ranked(recipe.modules, recipe.selection))
        summary["search"] = _search(recipe.search)
    if recipe.selection.get("method") == "auto":
        summary["by"] = recipe.selection.get("by", "data")  # what the modules' scores are: data | weights | mixed
    if evaluations is not None:
        summary["evaluations"] = evaluations
    if seconds is not None:
        summary["seconds"] = round(seconds, 3)
    if recipe.level == "instance":
        summary["compositions"] = [
            {
                "shot": c["shot"],
                "weights": {m["id"]: m["weight"] for m in c["modules"]},
                "loss": c["loss"],
                "modules": _ranked(c["modules"], {}),
                "search": _search(c["search"]),
            }
            for c in recipe.compositions
        ]
    return summary


def _ranked(modules: list[dict], selection: dict) -> list[dict]:
    """{id, weight[, score]} of each module, largest |w| first."""
    scores = selection.get("scores") or {}
    rows = [
        {"id": m["id"], "weight": m["weight"]} | ({"score": scores[m["id"]]} if m["id"] in scores else {})
        for m in modules
    ]
    return sorted(rows, key=lambda row: -abs(row["weight"]))


def _search(entry: dict | None) -> dict | None:
    """How a recipe's search ran; `stop` (why it ended) is None in recipes that do not record it."""
    if entry is None:
        return None
    keys = ("optimizer", "engine", "evaluations", "budget", "seconds")
    return {key: entry.get(key) for key in keys} | {"stop": entry.get("stop")}


def next_commands(out: Path, level: str = "task") -> list[str]:
    """What to run next with the composition written to `out` (the path as the user gave it): answer with it,
    and publish it."""
    from shlex import quote

    folder = quote(str(out))
    option = "--adapter" if level == "task" else "--composition"
    return [f"lorahub generate {option} {folder} --inputs requests.jsonl", f"lorahub push {folder} --repo YOU/NAME"]


def compose_batch(
    tasks_dir: Path,
    out: Path,
    options,
    *,
    level: str = "task",
    overwrite: bool = False,
    store=None,
    ray=None,
    progress_factory=None,
    on_event=None,
) -> list[dict]:
    """`compose` for every shots file `tasks_dir/<name>.jsonl`, into `out/<name>/`: here, one after the other on
    one loaded model, or on Ray actors (`ray`: a scale.cluster.RayOptions) while this process writes every folder.

    Resumable: a folder that holds a lorahub recipe is kept (`overwrite` composes it again); any other existing
    folder is left alone and its task fails. Returns one row per file, in file order: {"task", "status"
    (composed, done earlier, failed), and `compose`'s summary or "error"}; a failed task does not stop the others."""
    from .compose.folder import read_composition, write_composition
    from .compose.recipe import check_level
    from .errors import LorahubError
    from .scale import batch

    check_level(level)
    store = store or open_store()
    jobs, done, refused = batch.plan(tasks_dir, out, overwrite)  # every destination checked, before any work
    rows = {
        name: {"task": name, "status": "done earlier", **_summary(out / name, read_composition(out / name))}
        for name in done
    }
    failed = lambda name, error: {"task": name, "status": "failed", "out": str(out / name), "error": error}  # noqa: E731
    rows.update({name: failed(name, error) for name, error in refused.items()})
    with (progress_factory or no_progress)("Composing", len(jobs) + len(rows)) as advance:
        advance(len(rows))
        if not jobs:
            outcomes = []
        elif ray is None:
            outcomes = batch.here(store, jobs, options, level, batch.load_shared_base(store, options), advance)
        else:
            outcomes = batch.on_ray(ray, store, jobs, options, level, advance, on_event)
        for job, result, error in outcomes:
            if error is None:
                composition, seconds = result
                try:
                    folder = write_composition(
                        job.dest, composition.recipe, composition.adapters, composition.router, overwrite=overwrite
                    )
                except LorahubError as write_error:
                    error = str(write_error)
            if error is not None:
                rows[job.name] = failed(job.name, error)
                continue
            evaluations = sum(r.evaluations for r in composition.results if r)
            rows[job.name] = {
                "task": job.name,
                "status": "composed",
                **_summary(folder, composition.recipe, evaluations, seconds),
            }
    return [rows[name] for name in sorted(rows)]


def rebuild(recipe_path: Path, out: Path, *, overwrite: bool = False, store=None) -> dict:
    """The adapter a task-level recipe describes, rebuilt bit for bit from the registry into `out`."""
    from .compose import pipeline
    from .compose.folder import check_destination, write_composition
    from .compose.recipe import Recipe

    check_destination(out, overwrite, inputs=(recipe_path,))
    start = time.perf_counter()
    recipe = Recipe.load(recipe_path)
    adapter = pipeline.rebuild(store or open_store(), recipe)
    folder = write_composition(out, recipe, [adapter], overwrite=overwrite)
    return {
        "out": str(folder),
        "weights": recipe.weights,
        "loss": recipe.loss,
        "evaluations": 0,
        "seconds": round(time.perf_counter() - start, 3),
    }


# --- the retriever -------------------------------------------------------------------------------


def train_retriever(
    out: Path, config, *, base_model: str | None = None, embedder: str | None = None, store=None, progress_factory=None
) -> dict:
    """Fine-tune the card embedder on the registry's carded adapters and save it to `out` (LoraRetriever);
    `config`: a retriever.train.RetrieverConfig. Returns the report, held-out retrieval before and after."""
    from .outputs import check_destination
    from .retriever.train import train_retriever as train

    check_destination(out)  # before any work
    store = store or open_store()
    with (progress_factory or no_progress)("Training", None) as advance:
        return train(store, out, config, base_model=base_model, embedder=embedder, progress=advance)


# --- evaluate ------------------------------------------------------------------------------------


def evaluate(
    suite,
    methods: list[str],
    seeds: list[int],
    config,
    out: Path,
    *,
    store=None,
    title: str | None = None,
    progress_factory=None,
    ray=None,
    on_event=None,
) -> dict:
    """Run (or resume) every (task, seed, method) cell of `suite` into `out` and write the report (results.json,
    report.md, plot.png); returns the summary. `config`: an eval.methods.EvalConfig. The composing methods draw
    from `store`, else from the user's registry, checked before any model loads. With `ray` (a
    scale.cluster.RayOptions) the missing cells run on Ray actors (`on_event(kind, job, actor)` follows them);
    this process still writes every cell."""
    from .eval.runner import check_run_folder

    check_run_folder(out)  # before any work
    return _evaluate(suite, methods, seeds, config, out, store, title, progress_factory, ray, on_event)


def _evaluate(suite, methods, seeds, config, out, store, title, progress_factory, ray, on_event=None) -> dict:
    from .eval.methods import COMPOSING, Context
    from .eval.report import write_report
    from .eval.runner import run_grid

    if any(m in COMPOSING for m in methods):
        store = store or open_store()
        _check_registry(store, config)
    execute = None
    if ray is not None:
        from .scale.eval import ray_executor

        execute = ray_executor(ray, config, store, on_event=on_event)
    total = len(suite.tasks) * len(seeds) * len(methods)
    with (progress_factory or no_progress)("Evaluating", total) as advance:
        cells = run_grid(
            suite,
            methods,
            seeds,
            Context(config, store),
            out,
            advance=lambda d, step=1: advance(step, description=d),
            execute=execute,
        )
    setup = {
        "suite": suite.name,
        "base model": config.base_model,
        "model path": config.model_path,
        "shots": config.shots,
        "test limit": config.limit,
        "modules (N)": config.num_modules,
        "optimizer": config.optimizer,
        "budget": config.budget,
        "l1": config.l1,
        "max new tokens": config.max_new_tokens,
    }
    return write_report(out, title or f"{suite.name} evaluation", setup, cells, suite.notes, suite.tasks)


def _check_registry(store, config) -> None:
    """Fail before any model loads if the registry cannot serve the composing methods (the retrieving ones rank
    adapters without a data card by their weight cards, so every adapter can be ranked)."""
    candidates = store.list(config.base_model)
    if len(candidates) < config.num_modules:
        raise InputError(
            f"the registry has {len(candidates)} adapters for base model '{config.base_model}', "
            f"fewer than -n {config.num_modules}.",
            "Add adapters (lorahub registry sync --catalog ... --cards) or lower -n.",
        )


def evaluate_demo(
    tasks: str, methods: list[str], seeds: list[int], config, out: Path, *, progress_factory=None, ray=None
) -> dict:
    """`evaluate` on the demo library's held-out tasks, with its adapters mirrored into a temporary registry."""
    from dataclasses import replace

    from .demo import library
    from .eval.runner import check_run_folder
    from .models import torch_threads

    check_run_folder(out)  # before any work
    suite = library.load_suite().select(tasks)
    config = replace(
        config, base_model=library.BASE_MODEL, model_path=str(library.base_model_path()), dtype="float32", device="cpu"
    )
    with scratch_store("lorahub-eval-demo-") as store:
        with (progress_factory or no_progress)("Mirroring the demo adapters", len(library.upstream_tasks())) as advance:
            library.mirror(store, progress=advance)
        with torch_threads(library.THREADS):
            if ray is not None:  # as many threads per Ray worker as here: the demo model gains nothing from more
                ray = replace(ray, max_threads=library.THREADS)
            title = "Demo library: held-out tasks"
            return _evaluate(suite, methods, seeds, config, out, store, title, progress_factory, ray)


# --- the demo ------------------------------------------------------------------------------------


def demo(
    task: str | None = DEMO["task"],
    *,
    seed: int = DEMO["seed"],
    num_modules: int = DEMO["num_modules"],
    budget: int | None = None,
    out: Path | None = None,
    home: Path | None = None,
    progress_factory=None,
) -> dict:
    """The whole pipeline offline on the demo library: mirror, retrieve, compose, evaluate. Everything stays in
    the demo home (`home`, default demo/tour.default_home(): HOME-demo beside the lorahub home): its registry,
    the task's shots and inputs, and the composition (in `out` when given, which must not exist). Returns the
    `--json` answer, with "home", "files" and "next": the commands to run next there, offline."""
    from .demo import library, tour
    from .outputs import check_destination
    from .settings import COMPOSE

    library.verify()
    task = task or library.default_task()
    library.heldout_examples(task)  # an unknown task fails here, before any work
    folder = tour.check_home(home if home is not None else tour.default_home())
    ours = out is None  # the demo's own composition folder, which it replaces when it runs the task again
    target = folder / tour.COMPOSITIONS / task if ours else out
    if ours:
        from .compose.folder import check_destination as check_composition

        check_composition(target, overwrite=True)  # only a folder lorahub compose wrote
    else:
        check_destination(target)
    record = tour.open_home(folder)
    from .registry import Store

    result = tour.run(
        Store(folder / tour.REGISTRY),
        target,
        task=task,
        seed=seed,
        shots=DEMO["shots"],
        num_modules=num_modules,
        budget=budget or COMPOSE["budget"],
        progress_factory=progress_factory,
        overwrite=ours,
    )
    few, test = tour.task_split(task, seed, DEMO["shots"])
    result["home"] = str(folder)
    result["files"] = tour.write_task_files(folder, record, task, few, test)
    result["next"] = tour.next_commands(folder, task, len(result["weights"]))  # the reduced build has fewer than 5
    return result


# --- serving: generate and serve -----------------------------------------------------------------


def build_engine(
    *,
    adapter: Path | str | None = None,
    composition: Path | None = None,
    k: int | None = None,
    compose: str | None = None,
    base_model: str | None = None,
    model_path: str | None = None,
    embedder: str | None = None,
    dtype: str = "auto",
    device: str = "auto",
    store=None,
    by: str = WEIGHTS["by"],
    **limits,
):
    """The serve/engine.Engine that `generate` and `serve` share: per-input retrieval over the registry (`store`,
    default the user's), the router of an instance-level `composition` folder, or one `adapter` for every input
    (a task-level composition, any PEFT LoRA folder, or a registry id). `by`: what ranks the registry's adapters
    (retrieval.Retriever). `limits`: the Engine's max_new_tokens, max_input_tokens, batch_size, batching and
    admission (decoding.Admission)."""
    from .generation import check_batching
    from .serve.engine import Engine
    from .settings import SERVE

    check_batching(limits.get("batching", SERVE["batching"]))  # before minutes of loading
    fixed = "--adapter" if adapter is not None else "--composition" if composition is not None else None
    if adapter is not None and composition is not None:
        raise InputError(
            "--adapter answers with one adapter, --composition routes each input to a shot's composition.",
            "Give one of them.",
        )
    if fixed and (k is not None or compose is not None or base_model is not None):
        raise InputError(
            f"{fixed} chooses the adapters; -k, --compose and --base-model do not apply.",
            f"Drop them, or drop {fixed} to retrieve per input.",
        )
    if adapter is not None:
        folder, name = _adapter_folder(adapter, store)
        if embedder is not None:
            raise InputError("--adapter retrieves nothing; --embedder does not apply.", "Drop --embedder.")
        return Engine.from_adapter(folder, name=name, model_path=model_path, dtype=dtype, device=device, **limits)
    if composition is not None:
        return Engine.from_composition(
            composition, model_path=model_path, embedder=embedder, dtype=dtype, device=device, **limits
        )
    return Engine.from_registry(
        store or open_store(),
        base_model=base_model,
        model_path=model_path,
        embedder=embedder,
        dtype=dtype,
        device=device,
        k=SERVE["k"] if k is None else k,
        compose=compose or SERVE["compose"],
        by=by,
        **limits,
    )


def _adapter_folder(adapter: Path | str, store=None) -> tuple[Path, str | None]:
    """The folder `--adapter` names and what to call it: a folder as given, else a registry id's stored copy
    (checked against its hashes), called by its id."""
    folder = Path(adapter).expanduser()
    if folder.is_dir():
        return folder, None
    from .registry.store import CONFIG_FILE, SAFETENSORS_FILE

    store = store or open_store(readonly=True)
    record = store.find(str(adapter))
    if record is None:
        raise InputError(
            f"--adapter '{adapter}' is neither a folder nor an adapter id of the registry ({store.home}).",
            "Give a folder written by lorahub compose (or any PEFT LoRA folder), or an id from: lorahub registry list",
        )
    for name in (CONFIG_FILE, SAFETENSORS_FILE):  # a corrupted stored adapter is never served silently
        store.check_file(record, name)
    return record.path, record.id


def generate(
    inputs: Path,
    *,
    out: Path | None = None,
    overwrite: bool = False,
    progress_factory=None,
    sampling=None,
    **engine_options,
) -> dict:
    """Answer every request of the JSONL file `inputs` with the engine `build_engine(**engine_options)` builds;
    write the answers (JSONL) to `out` when given (an existing file only with `overwrite`). `sampling`: a
    decoding.Sampling for the fields a line leaves out (line i gets its seed + i; default greedy).

    Returns {"requests", "out", "load_seconds", "generate_seconds", "engine", "answers"}: each answer
    {"input", "output", "compose", "adapters", ...}."""
    import json

    from .decoding import GREEDY
    from .outputs import check_destination, write_file
    from .serve.engine import read_requests

    sampling = sampling or GREEDY
    problem = sampling.problem()
    if problem is not None:
        name, value, rule = problem
        flag = "--top-k-tokens" if name == "top_k" else f"--{name.replace('_', '-')}"  # -k/--top-k: adapters
        raise InputError(f"{flag} {value} {rule}.", "Leave it out for the default.")
    if out is not None:
        check_destination(out, overwrite, file=True, inputs=(inputs,))  # before minutes of loading
    requests = read_requests(inputs, sampling)  # a bad line fails before minutes of loading
    start = time.perf_counter()
    engine = build_engine(**engine_options)
    loaded = time.perf_counter()
    with (progress_factory or no_progress)("Generating", len(requests)) as advance:
        answers = [a.to_json() for a in engine.run(requests, progress=advance)]
    seconds = time.perf_counter() - loaded
    if out is not None:
        write_file(out, "".join(json.dumps(a, ensure_ascii=False) + "\n" for a in answers).encode("utf-8"))
    return {
        "requests": len(answers),
        "out": str(out) if out else None,
        "load_seconds": round(loaded - start, 3),
        "generate_seconds": round(seconds, 3),
        "engine": engine.info(),
        "answers": answers,
    }
