"""Searching the N composition weights: gradient-free (nevergrad) or by gradient (L-BFGS-B, Adam).

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
from .precision import PRECISIONS

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
        Optimizer(
            "lbfgs",
            "L-BFGS-B (scipy) in the box on a smoothed L1, exact gradients through the LoRA bank; "
            "stops early when converged or stalled",
            None,
            False,
        ),
    )
}
GRADIENT = {o.name for o in OPTIMIZERS.values() if o.nevergrad is None}  # they back-propagate through the model
TOP = 3  # the best distinct candidates a search hands back for re-scoring in fp32


@dataclass
class SearchConfig:
    optimizer: str = COMPOSE["optimizer"]
    budget: int = COMPOSE["budget"]  # loss evaluations (candidates), not forward passes
    l1: float = COMPOSE["l1"]  # on mean |w|
    seed: int = COMPOSE["seed"]
    population: int = COMPOSE["population"]  # candidates per forward pass for population optimisers
    learning_rate: float = 0.05  # adam only
    precision: str = COMPOSE[
        "search_precision"
    ]  # what candidates are evaluated in: auto, fp32, bf16, int8 (precision.py)

    def __post_init__(self):
        if self.optimizer not in OPTIMIZERS:
            raise InputError(f"optimizer '{self.optimizer}' is not known.", f"Choose one of: {', '.join(OPTIMIZERS)}.")
        if self.budget < 1:
            raise InputError(f"budget {self.budget} is too small.", "Give --budget 1 or more.")
        if self.l1 < 0:
            raise InputError(f"l1 {self.l1} is negative.", "Give --l1 0 or more.")
        if self.precision not in PRECISIONS:
            raise InputError(
                f"--search-precision '{self.precision}' is not known.", f"Choose one of: {', '.join(PRECISIONS)}."
            )

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
    top: list[list[float]] = field(default_factory=list)  # the best distinct candidates, best first
    rescored: list[float] | None = None  # their fp32 objectives, when the search ran in another precision


def l1_penalty(W: torch.Tensor, l1: float) -> torch.Tensor:
    return l1 * W.abs().mean(dim=-1)


class _Tracker:
    """Records every evaluation and the best candidate so far."""

    def __init__(self, config: SearchConfig, progress):
        self.config, self.progress = config, progress
        self.start = time.perf_counter()
        self.curve: list[dict] = []
        self.best = (float("inf"), float("inf"), None)  # objective, loss, weights
        self.top: list[tuple[float, list[float]]] = []  # (objective, weights), best first
        self.best_at = 0  # evaluations when the best was found
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
                self.best_at = len(self.curve) + 1
            if np.isfinite(objective) and all(weights != w.tolist() for _, weights in self.top):
                self.top = sorted([*self.top, (objective, w.tolist())], key=lambda t: t[0])[:TOP]
            self.curve.append(
                {
                    "evaluation": len(self.curve) + 1,
                    "seconds": round(time.perf_counter() - self.start, 4),
                    "loss": loss,
                    "objective": objective,
                    "best": self.best[0],
                }
            )
            objectives.append(objective)
            if self.progress:
                self.progress(self.best[0])
        return objectives

    def result(self, engine: str) -> SearchResult:
        objective, loss, weights = self.best
        return SearchResult(
            weights,
            objective,
            loss,
            len(self.curve),
            time.perf_counter() - self.start,
            self.curve,
            self.nonfinite,
            engine,
            [w for _, w in self.top],
        )


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
    optimizer = ng.optimizers.registry[spec.nevergrad](
        parametrization=parametrization, budget=config.budget, num_workers=workers
    )
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


class _BudgetSpent(Exception):
    pass


SMOOTH = 1e-3  # |w| ~ sqrt(w^2 + SMOOTH^2) for L-BFGS-B: differentiable at 0, within 1e-3 of |w|
NONFINITE = 1e30  # what L-BFGS-B is told at a non-finite loss: a wall its line search backs off from
LBFGS_START = 0.05  # the elementwise delta is quadratic in w: zero gradient at w = 0, so start beside it
FIRST_STEP = 0.25  # the most L-BFGS-B's first step moves one weight (COBYLA's first steps move one weight by 0.5)
PATIENCE = 10  # evaluations without a better objective before L-BFGS-B stops


def _lbfgs(loss_fn, n: int, init: np.ndarray, config: SearchConfig, tracker: _Tracker) -> str:
    """scipy's L-BFGS-B over the box on loss + l1 * mean sqrt(w^2 + SMOOTH^2), with the loss's exact gradient
    (one backward pass through the bank); every call is one evaluation of the budget. The tracker scores
    candidates with the true |w|.

    L-BFGS-B's first step is the raw gradient, which on a few-shot loss of ~100 nats flies to the corners of
    the box: the variables are scaled so that it moves no weight by more than FIRST_STEP. It stops when
    converged or after PATIENCE evaluations without a better objective. A non-finite loss ends L-BFGS-B's
    run (its line search cannot back off from it), so it restarts from the best point with steps 4x shorter."""
    from scipy.optimize import minimize

    def evaluate(x: np.ndarray) -> tuple[float, np.ndarray] | None:
        if len(tracker.curve) >= config.budget or len(tracker.curve) - tracker.best_at >= PATIENCE:
            raise _BudgetSpent
        w = torch.tensor(x, dtype=torch.float32, requires_grad=True)
        loss = loss_fn(w[None])[0]
        tracker.record(w[None], loss[None])
        if not torch.isfinite(loss):
            return None
        loss.backward()
        smooth = np.sqrt(x**2 + SMOOTH**2)
        return float(loss.detach()) + config.l1 * float(
            smooth.mean()
        ), w.grad.double().numpy() + config.l1 * x / smooth / n

    def run(start: np.ndarray, first: tuple[float, np.ndarray], step: float) -> None:
        scale = np.sqrt(step / max(np.abs(first[1]).max(), 1e-12))  # w = start + scale * z; first step = scale^2 g

        def objective(z: np.ndarray) -> tuple[float, np.ndarray]:
            if not z.any():
                return first[0], scale * first[1]  # the start, already evaluated
            value = evaluate(np.clip(start + scale * z, *BOUNDS))
            return (NONFINITE, np.zeros(n)) if value is None else (value[0], scale * value[1])

        bounds = list(zip((BOUNDS[0] - start) / scale, (BOUNDS[1] - start) / scale))
        minimize(
            objective,
            np.zeros(n),
            jac=True,
            method="L-BFGS-B",
            bounds=bounds,
            options={"maxfun": config.budget, "maxiter": config.budget},
        )

    start, step = np.asarray(init, dtype=float), FIRST_STEP
    try:
        first = evaluate(start)
        while first is not None and len(tracker.curve) < config.budget:
            nonfinite = tracker.nonfinite
            run(start, first, step)
            if tracker.nonfinite == nonfinite:
                break  # converged without meeting a non-finite loss: the budget left is not needed
            start, step = np.asarray(tracker.best[2], dtype=float), step / 4
            first = evaluate(start)
    except _BudgetSpent:
        pass
    return "L-BFGS-B"


def search(
    loss_fn: Callable[[torch.Tensor], torch.Tensor],
    n: int,
    config: SearchConfig,
    init: np.ndarray | None = None,
    progress=None,
) -> SearchResult:
    """Minimise loss + l1 * mean|w| over N weights in [-1.5, 1.5]; returns the best candidate seen."""
    init = np.zeros(n) if init is None else np.clip(np.asarray(init, dtype=float), *BOUNDS)
    tracker = _Tracker(config, progress)
    run = {"adam": _adam, "lbfgs": _lbfgs}.get(config.optimizer, _nevergrad)
    with quiet_optimizer():
        engine = run(loss_fn, n, init, config, tracker)
    return tracker.result(engine)
