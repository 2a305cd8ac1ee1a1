"""The weight search on synthetic losses: budgets, populations, bounds, non-finite losses, warm starts."""

import numpy as np
import pytest
import torch

from lorahub_cli.compose.recipe import STOPS
from lorahub_cli.compose.search import BOUNDS, OPTIMIZERS, RHO_END, SearchConfig, search
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


def strip_seconds(curve):
    return [{k: v for k, v in c.items() if k != "seconds"} for c in curve]


def test_subspace_starts_from_the_curvature_and_converges_before_its_budget():
    calls = []
    result = search(quadratic(calls), 5, SearchConfig(optimizer="subspace", budget=40, l1=0.0))
    start = result.start
    assert result.stop == "converged" and result.evaluations == sum(calls) < 40
    assert start["method"] == "curvature" and start["from"] == "line" and start["line_step"] > 0
    # The quadratic's gradient at 0 is -2 TARGET: the line runs along TARGET to the box's edge.
    np.testing.assert_allclose(start["weights"], (TARGET / TARGET.abs().max() * 1.5).tolist(), atol=1e-6)
    assert [p["phase"] for p in result.phases] == ["curvature", "line", "subspace"]
    assert sum(p["evaluations"] for p in result.phases) == result.evaluations
    # Converged: COBYLA's last trust radius is RHO_END per direction, so the answer is within a few of them.
    assert float(np.linalg.norm(np.array(result.weights) - TARGET.numpy())) < 2 * RHO_END
    again = search(quadratic([]), 5, SearchConfig(optimizer="subspace", budget=40, l1=0.0))
    assert again.weights == result.weights and strip_seconds(again.curve) == strip_seconds(result.curve)


def test_the_curvature_of_an_elementwise_like_loss_picks_its_most_negative_direction():
    # L(w) = 10 - (v.w)^2 + |w|^4: zero gradient at 0, Hessian -2 v v^T: the line must run along +-v.
    v = torch.tensor([0.6, 0.0, -0.8, 0.0])

    def loss_fn(W):
        return 10 - (W @ v) ** 2 + (W**2).sum(dim=1) ** 2

    result = search(loss_fn, 4, SearchConfig(optimizer="subspace", budget=30, l1=0.0))
    assert result.start["eigenvalues"][0] == pytest.approx(-2.0, rel=1e-5)
    direction = np.array(result.start["weights"]) / np.linalg.norm(result.start["weights"])
    assert abs(direction @ v.numpy()) == pytest.approx(1.0, abs=1e-6)
    assert result.objective < 10 - 0.2  # the minimum, 9.75 at |v.w| = 1/sqrt(2), is well below the start


@pytest.mark.parametrize("name", ["subspace", "lbfgs"])
def test_a_flat_objective_stops_early_and_says_why(name):
    calls = []

    def flat(W):
        calls.append(W.shape[0])
        return torch.full((W.shape[0],), 3.0)

    result = search(flat, 6, SearchConfig(optimizer=name, budget=40, l1=0.05))
    assert result.stop in ("converged", "stalled") and result.evaluations == sum(calls) < 40
    assert result.objective == pytest.approx(3.0 + 0.05 * float(np.abs(result.weights).mean()))


def noisy(W):
    """A blurred version of the quadratic, as a cheaper precision would see it."""
    return ((W - TARGET) ** 2).sum(dim=1) + 0.05 * torch.sin(40 * W).sum(dim=1)


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
@pytest.mark.parametrize("budget", [1, 2, 3, 5, 8, 13])
def test_a_budget_is_never_exceeded_with_or_without_an_fp32_finish(name, budget):
    for finish in (False, True):
        calls = []

        def counted(W, calls=calls):
            calls.append(W.shape[0])
            return noisy(W)

        fine = quadratic(calls)
        kwargs = {"precision": "bf16", "fine": lambda fine=fine: fine} if finish else {}
        config = SearchConfig(optimizer=name, budget=budget, l1=0.0, population=4, seed=0)
        result = search(counted, 5, config, **kwargs)
        assert result.evaluations == sum(calls) == len(result.curve) <= budget, (finish, result.stop)
        assert result.stop in STOPS


def test_the_fp32_finish_decides_the_answer():
    calls = []
    config = SearchConfig(optimizer="subspace", budget=40, l1=0.0)
    result = search(noisy, 5, config, precision="bf16", fine=lambda: quadratic(calls))
    finish = [p for p in result.phases if p["phase"] == "finish"]
    assert finish and finish[0]["precision"] == "fp32" and sum(calls) == finish[0]["evaluations"]
    assert result.precision == "fp32" and result.rescored is not None and len(result.rescored) >= 1
    # The answer is the best fp32-evaluated candidate, its value the exact (fp32) loss.
    assert result.objective == pytest.approx(float(((torch.tensor(result.weights) - TARGET) ** 2).sum()), rel=1e-6)
    assert result.objective <= min(result.rescored)
    assert result.evaluations <= 40
