"""From a few examples to a composed adapter: select modules, load them into a bank, search, compose.

`compose_task` is LoraHub / BatchComp (one composition for the task); `compose_instance`
is iLoraComp (one composition per shot, plus a router that sends each input to its
nearest shot). Both return a `Composition` that compose/folder.py writes as a folder.
"""

from __future__ import annotations

import dataclasses
import functools
import random
from dataclasses import dataclass, field
from datetime import datetime, timezone

import torch

from .. import __version__
from ..errors import InputError
from ..io import Example
from ..models import BaseModel, check_model_name, encode, load_base_model
from ..registry.store import AdapterRecord, Store
from ..settings import COMPOSE, WEIGHTS
from . import precision as precisions
from .adapters import CONFIG_FILE, SAFETENSORS_FILE, LoraAdapter, check_compatible, load_adapter
from .bank import LoraBank
from .folder import ROUTER_FILE, shot_folder
from .formulas import RANDOM_OPTION, combine, get_formula, resolve_options
from .objective import FewShotLoss, OnColumns
from .recipe import Recipe
from .search import GRADIENT, LBFGS_START, SearchConfig, SearchResult, search

MAX_SEED = 2**32 - 1


@dataclass
class ComposeOptions:
    base_model: str | None = None  # restricts candidates; also the model loaded unless model_path is set
    model_path: str | None = None  # load the base model from here (a local copy) instead of its name
    formula: str = COMPOSE["formula"]
    formula_options: dict = field(default_factory=dict)
    modules: str | list[str] = "auto"  # auto (retrieval) | random (LoraHub) | explicit registry ids
    num_modules: int = COMPOSE["num_modules"]
    search: SearchConfig = field(default_factory=SearchConfig)
    weights: dict[str, float] | None = None  # fixed weights: no search
    warm_start: bool = False  # instance level: start every shot's search from the task-level weights
    device: str = COMPOSE["device"]
    max_rows: int = COMPOSE["max_rows"]
    embedder: str | None = None
    by: str = WEIGHTS["by"]  # what ranks the candidates of --modules auto: auto | data | weights

    def __post_init__(self):
        """Everything about the options alone is checked here, once, before any work; the pipeline trusts them."""
        from ..retrieval import check_by

        check_by(self.by)
        if self.weights and self.modules in ("auto", "random"):
            self.modules = list(self.weights)  # fixed weights without --modules compose exactly the weighted modules
        if not isinstance(self.modules, list) and self.modules not in ("auto", "random"):
            raise InputError(
                f"--modules '{self.modules}' is not auto, random or a list of ids.", "Example: --modules auto"
            )
        if self.num_modules < 1:
            raise InputError(f"-n {self.num_modules} is too small.", "Give -n 1 or more.")
        if self.max_rows < 1:
            raise InputError(f"--batch-size {self.max_rows} is too small.", "Give --batch-size 1 or more.")
        seed = self.search.seed
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
            # numpy and nevergrad take 32-bit seeds; a larger one would fail deep inside the search.
            raise InputError(
                f"--seed {seed} is out of range: a seed is a whole number from 0 to {MAX_SEED} (2**32 - 1).",
                "Example: --seed 42",
            )
        self.merge_options()  # the formula and its options
        if self.model_path is not None:
            check_model_name(self.model_path)

    def merge_options(self) -> dict:
        """The formula's options as the merge uses them; a random formula's seed defaults to the search seed."""
        given = dict(self.formula_options)
        if RANDOM_OPTION in get_formula(self.formula).options and given.get(RANDOM_OPTION) is None:
            given[RANDOM_OPTION] = self.search.seed
        return resolve_options(self.formula, given)


@dataclass
class Composition:
    recipe: Recipe
    adapters: list[LoraAdapter]  # one (task level) or one per shot (instance level)
    results: list[SearchResult | None]  # every search that ran (instance level: the warm start first)
    router: torch.Tensor | None = None  # (K, dim) shot inputs, instance level only
    base_loss: float | None = None  # the few-shot loss of the base model alone (w = 0), in float32: the start


def _no_delta(adapter: LoraAdapter) -> LoraAdapter:
    """`adapter` with B = 0: a zero delta, so the loss with it is the base model's own."""
    return dataclasses.replace(
        adapter, name="base", modules={m: (A, torch.zeros_like(B)) for m, (A, B) in adapter.modules.items()}
    )


# --- choosing and loading modules --------------------------------------------------------------


def _candidates(store: Store, base_model: str | None) -> list[AdapterRecord]:
    records = store.list(base_model)
    if not records:
        where = f" for base model '{base_model}'" if base_model else ""
        raise InputError(f"the registry has no adapters{where}.", "Add some with: lorahub registry add SOURCE")
    bases = sorted({r.base_model for r in records})
    if len(bases) > 1:
        raise InputError(
            f"the registry holds adapters for several base models ({', '.join(bases)}).",
            "Choose one with --base-model.",
        )
    return records


class BaseOnce:
    """The base model of a composition, loaded at most once, in float32: for ranking weight cards (retrieval's
    `base(name)`) and then for the search. `given`: a loaded model to use instead (its float32 copy)."""

    def __init__(self, options: ComposeOptions, given: BaseModel | None = None):
        self.options, self.given, self.loaded = options, given, None

    def __call__(self, name: str | None = None) -> BaseModel:
        if self.given is not None:
            return self.given.fp32()
        if self.loaded is None:
            name = self.options.model_path or self.options.base_model or name
            self.loaded = load_base_model(name, dtype="float32", device=self.options.device)
        return self.loaded

    def model(self) -> BaseModel | None:
        """What the search should run on: the given model, or the one loaded for ranking (None: load then)."""
        return self.given or self.loaded


def retriever(store: Store, options: ComposeOptions, base: BaseOnce):
    from ..retrieval import Retriever

    return Retriever.from_store(store, options.by, options.base_model, options.embedder, base)


def _selection(ranker, ranked, n: int, **extra) -> dict:
    """How --modules auto chose: by what (data, weights or mixed), with which embedder or weight scorer."""
    selection = {"method": "auto", "by": ranker.kind, "n": n, **extra}
    if ranker.kind != "weights":
        selection["embedder"] = ranker.embedder_key
    if ranker.kind != "data":
        selection["weights"] = ranker.about()
    if ranked is not None:
        selection["scores"] = {m.id: m.score for m in ranked}
        if ranker.kind == "mixed":
            selection["cards"] = {m.id: m.card for m in ranked}
    return selection


def select_modules(
    store: Store, shots: list[Example], options: ComposeOptions, base: BaseOnce | None = None
) -> tuple[list[AdapterRecord], dict]:
    """The candidate modules and how they were chosen (for the recipe)."""
    if isinstance(options.modules, list):
        records = [store.get(i) for i in dict.fromkeys(options.modules)]
        return records, {"method": "explicit"}
    if options.modules == "random":
        pool = _candidates(store, options.base_model)
        if len(pool) < options.num_modules:
            raise InputError(
                f"the registry has {len(pool)} adapters, fewer than -n {options.num_modules}.",
                f"Use -n {len(pool)} or add adapters.",
            )
        chosen = random.Random(options.search.seed).sample(pool, options.num_modules)
        return chosen, {"method": "random", "seed": options.search.seed, "n": options.num_modules}
    ranker = retriever(store, options, base or BaseOnce(options))
    ranked = ranker.task(shots, options.num_modules).results
    return [store.get(m.id) for m in ranked], _selection(ranker, ranked, options.num_modules)


def load_modules(store: Store, records: list[AdapterRecord]) -> list[LoraAdapter]:
    """Load each adapter after checking its weights and its config (whose alpha scales the delta) against the
    registry's hashes."""
    adapters = []
    for record in records:
        store.check_file(record, SAFETENSORS_FILE)
        store.check_file(record, CONFIG_FILE)
        adapters.append(load_adapter(record.path, name=record.id))
    return adapters


def _load_compatible(store: Store, records: list[AdapterRecord], formula: str) -> list[LoraAdapter]:
    """The modules a `formula` composition merges, loaded and checked against each other before the base model
    loads (formulas.combine and the bank check them again, as every caller of theirs must)."""
    spec = get_formula(formula)
    adapters = load_modules(store, records)
    check_compatible(adapters, same_rank=spec.same_rank, same_scaling=spec.same_scaling)
    return adapters


def _module_entries(records: list[AdapterRecord], weights) -> list[dict]:
    return [
        {
            "id": r.id,
            "source": r.source,
            "revision": r.revision,
            "sha256": r.files[SAFETENSORS_FILE],
            "weight": float(w),
        }
        for r, w in zip(records, weights)
    ]


def _versions() -> dict:
    """The installed versions, read from their metadata: a gradient search never imports nevergrad (a second)."""
    from importlib.metadata import version

    return {
        "lorahub": __version__,
        "torch": torch.__version__,
        **{name: version(name) for name in ("transformers", "peft", "nevergrad")},
    }


def _search_entry(config: SearchConfig, result: SearchResult | None, used: str) -> dict | None:
    """The search as it ran: why it stopped after how many evaluations, where it started (`start`), its
    phases and their precision. Its `loss` and `objective` are those of the chosen weights in `result_precision`
    (fp32 whenever it evaluated any candidate in fp32); `rescored` are the fp32 objectives of the best
    candidates of a search in another precision (the recipe's top-level `loss` is always fp32)."""
    if result is None:
        return None
    entry = {
        **config.to_json(),
        "precision_used": used,
        "engine": result.engine,
        "stop": result.stop,
        "evaluations": result.evaluations,
        "seconds": round(result.seconds, 3),
        "loss": result.loss,
        "objective": result.objective,
        "result_precision": result.precision,
        "rescored": result.rescored,
        "nonfinite": result.nonfinite,
    }
    if result.start is not None:
        entry["start"] = result.start
    if result.phases:
        entry["phases"] = result.phases
    return entry | {"curve": result.curve}


def _scores(loss: float, weights, config: SearchConfig) -> dict:
    """The fp32 few-shot loss of the exported adapter and its objective (loss + l1 * mean |w|)."""
    return {
        "loss": loss,
        "objective": loss + config.l1 * float(torch.tensor(weights, dtype=torch.float64).abs().mean()),
    }


# --- the search ----------------------------------------------------------------------------------


def _fixed_weights(records: list[AdapterRecord], options: ComposeOptions) -> list[float] | None:
    """Weights given by the user, or implied by a formula that takes none; None means: search."""
    spec = get_formula(options.formula)
    if spec.fixed_weights:
        return [1.0 / len(records)] * len(records)
    if options.weights is not None:
        unknown = sorted(set(options.weights) - {r.id for r in records})
        if unknown:
            raise InputError(
                f"--weights names adapters that are not among the modules: {', '.join(unknown)}.",
                "Give a weight for each module id.",
            )
        return [float(options.weights.get(r.id, 0.0)) for r in records]
    if spec.bank_mode is None:
        # ties / dare_linear / svd are fixed-weight merges: without weights, an even average.
        return [1.0 / len(records)] * len(records)
    return None


class _Session:
    """Everything a search needs: the base model in fp32 (the answer: every reported number is computed on it)
    with one bank of the adapters injected into it once for the session, the model a search in another
    precision evaluates candidates on (a bf16 / int8 copy with its own bank: precision.py), and the encoded
    shots. The adapters' factors live once: the answer bank's buffers are their storage (LoraBank `share`)."""

    def __init__(
        self, adapters: list[LoraAdapter], shots: list[Example], options: ComposeOptions, base: BaseModel | None = None
    ):
        name = options.model_path or options.base_model or adapters[0].base_model_name_or_path
        self.given = base or load_base_model(name, dtype="float32", device=options.device)
        self.answer = self.given.fp32()
        self.batch = encode(self.answer, shots)
        self.adapters, self.max_rows, self.options = adapters, options.max_rows, options
        # Fixed-weight PEFT merges are scored by evaluating their result, never searched.
        self.mode = get_formula(options.formula).bank_mode or "elementwise"
        self._banks: list[LoraBank] = []

    @functools.cached_property
    def precision(self) -> str:
        config = self.options.search
        return precisions.resolve(config.precision, self.answer.device, gradient=config.optimizer in GRADIENT)

    @functools.cached_property
    def loss(self) -> FewShotLoss:
        """The fp32 loss of any weights over all the session's adapters (the answer bank, injected once)."""
        bank = self._inject(self.answer, share=True)
        return self._loss(self.answer, bank)

    @functools.cached_property
    def explore(self) -> FewShotLoss:
        """The loss the search evaluates candidates with: the fp32 one, or one on a copy in its precision."""
        if self.precision == "fp32":
            return self.loss
        if self.precision == "bf16" and self.given.dtype == torch.bfloat16:
            searcher = self.given  # the caller's model already runs in the search's precision
        else:
            searcher = precisions.search_model(self.answer, self.precision, keep=set(self.adapters[0].modules))
        return self._loss(searcher, self._inject(searcher, share=False))

    def _loss(self, base: BaseModel, bank: LoraBank) -> FewShotLoss:
        grad_rows = COMPOSE["grad_rows"]
        return FewShotLoss(base, bank, self.batch, mode=bank.mode, max_rows=self.max_rows, grad_rows=grad_rows)

    def _inject(self, base: BaseModel, *, share: bool) -> LoraBank:
        # The LoRA path stays fp32 over a bf16 or int8 base.
        bank = LoraBank(base.model, self.adapters, mode=self.mode, lora_dtype=torch.float32, share=share)
        self._banks.append(bank)
        return bank

    def search(self, n: int, *, columns=None, init=None, progress=None) -> SearchResult:
        """Search N weights; with `columns`, the N weights are these columns of the bank (others 0)."""
        config = self.options.search
        explore, fine = self.explore, self.loss
        if columns is not None:
            explore, fine = OnColumns(explore, columns), OnColumns(fine, columns)
        if init is None and config.optimizer == "lbfgs":
            init = [LBFGS_START] * n  # beside 0, where the elementwise gradient is exactly zero (search.py)
        elif init is None and config.optimizer == "adam" and self.mode == "elementwise":
            # The elementwise delta is quadratic in w, so its gradient at w = 0 is exactly zero: a gradient
            # method must start elsewhere. The even average (fusion) is the natural point.
            init = [1.0 / n] * n
        return search(explore, n, config, init=init, progress=progress, precision=self.precision, fine=lambda: fine)

    def searched_loss(self, result: SearchResult, columns: list[int] | None = None) -> float:
        """The fp32 loss of the weights a search chose: its own value when it evaluated them in fp32 through the
        answer bank, which composes exactly what the export holds (tests/test_bank.py); else evaluated now."""
        if result.precision == "fp32":
            return result.loss
        loss = self.loss if columns is None else OnColumns(self.loss, columns)
        with torch.no_grad():
            return float(loss(torch.tensor([result.weights], dtype=torch.float32))[0])

    def evaluate(self, adapter: LoraAdapter) -> float:
        """The fp32 loss of a composed adapter that no search produced (fixed weights, a PEFT merge): a
        one-adapter bank at weight 1 on the fp32 model."""
        single = LoraBank(self.answer.model, [adapter], mode="elementwise")
        try:
            loss = FewShotLoss(self.answer, single, self.batch, mode="elementwise")
            with torch.no_grad():
                return float(loss(torch.ones(1, 1))[0])
        finally:
            single.remove()

    def close(self) -> None:
        """Give the base model back unchanged, for a caller that reuses it."""
        for bank in reversed(self._banks):
            bank.remove()
        self._banks = []

    def base_loss(self, adapter: LoraAdapter) -> float:
        """The fp32 few-shot loss of the base model alone: the answer bank's layers without weights pass through;
        without a bank (nothing searched), `adapter` with B = 0."""
        if "loss" in self.__dict__:
            return self.loss.base_loss()
        return self.evaluate(_no_delta(adapter))


# --- the two levels ------------------------------------------------------------------------------


def _recipe(
    options: ComposeOptions,
    session: _Session,
    level: str,
    task_type: str | None,
    shots_meta: dict,
    selection: dict,
    searched: bool,
    **parts,
) -> Recipe:
    return Recipe(
        level=level,
        base_model=session.adapters[0].base_model_name_or_path,
        formula=options.formula,
        task_type=task_type,
        formula_options=options.merge_options(),
        selection=selection,
        shots=shots_meta,
        dtype="float32",
        search_precision=session.precision if searched else None,
        device=str(session.answer.device),
        versions=_versions(),
        lorahub_version=__version__,
        created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        **parts,
    )


def compose_task(
    store: Store,
    shots: list[Example],
    shots_meta: dict,
    options: ComposeOptions,
    progress=None,
    base: BaseModel | None = None,
) -> Composition:
    """One composition for the whole task (LoraHub with --modules random, BatchComp with auto).

    `base`: an already loaded base model to use (and leave unchanged) instead of loading one."""
    spec = get_formula(options.formula)
    merge_options = options.merge_options()
    once = BaseOnce(options, base)
    records, selection = select_modules(store, shots, options, once)
    adapters = _load_compatible(store, records, options.formula)
    weights = _fixed_weights(records, options)

    def merge(w):
        return combine(adapters, None if spec.fixed_weights else w, options.formula, name="composed", **merge_options)

    session = _Session(adapters, shots, options, once.model())
    try:
        result = None
        if weights is None:
            result = session.search(len(adapters), progress=progress)
            weights = result.weights
        adapter = merge(weights)
        loss = session.evaluate(adapter) if result is None else session.searched_loss(result)
        base_loss = session.base_loss(adapter)
    finally:
        session.close()
    recipe = _recipe(
        options,
        session,
        "task",
        adapter.task_type,
        shots_meta,
        selection,
        result is not None,
        modules=_module_entries(records, weights),
        search=_search_entry(options.search, result, session.precision),
        **_scores(loss, weights, options.search),
    )
    return Composition(recipe, [adapter], [result], base_loss=base_loss)


def compose_instance(
    store: Store,
    shots: list[Example],
    shots_meta: dict,
    options: ComposeOptions,
    progress=None,
    base: BaseModel | None = None,
) -> Composition:
    """iLoraComp: per shot, the top-N modules by that shot's embedding, weights searched on all K shots."""
    from .. import retrieval

    spec = get_formula(options.formula)
    if spec.bank_mode is None or spec.fixed_weights or options.weights is not None:
        raise InputError(
            "--level instance searches weights per shot.", "Use --formula elementwise or linear, without --weights."
        )
    if isinstance(options.modules, list) or options.modules != "auto":
        raise InputError("--level instance retrieves modules per shot.", "Use --modules auto (the default).")
    once = BaseOnce(options, base)
    ranker = retriever(store, options, once)
    per_shot = ranker.per_shot(shots, options.num_modules)
    sets = [[m.id for m in shot] for shot in per_shot]
    task_ids = [m.id for m in ranker.task(shots, options.num_modules).results] if options.warm_start else []
    union = list(dict.fromkeys([i for ids in sets for i in ids] + task_ids))
    records = [store.get(i) for i in union]
    adapters = _load_compatible(store, records, options.formula)
    session = _Session(adapters, shots, options, once.model())
    try:
        position = {i: p for p, i in enumerate(union)}
        warm, results = None, []
        if options.warm_start:
            warm_result = session.search(len(task_ids), columns=[position[i] for i in task_ids], progress=progress)
            warm = dict(zip(task_ids, warm_result.weights))
            results.append(warm_result)
        compositions, entries = [], []
        for j, ids in enumerate(sets):
            init = [warm.get(i, 0.0) for i in ids] if warm else None
            columns = [position[i] for i in ids]
            result = session.search(len(ids), columns=columns, init=init, progress=progress)
            chosen = [records[position[i]] for i in ids]
            adapter = combine([adapters[position[i]] for i in ids], result.weights, options.formula, name=f"shot-{j}")
            compositions.append(adapter)
            results.append(result)
            entries.append(
                {
                    "shot": j,
                    "folder": shot_folder(j),
                    "modules": _module_entries(chosen, result.weights),
                    "search": _search_entry(options.search, result, session.precision),
                    **_scores(session.searched_loss(result, columns), result.weights, options.search),
                }
            )
        base_loss = session.base_loss(compositions[0])  # every shot's search scores all K shots
    finally:
        session.close()
    router = retrieval.embed_inputs(ranker.embedder, ranker.instruction, [s.input for s in shots])  # (K, dim)
    selection = _selection(
        ranker, None, options.num_modules, level="instance", warm_start=options.warm_start, embedder=ranker.embedder_key
    )
    warm_entry = None
    if warm:
        warm_entry = {
            "modules": _module_entries([records[position[i]] for i in task_ids], warm_result.weights),
            "search": _search_entry(options.search, warm_result, session.precision),
        }
    recipe = _recipe(
        options,
        session,
        "instance",
        compositions[0].task_type,
        shots_meta,
        selection,
        True,
        warm_start=warm_entry,
        compositions=entries,
        router={
            "file": ROUTER_FILE,
            "embedder": ranker.embedder_key,
            "instruction": ranker.instruction,
            "shots": [s.input for s in shots],
        },
    )
    return Composition(recipe, compositions, results, router, base_loss)


# --- rebuilding ---------------------------------------------------------------------------------


def rebuild(store: Store, recipe: Recipe) -> LoraAdapter:
    """The adapter a task-level recipe describes, from the registry's modules, checked against their hashes."""
    if recipe.level != "task":
        raise InputError(
            "--from-recipe rebuilds task-level recipes.",
            "Rebuild each compositions/shot-*/lorahub_recipe.json instead.",
        )
    records = []
    for module in recipe.modules:
        record = store.get(module["id"])
        if record.files.get(SAFETENSORS_FILE) != module["sha256"]:
            raise InputError(
                f"module '{module['id']}' in the registry is not the one the recipe used (sha256 differs).",
                "Mirror the recorded revision: "
                f"lorahub registry add {module['source']} --revision {module['revision']}",
            )
        records.append(record)
    spec = get_formula(recipe.formula)
    weights = None if spec.fixed_weights else [m["weight"] for m in recipe.modules]
    return combine(load_modules(store, records), weights, recipe.formula, name="composed", **recipe.formula_options)
