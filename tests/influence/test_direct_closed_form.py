"""DirectInfluence against explicit block-diagonal solves of the closed-form curvature."""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from influence_pipeline.influence import BlockMode, DirectInfluence, InfluenceMode, SecondOrderMode

from .closed_forms import block_diagonal_factors, block_indices, make_problem, rel_error

TOL = 1e-10

PARAMS = ["a.weight", "a.bias", "b.weight"]
STRUCTURES = {
    "full": (BlockMode.FULL, {"": PARAMS}),
    "layer_wise": (BlockMode.LAYER_WISE, {"a": PARAMS[:2], "b": PARAMS[2:]}),
    "parameter_wise": (BlockMode.PARAMETER_WISE, {p: [p] for p in PARAMS}),
    # blocks out of model order, and a block that mixes layers
    "custom": (
        OrderedDict(mixed=["b.weight", "a.weight"], rest=["a.bias"]),
        {"mixed": ["a.weight", "b.weight"], "rest": ["a.bias"]},
    ),
}


def loader(problem, batch_size=7):
    return DataLoader(TensorDataset(problem.x, problem.y), batch_size=batch_size)


@pytest.mark.parametrize("kind", ["linear", "logistic"])
@pytest.mark.parametrize("structure", list(STRUCTURES))
@pytest.mark.parametrize("mode", list(SecondOrderMode))
def test_factors_and_influences(kind, structure, mode):
    problem = make_problem(kind)
    block_structure, blocks = STRUCTURES[structure]
    lam = 0.05 if kind == "logistic" else 0.0  # logistic: the L2 penalty α = 0.05
    model = DirectInfluence(
        problem.model,
        problem.loss,
        regularization=lam or None,
        block_structure=block_structure,
        second_order_mode=mode,
    ).fit(loader(problem))
    assert model.block_names == list(blocks)

    matrix = problem.hessian() if mode is SecondOrderMode.HESSIAN else problem.gauss_newton()
    idx = block_indices(problem, blocks)
    reg = {b: lam for b in blocks}
    x_test, y_test = problem.x[:6], problem.y[:6]
    g_test = problem.grads(x_test, y_test)
    expected_factors = block_diagonal_factors(matrix, g_test, idx, reg)
    factors = model.influence_factors(x_test, y_test)
    assert factors.shape == (6, problem.n_parameters)
    assert rel_error(factors, expected_factors) < TOL

    # The factors live in block order; the influences are sums over blocks.
    order = torch.cat(list(idx.values()))
    g_train = problem.grads(problem.x, problem.y)[:, order]
    expected_up = expected_factors @ g_train.T
    assert rel_error(model.influences(x_test, y_test, problem.x, problem.y), expected_up) < TOL

    mixed = problem.mixed_grads(problem.x, problem.y)[:, :, order]
    expected_pert = torch.einsum("ip,jcp->ijc", expected_factors, mixed)
    got_pert = model.influences(
        x_test, y_test, problem.x, problem.y, mode=InfluenceMode.Perturbation
    )
    assert got_pert.shape == (6, 40, problem.d)
    assert rel_error(got_pert, expected_pert) < TOL

    by_block = model.influences_by_block(x_test, y_test, problem.x, problem.y)
    assert list(by_block) == list(blocks)
    for block, value in by_block.items():
        i = idx[block]
        f = block_diagonal_factors(matrix, g_test, {block: i}, reg)
        assert rel_error(value, f @ problem.grads(problem.x, problem.y)[:, i].T) < TOL


@pytest.mark.parametrize("kind", ["linear", "logistic"])
def test_per_block_regularization_dict(kind):
    problem = make_problem(kind)
    reg = {"a": 0.3, "b": None}
    model = DirectInfluence(
        problem.model, problem.loss, regularization=reg, block_structure=BlockMode.LAYER_WISE
    ).fit(loader(problem))
    _, blocks = STRUCTURES["layer_wise"]
    expected = block_diagonal_factors(
        problem.hessian(),
        problem.grads(problem.x[:5], problem.y[:5]),
        block_indices(problem, blocks),
        reg,
    )
    assert rel_error(model.influence_factors(problem.x[:5], problem.y[:5]), expected) < TOL


def test_missing_block_in_dict_gets_no_regularization():
    problem = make_problem("linear")
    model = DirectInfluence(
        problem.model, problem.loss, regularization={"b": 0.2}, block_structure=BlockMode.LAYER_WISE
    )
    assert model.regularization == {"a": None, "b": 0.2}


def test_with_regularization_does_not_refit():
    problem = make_problem("logistic")
    model = DirectInfluence(problem.model, problem.loss, regularization=0.1).fit(loader(problem))
    matrix = model.block_mapper[""].op.matrix
    model.with_regularization(0.7)
    assert model.block_mapper[""].op.matrix is matrix
    expected = block_diagonal_factors(
        problem.hessian(),
        problem.grads(problem.x[:4], problem.y[:4]),
        block_indices(problem, {"": PARAMS}),
        {"": 0.7},
    )
    assert rel_error(model.influence_factors(problem.x[:4], problem.y[:4]), expected) < TOL


def test_sign_convention_helpful_is_positive():
    """Up-weighting a training copy of the test point lowers its loss: positive influence."""
    problem = make_problem("logistic")
    model = DirectInfluence(problem.model, problem.loss, regularization=0.05).fit(loader(problem))
    self_influence = model.self_influences(problem.x, problem.y)
    assert bool((self_influence > 0).all())
