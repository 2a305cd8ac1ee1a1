"""Searching the N composition weights: gradient-free (nevergrad) or by gradient (Adam).

The search knows a loss function of a weight matrix, not models:

    loss_fn(W: (P, N) tensor) -> (P,) tensor      # few-shot loss of each candidate row

and minimises  objective(w) = loss(w) + l1 * mean_i |w_i|  over the box [-1.5, 1.5]^N,
starting from `init` (zeros: the base model, as in LoraHub). A non-finite loss counts
as +inf for the optimiser and is reported, never raised. Optimisers that propose a
population ask for several candidates at once, and they are evaluated in one call.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from ..errors import InputError
from ..quiet import quiet_optimizer
from ..settings import COMPOSE

BOUNDS = (-1.5, 1.5)


@dataclass(frozen=True)
class Optimizer:
    name: str
    summary: str
    nevergrad: str | None  # the nevergrad optimiser class, None for gradient-based
    population: bool  # asks for several candidates before any answer


OPTIMIZERS = {
    o.name: o
    for o in (
        Optimizer("ngopt", "nevergrad NGOpt, LoraHub's choice; with one worker it runs COBYLA", "NGOpt", False),
        Optimizer("cma", "CMA-ES, a whole population per forward pass", "CMA", True),
        Optimizer("de", "differential evolution (TwoPointsDE), a population per forward pass", "TwoPointsDE", True),
        Optimizer("random", "uniform random search in the box, a population per forward pass", "RandomSearch", True),
        Optimizer("adam", "Adam on the weights, gradients back-propagated through the LoRA bank", None, False),
    )
}


@dataclass
class SearchConfig:
    optimizer: str = COMPOSE["optimizer"]
    budget: int = COMPOSE["budget"]  # loss evaluations (candidates), not forward passes
    l1: float = COMPOSE["l1"]  # on mean |w|
    seed: int = COMPOSE["seed"]
    population: int = COMPOSE["population"]  # candidates per forward pass for population optimisers
    learning_rate: float = 0.05  # adam only

    def __post_init__(self):
        if self.optimizer not in OPTIMIZERS:
            raise InputError(f"optimizer '{self.optimizer}' is not known.", f"Choose one of: {', '.join(OPTIMIZERS)}.")
        if self.budget < 1:
            raise InputError(f"budget {self.budget} is too small.", "Give --budget 1 or more.")
        if self.l1 < 0:
            raise InputError(f"l1 {self.l1} is negative.", "Give --l1 0 or more.")

    def to_json(self) -> dict:
        return asdict(self)


@dataclass
class SearchResult:
    weights: list[float]
    objective: float  # loss + l1 * mean|w| at `weights`
    loss: float
    evaluations: int
    seconds: float
    curve: list[dict] = field(default_factory=list)  # one entry per evaluation
    nonfinite: int = 0
    engine: str = ""  # the optimiser that actually ran (NGOpt delegates)


def l1_penalty(W: torch.Tensor, l1: float) -> torch.Tensor:
    return l1 * W.abs().mean(dim=-1)


class _Tracker:
    """Records every evaluation and the best candidate so far."""

    def __init__(self, config: SearchConfig, progress):
        self.config, self.progress = config, progress
        self.start = time.perf_counter()
        self.curve: list[dict] = []
        self.best = (float("inf"), float("inf"), None)  # objective, loss, weights
        self.nonfinite = 0

    def record(self, W: torch.Tensor, losses: torch.Tensor) -> list[float]:
        objectives = []
        for w, loss in zip(W.detach().cpu().double(), losses.detach().cpu().double().tolist()):
            if not np.isfinite(loss):
                self.nonfinite += 1
                loss = float("inf")
            objective = loss + float(l1_penalty(w, self.config.l1))
            if objective < self.best[0]:
                self.best = (objective, loss, w.tolist())
            self.curve.append({"evaluation": len(self.curve) + 1, "seconds": round(time.perf_counter() - self.start, 4),
                               "loss": loss, "objective": objective, "best": self.best[0]})
            objectives.append(objective)
            if self.progress:
                self.progress(self.best[0])
        return objectives

    def result(self, engine: str) -> SearchResult:
        objective, loss, weights = self.best
        return SearchResult(weights, objective, loss, len(self.curve), time.perf_counter() - self.start,
                            self.curve, self.nonfinite, engine)


def _stop_threads(optimizer) -> None:
    """nevergrad runs COBYLA in a thread; stop it, or it outlives an early exit."""
    while optimizer is not None:
        thread = getattr(optimizer, "_messaging_thread", None)
        if thread is not None:
            thread.stop()
        optimizer = getattr(optimizer, "optim", None)


def _engine_name(optimizer) -> str:
    """The chain of optimisers that ran, e.g. 'NGOpt -> Cobyla': NGOpt picks by budget and workers."""
    names = []
    while optimizer is not None and hasattr(optimizer, "name"):
        names.append(optimizer.name)
        optimizer = getattr(optimizer, "optim", None)
    return " -> ".join(names)


def _nevergrad(loss_fn, n: int, init: np.ndarray, config: SearchConfig, tracker: _Tracker) -> str:
    import nevergrad as ng

    spec = OPTIMIZERS[config.optimizer]
    parametrization = ng.p.Array(init=init).set_bounds(*BOUNDS)
    parametrization.random_state = np.random.RandomState(config.seed)
    workers = min(config.population, config.budget) if spec.population else 1
    optimizer = ng.optimizers.registry[spec.nevergrad](parametrization=parametrization, budget=config.budget, num_workers=workers)
    try:
        while len(tracker.curve) < config.budget:
            asked = [optimizer.ask() for _ in range(min(workers, config.budget - len(tracker.curve)))]
            W = torch.tensor(np.stack([c.value for c in asked]), dtype=torch.float32)
            with torch.no_grad():
                losses = loss_fn(W)
            for candidate, objective in zip(asked, tracker.record(W, losses)):
                optimizer.tell(candidate, objective)
        return _engine_name(optimizer)
    finally:
        _stop_threads(optimizer)


def _adam(loss_fn, n: int, init: np.ndarray, config: SearchConfig, tracker: _Tracker) -> str:
    w = torch.tensor(init, dtype=torch.float32, requires_grad=True)
    optimizer = torch.optim.Adam([w], lr=config.learning_rate)
    for _ in range(config.budget):
        optimizer.zero_grad()
        loss = loss_fn(w[None])[0]
        tracker.record(w[None], loss[None])
        if not torch.isfinite(loss):
            break  # no gradient to follow from a non-finite point
        (loss + l1_penalty(w, config.l1)).backward()
        optimizer.step()
        with torch.no_grad():
            w.clamp_(*BOUNDS)
    return "Adam"


def search(loss_fn: Callable[[torch.Tensor], torch.Tensor], n: int, config: SearchConfig,
           init: np.ndarray | None = None, progress=None) -> SearchResult:
    """Minimise loss + l1 * mean|w| over N weights in [-1.5, 1.5]; returns the best candidate seen."""
    init = np.zeros(n) if init is None else np.clip(np.asarray(init, dtype=float), *BOUNDS)
    tracker = _Tracker(config, progress)
    run = _adam if OPTIMIZERS[config.optimizer].nevergrad is None else _nevergrad
    with quiet_optimizer():
        engine = run(loss_fn, n, init, config, tracker)
    return tracker.result(engine)
