"""The few-shot loss object against autograd: values, gradients backward-passed a few shots at a time, and the
Hessian at w = 0 from one backward pass (objective.py's formula) against torch's own second derivatives.

Tolerances (float32): Hessian and gradients rtol 1e-4, atol 1e-6 (autograd's double backward sums in another
order); values rtol 1e-6."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tiny_models import KINDS, make_adapters, one_thread, save_tiny_base  # noqa: F401  (one_thread: fixture)

from lorahub_cli.compose.adapters import load_adapter
from lorahub_cli.compose.bank import LoraBank
from lorahub_cli.compose.objective import FewShotLoss, OnColumns, hessian_terms
from lorahub_cli.io import Example
from lorahub_cli.models import encode, load_base_model

pytestmark = pytest.mark.usefixtures("one_thread")
N = 3
SHOTS = [
    Example(input="What is 2 plus 3?", target="5"),
    Example(input="Spell: cat", target="c-a-t"),
    Example(input="Is 7 even?", target="no"),
]


@pytest.fixture(scope="module", params=KINDS)
def problem(request, tmp_path_factory):
    """A tiny base model of each kind with N adapters of one rank in a bank, eager attention (torch's SDPA kernel
    has no double backward, which the autograd Hessian needs), and three encoded shots of unequal lengths."""
    folder = tmp_path_factory.mktemp(request.param)
    model = save_tiny_base(request.param, folder / "base")
    adapters = [load_adapter(p) for p in make_adapters(model, folder / "adapters", N)]
    base = load_base_model(str(folder / "base"), dtype="float32", device="cpu")
    base.model.set_attn_implementation("eager")
    bank = LoraBank(base.model, adapters)
    return base, bank, encode(base, SHOTS)


def autograd_loss(problem, formula):
    base, bank, batch = problem
    loss = FewShotLoss(base, bank, batch, mode=formula)
    return loss, (lambda w: loss(w[None])[0])


def test_the_curvature_is_the_exact_hessian_at_zero(problem):
    loss, f = autograd_loss(problem, "elementwise")
    curvature = loss.curvature()
    zero = torch.zeros(N)
    expected = torch.autograd.functional.hessian(f, zero).double().numpy()
    np.testing.assert_allclose(curvature.hessian, expected, rtol=1e-4, atol=1e-6)
    assert np.abs(expected).max() > 1e-3, "the test adapters move the loss"
    assert curvature.loss == pytest.approx(float(f(zero)), rel=1e-6)
    assert not curvature.gradient.any(), "the elementwise gradient at w = 0 is exactly zero"
    # The quadratic model predicts the loss near 0 to second order (the next term is quartic in w).
    w = torch.tensor([0.02, -0.01, 0.015])
    predicted = curvature.loss + 0.5 * float(w.double() @ torch.from_numpy(curvature.hessian) @ w.double())
    assert float(f(w)) == pytest.approx(predicted, abs=1e-5 + 1e-3 * abs(predicted - curvature.loss))


def test_the_linear_formula_gives_its_gradient_and_no_hessian(problem):
    loss, f = autograd_loss(problem, "linear")
    curvature = loss.curvature()
    zero = torch.zeros(N, requires_grad=True)
    (expected,) = torch.autograd.grad(f(zero), zero)
    np.testing.assert_allclose(curvature.gradient, expected.double().numpy(), rtol=1e-4, atol=1e-7)
    assert curvature.hessian is None and np.abs(curvature.gradient).max() > 1e-4


@pytest.mark.parametrize("formula", ["elementwise", "linear"])
@pytest.mark.parametrize("grad_rows", [1, 2, 3])
def test_the_gradient_is_autograds_whatever_shots_a_backward_pass_holds(problem, grad_rows, formula):
    base, bank, batch = problem
    w = torch.tensor([0.7, -0.4, 0.2])
    loss = FewShotLoss(base, bank, batch, mode=formula, grad_rows=grad_rows)
    value, grad = loss.value_and_grad(w)
    x = w.clone().requires_grad_(True)
    (expected,) = torch.autograd.grad(loss(x[None])[0], x)
    assert value == pytest.approx(float(loss(w[None])[0]), rel=1e-6)
    torch.testing.assert_close(grad, expected, rtol=1e-4, atol=1e-6)


def test_on_columns_is_the_wide_loss_with_zeros_and_a_restricted_curvature(problem):
    loss, _ = autograd_loss(problem, "elementwise")
    narrow = OnColumns(loss, [2, 0])
    W = torch.tensor([[0.5, -1.0], [0.25, 0.75]])
    wide = torch.tensor([[-1.0, 0.0, 0.5], [0.75, 0.0, 0.25]])
    torch.testing.assert_close(narrow(W), loss(wide), rtol=0, atol=0)
    full, restricted = loss.curvature(), narrow.curvature()
    np.testing.assert_array_equal(restricted.hessian, full.hessian[np.ix_([2, 0], [2, 0])])
    value, grad = narrow.value_and_grad(W[0])
    assert value == pytest.approx(float(loss(wide[:1])[0]), rel=1e-6) and grad.shape == (2,)


def test_hessian_terms_by_hand():
    # One token, two adapters of rank 1: H_ij = s (u_i z_j + u_j z_i).
    z = torch.tensor([[[2.0], [3.0]]])  # (T=1, N=2, r=1)
    u = torch.tensor([[[5.0], [7.0]]])
    expected = 0.5 * torch.tensor([[2 * 10.0, 15 + 14], [14 + 15, 2 * 21.0]], dtype=torch.float64)
    torch.testing.assert_close(hessian_terms(z, u, 0.5), expected)


def test_the_base_loss_is_the_curvatures_loss(problem):
    base, bank, batch = problem
    forward = FewShotLoss(base, bank, batch, mode="elementwise").base_loss()  # one forward pass, no bank weights
    loss = FewShotLoss(base, bank, batch, mode="elementwise", grad_rows=1)
    assert loss.curvature().loss == pytest.approx(forward, rel=1e-6) and loss.base_loss() == loss.curvature().loss
    assert forward == pytest.approx(float(loss(torch.zeros(1, N))[0]), rel=1e-6), "w = 0 is the base model"
