"""Per-sample derivatives and curvature products against closed forms (float64)."""

from __future__ import annotations

import pytest
import torch

from influence_pipeline.influence import (
    GaussNewtonOperator,
    HessianOperator,
    TorchBatch,
    TorchGradientProvider,
)

from .closed_forms import make_problem, rel_error

TOL = 1e-12
KINDS = ["linear", "logistic"]


@pytest.fixture(params=KINDS)
def problem(request):
    return make_problem(request.param)


def batches(problem, sizes):
    out, start = [], 0
    for s in sizes:
        out.append((problem.x[start : start + s], problem.y[start : start + s]))
        start += s
    assert start == problem.x.shape[0]
    return out


def test_per_sample_gradients(problem):
    gp = TorchGradientProvider(problem.model, problem.loss)
    got = gp.flat_grads(TorchBatch(problem.x, problem.y))
    assert got.shape == (40, problem.n_parameters)
    assert rel_error(got, problem.grads(problem.x, problem.y)) < TOL


def test_gradient_dict_is_flat_per_parameter(problem):
    gp = TorchGradientProvider(problem.model, problem.loss)
    grads = gp.grads(TorchBatch(problem.x, problem.y))
    assert list(grads) == [n for n, _ in problem.model.named_parameters()]
    for name, p in problem.model.named_parameters():
        assert grads[name].shape == (40, p.numel())


def test_restricted_gradients_are_the_block_columns(problem):
    gp = TorchGradientProvider(problem.model, problem.loss, restrict_to=["b.weight", "a.bias"])
    got = gp.flat_grads(TorchBatch(problem.x, problem.y))
    full = problem.grads(problem.x, problem.y)
    # the provider keeps the order it is given: b.weight, then a.bias
    k, d_a = problem.k, problem.model.d_a
    a_bias = slice(k * d_a, k * d_a + k)
    b_weight = slice(k * d_a + k, None)
    expected = torch.cat([full[:, b_weight], full[:, a_bias]], dim=1)
    assert rel_error(got, expected) < TOL


def test_mixed_gradients(problem):
    gp = TorchGradientProvider(problem.model, problem.loss)
    got = gp.flat_mixed_grads(TorchBatch(problem.x, problem.y))
    assert got.shape == (40, problem.d, problem.n_parameters)
    assert rel_error(got, problem.mixed_grads(problem.x, problem.y)) < TOL


def test_jacobian_prod(problem):
    gp = TorchGradientProvider(problem.model, problem.loss)
    g = torch.randn(5, problem.n_parameters, dtype=torch.float64)
    got = gp.jacobian_prod(TorchBatch(problem.x, problem.y), g)
    assert got.shape == (40, 5)
    assert rel_error(got, problem.grads(problem.x, problem.y) @ g.T) < TOL


def test_mixed_jacobian_prod(problem):
    gp = TorchGradientProvider(problem.model, problem.loss)
    g = torch.randn(3, problem.n_parameters, dtype=torch.float64)
    got = gp.mixed_jacobian_prod(TorchBatch(problem.x, problem.y), g)
    expected = torch.einsum("ncp,kp->nkc", problem.mixed_grads(problem.x, problem.y), g)
    assert got.shape == (40, 3, problem.d)
    assert rel_error(got, expected) < TOL


@pytest.mark.parametrize("sizes", [[40], [7, 7, 7, 7, 7, 5], [1] * 40])
def test_hessian_products_and_matrix(problem, sizes):
    op = HessianOperator(problem.model, problem.loss, batches(problem, sizes))
    H = problem.hessian()
    V = torch.randn(4, problem.n_parameters, dtype=torch.float64)
    assert rel_error(op.apply(V), V @ H) < TOL
    assert rel_error(op.dense(), H) < TOL
    assert op.n_samples == 40


@pytest.mark.parametrize("sizes", [[40], [13, 13, 14]])
def test_gauss_newton_products_and_matrix(problem, sizes):
    op = GaussNewtonOperator(problem.model, problem.loss, batches(problem, sizes))
    G = problem.gauss_newton()
    V = torch.randn(4, problem.n_parameters, dtype=torch.float64)
    assert rel_error(op.apply(V), V @ G) < TOL
    assert rel_error(op.dense(), G) < TOL


def test_hessian_dict_products(problem):
    op = HessianOperator(problem.model, problem.loss, batches(problem, [40]))
    H = problem.hessian()
    V = torch.randn(2, problem.n_parameters, dtype=torch.float64)
    gp = op.gradient_provider
    as_dict = {
        n: t for n, t in zip(gp.param_names, torch.split(V, gp.param_sizes, dim=1), strict=True)
    }
    out = op.apply_to_dict(as_dict)
    assert rel_error(torch.cat([out[n] for n in gp.param_names], dim=1), V @ H) < TOL


def test_gradients_do_not_touch_model_grad(problem):
    gp = TorchGradientProvider(problem.model, problem.loss)
    gp.flat_grads(TorchBatch(problem.x, problem.y))
    HessianOperator(problem.model, problem.loss, batches(problem, [40])).dense()
    assert all(p.grad is None for p in problem.model.parameters())
