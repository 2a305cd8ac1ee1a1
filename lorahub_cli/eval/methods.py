"""The methods an evaluation compares: each turns (shots, test inputs) into predictions.

zero-shot   the base model on the bare input.
icl         the shots in the prompt (see `icl_prompt`).
single-best the one of the N retrieved modules with the lowest few-shot loss, alone at weight 1 (no search).
uniform     the N retrieved modules composed with equal weights w_i = 1/N (no search).
lorahub     LoraHub: N random registry modules, weights searched on the shots.
batchcomp   the same with the N modules retrieved for the whole task (task-level retrieval).
batchcomp-weights  BatchComp with the N modules ranked by their weight cards alone (as if the library had no data).
instance    iLoraComp: one composition per shot; each input answered by its nearest shot's.
fft         full fine-tuning on the shots (the papers' upper bound: 40 epochs, lr 3e-5, batch 5).

Every method shares one loaded base model; compositions are evaluated through the LoRA bank
and leave the base model unchanged.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch

from ..errors import InputError
from ..io import Example
from ..models import BaseModel, encode, load_base_model, mean_token_loss, token_losses
from ..settings import COMPOSE, EVAL

METHODS = ("zero-shot", "icl", "single-best", "uniform", "lorahub", "batchcomp", "batchcomp-weights", "instance", "fft")
COMPOSING = ("single-best", "uniform", "lorahub", "batchcomp", "batchcomp-weights", "instance")
RETRIEVING = ("single-best", "uniform", "batchcomp", "batchcomp-weights", "instance")  # rank the registry's cards


@dataclass
class EvalConfig:
    """Everything that decides a cell's result, plus how fast it is computed."""

    base_model: str | None = None  # the registry's base model; loaded unless model_path is set
    model_path: str | None = None
    shots: int = EVAL["shots"]
    limit: int | None = None
    num_modules: int = COMPOSE["num_modules"]
    budget: int = COMPOSE["budget"]
    optimizer: str = EVAL["optimizer"]
    l1: float = COMPOSE["l1"]
    max_new_tokens: int = EVAL["max_new_tokens"]
    fft_epochs: int = EVAL["fft_epochs"]
    fft_lr: float = EVAL["fft_lr"]
    fft_batch: int = EVAL["fft_batch"]
    embedder: str | None = None
    dtype: str = COMPOSE["dtype"]
    device: str = COMPOSE["device"]
    batch_size: int = EVAL["batch_size"]  # speed only: not part of the fingerprint

    def fingerprint(self) -> dict:
        """The settings a finished cell depends on: a resumed run must use the same."""
        settings = asdict(self)
        for speed_only in ("batch_size", "device"):
            settings.pop(speed_only)
        return settings


@dataclass
class MethodResult:
    """What a method gives for one cell (serve/engine.py's Answer is one served request's)."""

    predictions: list[str]
    detail: dict = field(default_factory=dict)  # what the method chose: modules, weights, search cost


class Context:
    """The base model, loaded once, and the registry the composing methods draw modules from."""

    def __init__(self, config: EvalConfig, store=None):
        self.config, self.store = config, store
        self._base: BaseModel | None = None

    @property
    def base(self) -> BaseModel:
        if self._base is None:
            name = self.config.model_path or self.config.base_model
            if name is None:
                raise InputError(
                    "no base model was given.", "Give --base-model NAME (and --model-path for a local copy)."
                )
            self._base = load_base_model(name, dtype=self.config.dtype, device=self.config.device)
        return self._base

    def generate(self, inputs: list[str], *, bank=None, weights=None, base: BaseModel | None = None) -> list[str]:
        from ..generation import generate

        return generate(
            base or self.base,
            inputs,
            bank=bank,
            weights=weights,
            max_new_tokens=self.config.max_new_tokens,
            batch_size=self.config.batch_size,
        )


def icl_prompt(shots: list[Example], question: str) -> str:
    """The shots as solved questions, then the question: "Q\\nAnswer: A" blocks separated by a blank line."""
    solved = "".join(f"{s.input}\nAnswer: {s.target}\n\n" for s in shots)
    return f"{solved}{question}\nAnswer:"


def zero_shot(ctx: Context, shots: list[Example], inputs: list[str], seed: int) -> MethodResult:
    """The base model on the bare input."""
    return MethodResult(ctx.generate(inputs))


def icl(ctx: Context, shots: list[Example], inputs: list[str], seed: int) -> MethodResult:
    """The shots in the prompt (in-context learning)."""
    return MethodResult(ctx.generate([icl_prompt(shots, x) for x in inputs]))


def _compose_options(ctx: Context, modules: str, seed: int, formula: str = COMPOSE["formula"], by: str = "auto"):
    from ..compose.pipeline import ComposeOptions
    from ..compose.search import SearchConfig

    c = ctx.config
    return ComposeOptions(
        base_model=c.base_model,
        formula=formula,
        modules=modules,
        num_modules=c.num_modules,
        embedder=c.embedder,
        search=SearchConfig(optimizer=c.optimizer, budget=c.budget, l1=c.l1, seed=seed),
        by=by,
    )


def _with_bank(ctx: Context, adapters, inputs: list[str], weights) -> list[str]:
    """Generate under a bank of composed adapters.

    "linear" with one-hot rows is each adapter exactly, whatever its rank."""
    from ..compose.bank import LoraBank

    bank = LoraBank(ctx.base.model, adapters, mode="linear")
    try:
        return ctx.generate(inputs, bank=bank, weights=weights)
    finally:
        bank.remove()


def _task_level(modules: str, summary: str, formula: str = COMPOSE["formula"], by: str = "auto"):
    def method(ctx: Context, shots: list[Example], inputs: list[str], seed: int) -> MethodResult:
        from ..compose.pipeline import compose_task

        options = _compose_options(ctx, modules, seed, formula, by)
        composition = compose_task(ctx.store, shots, {"count": len(shots)}, options, base=ctx.base)
        recipe, result = composition.recipe, composition.results[0]
        predictions = _with_bank(ctx, composition.adapters, inputs, torch.ones(1))
        return MethodResult(
            predictions,
            {
                "modules": {k: round(w, 6) for k, w in recipe.weights.items()},
                "loss": recipe.loss,
                "evaluations": result.evaluations if result else 0,
            },
        )

    method.__doc__ = summary
    return method


def single_best(ctx: Context, shots: list[Example], inputs: list[str], seed: int) -> MethodResult:
    """The one of the N retrieved modules whose few-shot loss, alone at weight 1, is lowest (no search)."""
    from ..compose.bank import LoraBank
    from ..compose.objective import FewShotLoss
    from ..compose.pipeline import BaseOnce, load_modules, select_modules

    options = _compose_options(ctx, "auto", seed)
    records, _ = select_modules(ctx.store, shots, options, BaseOnce(options, ctx.base))
    adapters = load_modules(ctx.store, records)
    answer = ctx.base.fp32()  # the loss that decides is an fp32 number, as a composition's recipe loss is
    bank = LoraBank(answer.model, adapters, mode="linear")
    try:
        with torch.no_grad():
            losses = FewShotLoss(answer, bank, encode(answer, shots), mode="linear")(torch.eye(len(adapters)))
    finally:
        bank.remove()
    best = int(losses.argmin())
    predictions = _with_bank(ctx, adapters, inputs, torch.eye(len(adapters))[best])
    return MethodResult(
        predictions,
        {
            "chosen": records[best].id,
            "losses": {r.id: round(float(v), 6) for r, v in zip(records, losses)},
            "evaluations": len(adapters),
        },
    )


def instance(ctx: Context, shots: list[Example], inputs: list[str], seed: int) -> MethodResult:
    """iLoraComp: one composition per shot; each input answered by its nearest shot's."""
    from ..cards.embedder import load_embedder
    from ..compose.pipeline import compose_instance
    from ..routing import ShotRouter

    composition = compose_instance(
        ctx.store, shots, {"count": len(shots)}, _compose_options(ctx, "auto", seed), base=ctx.base
    )
    recipe = composition.recipe
    embedder = load_embedder(ctx.config.embedder or recipe.router["embedder"].rsplit("@", 1)[0])
    # The same routing `lorahub generate` applies to a saved instance-level composition.
    routes = ShotRouter(recipe, composition.router, embedder, elementwise_ok=False).route(inputs)
    predictions = _with_bank(ctx, composition.adapters, inputs, [route.row for route in routes])
    return MethodResult(
        predictions,
        {
            "routes": [r.info["shot"] for r in routes],
            "evaluations": sum(r.evaluations for r in composition.results if r),
            "compositions": [{m["id"]: round(m["weight"], 6) for m in c["modules"]} for c in recipe.compositions],
        },
    )


def fft(ctx: Context, shots: list[Example], inputs: list[str], seed: int) -> MethodResult:
    """Full fine-tuning on the shots (the upper bound): AdamW on every weight of a copy of the base model.

    The loss is the token-mean cross-entropy."""
    c = ctx.config
    torch.manual_seed(seed)
    tuned = BaseModel(
        copy.deepcopy(ctx.base.model).train().requires_grad_(True),
        ctx.base.tokenizer,
        ctx.base.is_seq2seq,
        ctx.base.device,
        ctx.base.dtype,
    )
    optimizer = torch.optim.AdamW(tuned.model.parameters(), lr=c.fft_lr)
    order = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(c.fft_epochs):
        index = torch.randperm(len(shots), generator=order).tolist()
        for start in range(0, len(shots), c.fft_batch):
            batch = encode(tuned, [shots[i] for i in index[start : start + c.fft_batch]])
            loss = mean_token_loss(token_losses(tuned, batch), batch.n_tokens, 1)[0]
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        losses.append(round(loss.item(), 6))
    tuned.model.eval().requires_grad_(False)
    predictions = ctx.generate(inputs, base=tuned)
    return MethodResult(predictions, {"epochs": c.fft_epochs, "final_loss": losses[-1]})


RUNNERS: dict[str, Callable[[Context, list[Example], list[str], int], MethodResult]] = {
    "zero-shot": zero_shot,
    "icl": icl,
    "single-best": single_best,
    # w_i = 1/N under the composing formula (elementwise: LoraRetriever's fusion): a point of the search's own space.
    "uniform": _task_level("auto", "The N retrieved modules with equal weights 1/N, no search.", formula="fusion"),
    "lorahub": _task_level("random", "LoraHub: N random registry modules, weights searched on the shots."),
    "batchcomp": _task_level(
        "auto", "BatchComp: the N modules retrieved for the whole task, weights searched on the shots."
    ),
    "batchcomp-weights": _task_level(
        "auto", "BatchComp with the N modules ranked by their weight cards alone (no data card used).", by="weights"
    ),
    "instance": instance,
    "fft": fft,
}


def parse_methods(text: str) -> list[str]:
    chosen = [m.strip() for m in text.split(",") if m.strip()]
    unknown = [m for m in chosen if m not in RUNNERS]
    if unknown or not chosen:
        raise InputError(
            f"--methods names unknown methods: {', '.join(unknown) or repr(text)}.",
            f"Choose from: {','.join(RUNNERS)}.",
        )
    return list(dict.fromkeys(chosen))


def run_method(
    method: str, ctx: Context, shots: list[Example], inputs: list[str], seed: int
) -> tuple[MethodResult, float]:
    start = time.perf_counter()
    answer = RUNNERS[method](ctx, shots, inputs, seed)
    return answer, time.perf_counter() - start
