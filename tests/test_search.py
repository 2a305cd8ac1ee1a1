"""The weight search on synthetic losses: budgets, populations, bounds, non-finite losses, warm starts."""

import numpy as np
import pytest
import torch

from lorahub_cli.compose.search import BOUNDS, OPTIMIZERS, SearchConfig, search
from lorahub_cli.errors import InputError

TARGET = torch.tensor([0.8, -0.5, 0.3, 0.0, -1.2])


def quadratic(calls):
    def loss_fn(W):
        calls.append(W.shape[0])
        return ((W - TARGET) ** 2).sum(dim=1)

    return loss_fn


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_budget_population_and_bounds(name):
    calls = []
    config = SearchConfig(optimizer=name, budget=30, l1=0.0, seed=0, population=6, learning_rate=0.1)
    result = search(quadratic(calls), 5, config)
    assert result.evaluations == sum(calls) == len(result.curve)
    # L-BFGS-B and the subspace search stop when converged (on a quadratic, well before 30); the others spend it.
    early = name in ("lbfgs", "subspace")
    assert result.evaluations < 30 if early else result.evaluations == 30
    assert result.stop == ("converged" if early else "budget")
    if OPTIMIZERS[name].population:
        assert calls == [6] * 5, "a population is evaluated in one call"
    else:
        assert set(calls) == {1}
    assert all(BOUNDS[0] <= w <= BOUNDS[1] for w in result.weights)
    best = min(c["objective"] for c in result.curve)
    assert result.objective == best == result.curve[-1]["best"]
    assert result.objective == pytest.approx(float(((torch.tensor(result.weights) - TARGET) ** 2).sum()), rel=1e-6)


def test_gradient_free_and_adam_both_improve_on_the_start():
    for name in ("ngopt", "adam", "cma", "lbfgs"):
        result = search(quadratic([]), 5, SearchConfig(optimizer=name, budget=60, l1=0.0, seed=1, learning_rate=0.1))
        assert result.objective < 0.5 * float((TARGET**2).sum()), name


def test_l1_is_on_mean_absolute_weight():
    result = search(
        lambda W: torch.zeros(W.shape[0]),
        4,
        SearchConfig(optimizer="ngopt", budget=1, l1=0.05),
        init=np.array([1.0, -1.0, 0.5, 0.5]),
    )
    assert result.curve[0]["objective"] == pytest.approx(0.05 * 0.75)


def test_ngopt_starts_at_init_and_is_deterministic():
    runs = [search(quadratic([]), 5, SearchConfig(optimizer="ngopt", budget=12, seed=3)) for _ in range(2)]
    assert runs[0].weights == runs[1].weights
    assert runs[0].curve[0]["loss"] == pytest.approx(float((TARGET**2).sum())), "the first candidate is w = 0"
    warm = search(quadratic([]), 5, SearchConfig(optimizer="ngopt", budget=1), init=TARGET.numpy())
    assert warm.loss == pytest.approx(0.0, abs=1e-12)
    assert "Cobyla" in runs[0].engine


def test_non_finite_losses_count_as_infinite():
    def sometimes_nan(W):
        losses = (W**2).sum(dim=1)
        losses[W[:, 0] > 0] = float("nan")
        return losses

    result = search(sometimes_nan, 3, SearchConfig(optimizer="random", budget=40, seed=0))
    assert result.nonfinite > 0 and np.isfinite(result.objective)
    assert result.weights[0] <= 0
    assert any(c["loss"] == float("inf") for c in result.curve)


def test_bad_settings():
    with pytest.raises(InputError, match="optimizer 'sgd' is not known"):
        SearchConfig(optimizer="sgd")
    with pytest.raises(InputError, match="budget 0 is too small"):
        SearchConfig(budget=0)


def test_lbfgs_stays_in_the_box_applies_l1_and_is_deterministic():
    far = torch.tensor([3.0, -2.5, 0.01, -0.02, 0.9])  # two optima outside the box, two inside the L1 dead zone

    def loss_fn(W):
        return ((W - far) ** 2).sum(dim=1)

    config = SearchConfig(optimizer="lbfgs", budget=40, l1=0.5, seed=0)
    runs = [search(loss_fn, 5, config, init=np.full(5, 0.05)) for _ in range(2)]
    assert runs[0].weights == runs[1].weights and runs[0].curve == [
        {**c, "seconds": runs[0].curve[i]["seconds"]} for i, c in enumerate(runs[1].curve)
    ], "deterministic"
    w = runs[0].weights
    assert (w[0], w[1]) == (BOUNDS[1], BOUNDS[0]), "the optimum beyond the box ends on its bound"
    # With l1 = 0.5 on mean |w| (0.1 per weight), the small targets are pulled to 0 (within the smoothing).
    assert abs(w[2]) < 2e-3 and abs(w[3]) < 2e-3
    assert w[4] == pytest.approx(0.9 - 0.05, abs=2e-3), "d/dw (w - 0.9)^2 + 0.1 |w| = 0 at w = 0.85"
    # What is recorded and returned is the true objective, with |w| (not the smoothed one).
    assert runs[0].objective == pytest.approx(
        float(loss_fn(torch.tensor([w]))[0]) + 0.5 * float(np.mean(np.abs(w))), rel=1e-9
    )


def test_lbfgs_backs_off_from_non_finite_losses_and_keeps_its_budget():
    calls = []

    def cliff(W):
        calls.append(W.shape[0])
        losses = ((W - TARGET) ** 2).sum(dim=1)
        losses[W[:, 0] > 0.4] = float("nan")  # the way to TARGET[0] = 0.8 crosses a NaN region
        return losses

    result = search(cliff, 5, SearchConfig(optimizer="lbfgs", budget=25, l1=0.0))
    assert result.nonfinite > 0 and np.isfinite(result.objective) and result.weights[0] <= 0.4
    assert any(c["loss"] == float("inf") for c in result.curve)
    assert result.objective < float((TARGET**2).sum()), "it still improved on the start"
    assert sum(calls) == result.evaluations <= 25
    short = search(quadratic([]), 5, SearchConfig(optimizer="lbfgs", budget=2, l1=0.0))
    assert short.evaluations == 2, "the budget is a hard limit"
