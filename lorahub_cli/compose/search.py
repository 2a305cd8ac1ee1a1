"""Searching the N composition weights: LoraHub's nevergrad search (the default), the `subspace` search, or by
gradient (L-BFGS-B, Adam).

The search knows a loss of a weight matrix, not models:

    loss(W: (P, N) tensor) -> (P,) tensor      # few-shot loss of each candidate row
    loss.value_and_grad(w), loss.curvature()  # optional (objective.FewShotLoss has them); else autograd

and minimises  objective(w) = loss(w) + l1 * mean_i |w_i|  over the box [-1.5, 1.5]^N, starting from
`init` (zeros: the base model, as in LoraHub). A non-finite loss counts as +inf for the optimiser and is
reported, never raised. Optimisers that propose a population ask for several candidates at once, and they
are evaluated in one call. The budget caps the evaluations of a search, its fp32 finish included; a search
may stop before it, and its result says why (`stop`).
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
        Optimizer(
            "subspace",
            "the curvature at w = 0 from one backward pass, a line along its most negative direction, then COBYLA "
            "in the span of its 4 most negative directions until converged",
            None,
            False,
        ),
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
TOP = 3  # the best distinct candidates of a search in another precision that are re-scored in fp32


@dataclass
class SearchConfig:
    optimizer: str = COMPOSE["optimizer"]
    budget: int = COMPOSE["budget"]  # loss evaluations (candidates), not forward passes; a cap
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
    objective: float  # loss + l1 * mean|w| at `weights`, in `precision`
    loss: float
    evaluations: int  # every candidate evaluated, the fp32 finish included; never more than the budget
    seconds: float
    curve: list[dict] = field(default_factory=list)  # one entry per evaluation
    nonfinite: int = 0
    engine: str = ""  # the optimiser that actually ran (NGOpt delegates)
    stop: str = "budget"  # why the search ended: one of recipe.STOPS
    precision: str = "fp32"  # what `objective` and `loss` were evaluated in
    phases: list[dict] = field(default_factory=list)  # [{phase, precision, evaluations}], in order
    start: dict | None = None  # where a `subspace` search started from and why
    rescored: list[float] | None = None  # fp32 objectives of the best candidates of a search in another precision


def l1_penalty(W: torch.Tensor, l1: float) -> torch.Tensor:
    return l1 * W.abs().mean(dim=-1)


class _Stop(Exception):
    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class _Tracker:
    """Records every evaluation, the best candidate so far per precision, and the phases of the search."""

    def __init__(self, config: SearchConfig, progress, precision: str = "fp32"):
        self.config, self.progress = config, progress
        self.start = time.perf_counter()
        self.curve: list[dict] = []
        self.precision = precision
        self.best: dict[str, tuple[float, float, list[float] | None]] = {}  # precision -> objective, loss, weights
        self.top: list[tuple[float, list[float]]] = []  # (objective, weights) in the current precision, best first
        self.best_at = 0  # evaluations when the best of the current precision was found
        self.nonfinite = 0
        self.phases: list[dict] = []
        self.start_point: dict | None = None  # subspace search: where it started and why
        self.directions: np.ndarray | None = None  # subspace search: (N, k), for the fp32 finish

    def phase(self, name: str, precision: str | None = None) -> None:
        if precision is not None and precision != self.precision:
            self.precision, self.top, self.best_at = precision, [], len(self.curve)
        self.phases.append({"phase": name, "precision": self.precision, "evaluations": 0})

    def left(self) -> int:
        return self.config.budget - len(self.curve)

    def since_best(self) -> int:
        return len(self.curve) - self.best_at

    def current(self) -> tuple[float, float, list[float] | None]:
        return self.best.get(self.precision, (float("inf"), float("inf"), None))

    def record(self, W: torch.Tensor, losses: torch.Tensor) -> list[float]:
        objectives = []
        for w, loss in zip(W.detach().cpu().double(), losses.detach().cpu().double().reshape(-1).tolist()):
            if not np.isfinite(loss):
                self.nonfinite += 1
                loss = float("inf")
            objective = loss + float(l1_penalty(w, self.config.l1))
            if objective < self.current()[0]:
                self.best[self.precision] = (objective, loss, w.tolist())
                self.best_at = len(self.curve) + 1
            if np.isfinite(objective) and all(weights != w.tolist() for _, weights in self.top):
                self.top = sorted([*self.top, (objective, w.tolist())], key=lambda t: t[0])[:TOP]
            self.curve.append(
                {
                    "evaluation": len(self.curve) + 1,
                    "seconds": round(time.perf_counter() - self.start, 4),
                    "loss": loss,
                    "objective": objective,
                    "best": self.current()[0],
                }
            )
            if self.phases:
                self.phases[-1]["evaluations"] += 1
            objectives.append(objective)
            if self.progress:
                self.progress(self.current()[0])
        return objectives

    def result(self, engine: str, stop: str, start: dict | None = None, rescored=None) -> SearchResult:
        precision = "fp32" if "fp32" in self.best else self.precision
        objective, loss, weights = self.best.get(precision, (float("inf"), float("inf"), None))
        return SearchResult(
            weights,
            objective,
            loss,
            len(self.curve),
            time.perf_counter() - self.start,
            self.curve,
            self.nonfinite,
            engine,
            stop,
            precision,
            self.phases if len(self.phases) > 1 or start else [],
            start,
            rescored,
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


def _evaluate(loss, tracker: _Tracker, W: np.ndarray) -> list[float]:
    """Objectives of the rows of W (clipped to the box), recorded; no gradient."""
    W = torch.tensor(np.clip(np.atleast_2d(W), *BOUNDS), dtype=torch.float32)
    with torch.no_grad():
        return tracker.record(W, loss(W))


def _value_and_grad(loss, w: torch.Tensor) -> tuple[float, torch.Tensor]:
    """The loss at w and its gradient: the loss's own (chunked) backward when it has one, else autograd."""
    if hasattr(loss, "value_and_grad"):
        return loss.value_and_grad(w)
    w = w.detach().clone().requires_grad_(True)
    value = loss(w[None])[0]
    if not torch.isfinite(value) or not value.requires_grad:
        return float(value.detach()), torch.zeros_like(w)
    value.backward()
    return float(value.detach()), w.grad.detach()


def _nevergrad(loss, n: int, init: np.ndarray, config: SearchConfig, tracker: _Tracker, budget: int) -> tuple[str, str]:
    import nevergrad as ng

    spec = OPTIMIZERS[config.optimizer]
    parametrization = ng.p.Array(init=init).set_bounds(*BOUNDS)
    parametrization.random_state = np.random.RandomState(config.seed)
    workers = min(config.population, budget) if spec.population else 1
    optimizer = ng.optimizers.registry[spec.nevergrad](
        parametrization=parametrization, budget=budget, num_workers=workers
    )
    try:
        while len(tracker.curve) < budget:
            asked = [optimizer.ask() for _ in range(min(workers, budget - len(tracker.curve)))]
            W = torch.tensor(np.stack([c.value for c in asked]), dtype=torch.float32)
            with torch.no_grad():
                losses = loss(W)
            for candidate, objective in zip(asked, tracker.record(W, losses)):
                optimizer.tell(candidate, objective)
        return _engine_name(optimizer), "budget"
    finally:
        _stop_threads(optimizer)


def _adam(loss, n: int, init: np.ndarray, config: SearchConfig, tracker: _Tracker, budget: int) -> tuple[str, str]:
    w = torch.tensor(init, dtype=torch.float32, requires_grad=True)
    optimizer = torch.optim.Adam([w], lr=config.learning_rate)
    for _ in range(budget):
        optimizer.zero_grad()
        value, grad = _value_and_grad(loss, w.detach())
        tracker.record(w[None], torch.tensor([value]))
        if not np.isfinite(value):
            return "Adam", "nonfinite"  # no gradient to follow from a non-finite point
        (l1_penalty(w, config.l1)).backward()
        w.grad += grad
        optimizer.step()
        with torch.no_grad():
            w.clamp_(*BOUNDS)
    return "Adam", "budget"


SMOOTH = 1e-3  # |w| ~ sqrt(w^2 + SMOOTH^2) for L-BFGS-B: differentiable at 0, within 1e-3 of |w|
NONFINITE = 1e30  # what L-BFGS-B is told at a non-finite loss: a wall its line search backs off from
LBFGS_START = 0.05  # the elementwise delta is quadratic in w: zero gradient at w = 0, so start beside it
FIRST_STEP = 0.25  # the most L-BFGS-B's first step moves one weight (COBYLA's first steps move one weight by 0.5)
PATIENCE = 10  # evaluations without a better objective before L-BFGS-B or the subspace search stops


def _lbfgs(loss, n: int, init: np.ndarray, config: SearchConfig, tracker: _Tracker, budget: int) -> tuple[str, str]:
    """scipy's L-BFGS-B over the box on loss + l1 * mean sqrt(w^2 + SMOOTH^2), with the loss's exact gradient
    (one backward pass through the bank); every call is one evaluation of the budget. The tracker scores
    candidates with the true |w|.

    L-BFGS-B's first step is the raw gradient, which on a few-shot loss of ~100 nats flies to the corners of
    the box: the variables are scaled so that it moves no weight by more than FIRST_STEP. It stops when
    converged or after PATIENCE evaluations without a better objective. A non-finite loss ends L-BFGS-B's
    run (its line search cannot back off from it), so it restarts from the best point with steps 4x shorter."""
    from scipy.optimize import minimize

    def evaluate(x: np.ndarray) -> tuple[float, np.ndarray] | None:
        if len(tracker.curve) >= budget:
            raise _Stop("budget")
        if tracker.since_best() >= PATIENCE:
            raise _Stop("stalled")
        value, grad = _value_and_grad(loss, torch.tensor(x, dtype=torch.float32))
        tracker.record(torch.tensor(x[None]), torch.tensor([value]))
        if not np.isfinite(value):
            return None
        smooth = np.sqrt(x**2 + SMOOTH**2)
        return value + config.l1 * float(smooth.mean()), grad.double().numpy() + config.l1 * x / smooth / n

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
            options={"maxfun": budget, "maxiter": budget},
        )

    start, step = np.asarray(init, dtype=float), FIRST_STEP
    try:
        first = evaluate(start)
        while first is not None and len(tracker.curve) < budget:
            nonfinite = tracker.nonfinite
            run(start, first, step)
            if tracker.nonfinite == nonfinite:
                return "L-BFGS-B", "converged"  # without meeting a non-finite loss: the budget left is not needed
            start, step = np.asarray(tracker.current()[2], dtype=float), step / 4
            first = evaluate(start)
    except _Stop as stop:
        return "L-BFGS-B", stop.reason
    return "L-BFGS-B", "nonfinite" if first is None else "budget"


# --- the subspace search ----------------------------------------------------------------------------

DIRECTIONS = 4  # how many directions of most negative curvature the subspace search spans
LINE_TRIES = 3  # halvings of the line step, from the box's edge, before the line gives up
RHO_BEGIN, RHO_END = 0.5, 0.25  # COBYLA's first and last trust radius in the subspace (unit directions)
FINISH_RHO = 0.1  # the trust radius the fp32 finish restarts COBYLA with
FINISH_STEPS = 4  # fp32 COBYLA evaluations of the finish after a search in another precision


def _curvature(loss, n: int):
    """The second-order model at w = 0: the loss's own (one backward pass) when it has one, else autograd."""
    if hasattr(loss, "curvature"):
        return loss.curvature()
    from .objective import Curvature

    w = torch.zeros(n, dtype=torch.float32, requires_grad=True)
    value = loss(w[None])[0]  # one evaluation: the gradient and each Hessian row are backward passes of it
    if not value.requires_grad:  # a loss that does not depend on w
        return Curvature(float(value), np.zeros(n), np.zeros((n, n)))
    (grad,) = torch.autograd.grad(value, w, create_graph=True)
    rows = [torch.autograd.grad(g, w, retain_graph=True, allow_unused=True)[0] for g in grad]
    hessian = torch.stack([torch.zeros(n) if r is None else r for r in rows])
    return Curvature(float(value.detach()), grad.detach().double().numpy(), hessian.detach().double().numpy())


def directions(curvature, k: int) -> tuple[np.ndarray, np.ndarray | None]:
    """Up to k orthonormal directions (N, k) where the second-order model at 0 falls fastest: the negative
    gradient when it is not zero (linear formula), then the eigenvectors of the Hessian by increasing
    eigenvalue, or without a Hessian the coordinates of largest |gradient|. Also the eigenvalues used."""
    n = len(curvature.gradient)
    columns, eigenvalues = [], None
    if np.linalg.norm(curvature.gradient) > 0:
        columns.append(-curvature.gradient)
    if curvature.hessian is not None:
        eigenvalues, vectors = np.linalg.eigh((curvature.hessian + curvature.hessian.T) / 2)  # ascending
        columns += list(vectors.T)
    else:
        columns += list(np.eye(n)[np.argsort(-np.abs(curvature.gradient), kind="stable")])
    basis = []
    for column in columns:  # Gram-Schmidt: the gradient first, then the others orthogonal to it
        v = column - sum((b @ column) * b for b in basis)
        if np.linalg.norm(v) > 1e-9 * max(1.0, np.linalg.norm(column)):
            basis.append(v / np.linalg.norm(v))
        if len(basis) == min(k, n):
            break
    return np.stack(basis, axis=1), None if eigenvalues is None else eigenvalues[: len(basis)]


def _line(loss, tracker: _Tracker, d: np.ndarray, base_objective: float) -> float:
    """Along d from 0: the step to the box's edge first, halved until the objective is below w = 0's."""
    t = BOUNDS[1] / float(np.abs(d).max())
    for _ in range(LINE_TRIES):
        if tracker.left() <= 0:
            raise _Stop("budget")
        if _evaluate(loss, tracker, t * d)[0] < base_objective:
            return t
        t /= 2
    return 0.0


def _cobyla(loss, tracker: _Tracker, start: np.ndarray, D: np.ndarray, rho: float, budget: int) -> None:
    """scipy's COBYLA over c in the span of D's columns, w = clip(start + D c), from c = 0; returns when its
    trust radius reaches RHO_END, raises _Stop at `budget` evaluations or after PATIENCE without progress."""
    from scipy.optimize import minimize

    known = tracker.current()[0]  # `start` is the best point so far: COBYLA's first call, c = 0, is not repeated

    def objective(c: np.ndarray) -> float:
        if not c.any() and np.isfinite(known):
            return known
        if len(tracker.curve) >= budget:
            raise _Stop("budget")
        if tracker.since_best() >= PATIENCE:
            raise _Stop("stalled")
        value = _evaluate(loss, tracker, start + D @ c)[0]
        return value if np.isfinite(value) else NONFINITE

    minimize(
        objective, np.zeros(D.shape[1]), method="COBYLA", options={"rhobeg": rho, "tol": RHO_END, "maxiter": 10**6}
    )


def _subspace(loss, n: int, init: np.ndarray, config: SearchConfig, tracker: _Tracker, budget: int) -> tuple[str, str]:
    """The default search (docs/compose.md, section 3): one backward pass at w = 0 gives the loss's second-order
    model there, exact for the elementwise formula, whose gradient at 0 is zero; from w = 0 a line along the
    direction of most negative curvature, to the box's edge and back by halves; then COBYLA in the span of the
    DIRECTIONS most negative directions until its trust radius has shrunk from RHO_BEGIN to RHO_END. With a
    warm start `init`, COBYLA starts there and the line is skipped."""
    tracker.phase("curvature")
    curvature = _curvature(loss, n)
    tracker.record(torch.zeros(1, n), torch.tensor([curvature.loss]))
    D, eigenvalues = directions(curvature, DIRECTIONS)
    tracker.directions = D
    tracker.start_point = {
        "method": "curvature",  # the directions: the second-order model at w = 0
        "from": "given" if init.any() else "line",  # the start: a warm start given, or the line's best point
        "directions": D.shape[1],
        "eigenvalues": None if eigenvalues is None else [float(e) for e in eigenvalues],
        "line_step": None,
        "weights": None,
    }
    try:
        if init.any():
            tracker.phase("start")
            _evaluate(loss, tracker, init)
            start = init
        else:
            tracker.phase("line")
            step = _line(loss, tracker, D[:, 0], tracker.current()[0])
            tracker.start_point["line_step"] = step
            start = np.clip(step * D[:, 0], *BOUNDS)
        tracker.start_point["weights"] = [float(x) for x in start]
        tracker.phase("subspace")
        _cobyla(loss, tracker, np.asarray(tracker.current()[2]), D, RHO_BEGIN, budget)
        stop = "converged"
    except _Stop as stopped:
        stop = stopped.reason
    return "curvature + COBYLA", stop


def _finish(fine, tracker: _Tracker, subspace: bool) -> list[float]:
    """After a search in another precision, in fp32: the best TOP candidates re-scored, then (subspace search)
    COBYLA restarted from the best of them with a small radius. Returns the re-scored fp32 objectives."""
    candidates = [w for _, w in tracker.top][: max(0, tracker.left())]
    if not candidates:
        return []
    tracker.phase("finish", "fp32")
    rescored = _evaluate(fine, tracker, np.array(candidates))
    if subspace and tracker.left() > 0:
        try:
            budget = len(tracker.curve) + min(FINISH_STEPS, tracker.left())
            _cobyla(fine, tracker, np.asarray(tracker.current()[2]), tracker.directions, FINISH_RHO, budget)
        except _Stop:
            pass
    return rescored


def search(
    loss: Callable[[torch.Tensor], torch.Tensor],
    n: int,
    config: SearchConfig,
    init: np.ndarray | None = None,
    progress=None,
    *,
    precision: str = "fp32",
    fine: Callable[[], Callable] | None = None,
) -> SearchResult:
    """Minimise loss + l1 * mean|w| over N weights in [-1.5, 1.5]; returns the best candidate seen.

    `precision`: what `loss` evaluates in. When it is not fp32, `fine()` gives the fp32 loss and the search
    ends with an fp32 finish inside its budget (`_finish`); the result is then the best fp32 candidate."""
    init = np.zeros(n) if init is None else np.clip(np.asarray(init, dtype=float), *BOUNDS)
    tracker = _Tracker(config, progress, precision)
    finishing = precision != "fp32" and fine is not None
    subspace = config.optimizer == "subspace"
    reserve = min(TOP + (FINISH_STEPS if subspace else 0), config.budget - 1) if finishing else 0
    run = {"adam": _adam, "lbfgs": _lbfgs, "subspace": _subspace}.get(config.optimizer, _nevergrad)
    if not subspace and finishing:
        tracker.phase("search")
    with quiet_optimizer():
        engine, stop = run(loss, n, init, config, tracker, config.budget - reserve)
        rescored = _finish(fine(), tracker, subspace) if finishing else None
    return tracker.result(engine, stop, tracker.start_point, rescored or None)
