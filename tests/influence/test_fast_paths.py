"""The cheap paths of the engine compute exactly what the slow ones did.

* ``all_finite``: one sum instead of an entrywise test, with the entrywise test as the
  fallback when the sum is not finite (a bad entry, or an overflow of finite entries);
* Hessian products (reverse-over-reverse, vectorised over the vectors): a row does not
  depend on the other rows computed with it, bit for bit;
* LiSSA updates in place on the active right-hand sides only: the same recursion as the
  docstring, each right-hand side stopping on its own.
"""

from __future__ import annotations

import pytest
import torch

from influence_pipeline.influence import (
    HessianOperator,
    LissaInfluence,
    TorchBatch,
    TorchGradientProvider,
)
from influence_pipeline.influence.finite import all_finite
from influence_pipeline.influence.lissa import LissaOperator

from .closed_forms import make_problem, rel_error


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64])
def test_all_finite(dtype):
    big = torch.finfo(dtype).max
    assert all_finite(torch.ones(3, 4, dtype=dtype))
    assert all_finite(torch.full((10,), big, dtype=dtype))  # the sum overflows
    assert all_finite(torch.full((4,), big, dtype=dtype) * torch.tensor([1, -1, 1, -1]))
    assert all_finite(torch.zeros(0, dtype=dtype))
    for bad in (float("nan"), float("inf"), float("-inf")):
        t = torch.ones(5, 6, dtype=dtype)
        t[3, 2] = bad
        assert not all_finite(t)
        t[0, 0] = big  # an overflowing sum and a bad entry
        assert not all_finite(t)
    pair = torch.tensor([float("inf"), float("-inf")], dtype=dtype)  # sums to NaN
    assert not all_finite(pair)
    assert all_finite(torch.arange(5))


def test_huge_finite_gradients_are_accepted():
    model = torch.nn.Linear(3, 1, bias=False).double()
    with torch.no_grad():
        model.weight.fill_(1e300)
    gp = TorchGradientProvider(model, lambda out, y: out.sum())  # ∇ = x: finite
    x = torch.full((4, 3), 1e300, dtype=torch.float64)  # but their sum overflows
    assert torch.equal(gp.flat_grads(TorchBatch(x, torch.zeros(4))), x)


@pytest.mark.parametrize("kind", ["linear", "logistic"])
def test_hessian_rows_do_not_depend_on_the_other_rows(kind):
    problem = make_problem(kind)
    gp = TorchGradientProvider(problem.model, problem.loss)
    batch = TorchBatch(problem.x[:17], problem.y[:17])
    V = torch.randn(6, problem.n_parameters, dtype=torch.float64)
    together = gp.hessian_prod_sum(batch, V)
    alone = torch.cat([gp.hessian_prod_sum(batch, V[i : i + 1]) for i in range(6)])
    assert torch.equal(together, alone)
    op = HessianOperator(problem.model, problem.loss, [(problem.x, problem.y)])
    assert rel_error(op.apply(V), V @ problem.hessian()) < 1e-12


def test_hessian_of_a_loss_linear_in_the_parameters_is_zero():
    model = torch.nn.Linear(3, 2).double()
    gp = TorchGradientProvider(model, lambda out, y: (out * y).sum())
    x, y = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 2, dtype=torch.float64)
    V = torch.randn(3, gp.n_parameters, dtype=torch.float64)
    assert torch.equal(gp.hessian_prod_sum(TorchBatch(x, y), V), torch.zeros_like(V))


@pytest.mark.parametrize(("dampen", "lam"), [(0.0, 0.0), (0.0, 0.05), (0.02, 0.05)])
def test_lissa_is_the_documented_recursion(dampen, lam):
    """With one full batch: h ← v + (1 − d)h − (A + λI)h/s, h₀ = v, result h/s."""
    problem = make_problem("logistic")
    scale, steps = 3.0, 25
    op = LissaOperator(
        HessianOperator(problem.model, problem.loss, [(problem.x, problem.y)]),
        regularization=lam or None,
        maxiter=steps,
        dampen=dampen,
        scale=scale,
        rtol=0.0,
        warn_on_max_iteration=False,
    )
    v = problem.grads(problem.x[:7], problem.y[:7])
    A = problem.hessian() + lam * torch.eye(problem.n_parameters, dtype=torch.float64)
    h = v.clone()
    for _ in range(steps):
        h = v + (1 - dampen) * h - h @ A / scale
    assert rel_error(op.apply(v), h / scale) < 1e-13
    assert op.last_iterations == steps


def test_lissa_right_hand_sides_stop_at_different_iterations():
    """The compacted active set gives every right-hand side the result it has alone."""
    problem = make_problem("logistic")
    model = LissaInfluence(
        problem.model, problem.loss, regularization=0.5, scale=3.0, rtol=1e-9, seed=0
    ).fit([(problem.x, problem.y)])  # one full batch: every right-hand side converges
    op = model.block_mapper[""].op
    x, y = problem.x[:6], problem.y[:6]
    v = torch.cat([problem.grads(x, y), 1e-3 * problem.grads(x[:2], y[:2]) + 1.0])
    stops = []
    for row in v:
        op.apply(row[None])
        stops.append(op.last_iterations)
    assert len(set(stops)) >= 3  # they do stop at different iterations
    together = op.apply(v)
    assert op.last_iterations == max(stops)
    alone = torch.cat([op.apply(row[None]) for row in v])
    assert torch.equal(together, alone)
