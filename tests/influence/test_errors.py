"""Bad input gets a clear ValueError/TypeError that names the problem."""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from influence_pipeline.influence import (
    ArnoldiInfluence,
    BlockMode,
    CgInfluence,
    DirectInfluence,
    DirectSolveOperator,
    InverseHarmonicMeanInfluence,
    NotFittedException,
    NystroemSketchInfluence,
    TorchBatch,
    TorchGradientProvider,
)

from .closed_forms import make_problem


@pytest.fixture
def problem():
    return make_problem("logistic", n=20)


def loader(problem):
    return DataLoader(TensorDataset(problem.x, problem.y), batch_size=8)


def test_mismatched_batch_lengths_name_both_shapes():
    with pytest.raises(ValueError, match=r"x\.shape=\(5, 3\) and y\.shape=\(4,\)"):
        TorchBatch(torch.zeros(5, 3), torch.zeros(4))
    with pytest.raises(TypeError, match=r"TorchBatch\.y must be a torch\.Tensor"):
        TorchBatch(torch.zeros(5, 3), [0, 1, 2, 3, 4])


def test_influences_with_mismatched_lengths(problem):
    model = DirectInfluence(problem.model, problem.loss, 0.1).fit(loader(problem))
    with pytest.raises(ValueError, match="same first"):
        model.influences(problem.x[:3], problem.y[:2])
    with pytest.raises(ValueError, match="same first"):
        model.influences(problem.x[:3], problem.y[:3], problem.x[:5], problem.y[:4])


def test_wrong_trailing_dimension(problem):
    model = DirectInfluence(problem.model, problem.loss, 0.1).fit(loader(problem))
    op = model.block_mapper[""].op
    with pytest.raises(ValueError, match="trailing dimension of 6, got shape \\(2, 5\\)"):
        op.apply(torch.zeros(2, 5, dtype=torch.float64))
    with pytest.raises(ValueError, match="vector \\(D,\\) or a matrix"):
        op.apply(torch.zeros(2, 2, 6, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"shape \(N, 6\), got \(3, 7\)"):
        model.influences_from_factors(torch.zeros(3, 7, dtype=torch.float64), problem.x, problem.y)
    with pytest.raises(ValueError, match=r"width 4 but the blocks"):
        model.influences_from_factors_by_block(torch.zeros(3, 4), problem.x, problem.y)


def test_unknown_block_and_parameter_names(problem):
    with pytest.raises(ValueError, match=r"unknown parameters \['c.weight'\]"):
        DirectInfluence(
            problem.model, problem.loss, block_structure=OrderedDict(x=["a.weight", "c.weight"])
        )
    with pytest.raises(ValueError, match=r"unknown blocks \['c'\]"):
        DirectInfluence(
            problem.model,
            problem.loss,
            regularization={"c": 0.1},
            block_structure=BlockMode.LAYER_WISE,
        )
    with pytest.raises(ValueError, match="must not overlap"):
        DirectInfluence(
            problem.model,
            problem.loss,
            block_structure=OrderedDict(x=["a.weight"], y=["a.weight", "b.weight"]),
        )
    with pytest.raises(ValueError, match="Unknown parameter names"):
        TorchGradientProvider(problem.model, problem.loss, restrict_to=["nope"])


def test_frozen_parameters_are_excluded(problem):
    problem.model.b.weight.requires_grad_(False)
    model = DirectInfluence(problem.model, problem.loss, block_structure=BlockMode.PARAMETER_WISE)
    assert model.block_names == ["a.weight", "a.bias"]
    with pytest.warns(UserWarning, match="frozen"):
        custom = DirectInfluence(
            problem.model, problem.loss, block_structure=OrderedDict(x=["a.bias", "b.weight"])
        )
    assert custom.parameter_blocks == OrderedDict(x=["a.bias"])


@pytest.mark.parametrize("bad", [-0.1, float("nan"), {"a": -1.0}])
def test_negative_or_invalid_regularization(problem, bad):
    with pytest.raises(ValueError, match="regularization"):
        DirectInfluence(
            problem.model, problem.loss, regularization=bad, block_structure=BlockMode.LAYER_WISE
        )
    model = DirectInfluence(problem.model, problem.loss, 0.1, block_structure=BlockMode.LAYER_WISE)
    with pytest.raises(ValueError, match="regularization"):
        model.with_regularization(bad)


def test_methods_that_need_positive_regularization(problem):
    with pytest.raises(ValueError, match="positive regularization"):
        InverseHarmonicMeanInfluence(problem.model, problem.loss, regularization=None)
    with pytest.raises(ValueError, match="must be positive"):
        NystroemSketchInfluence(problem.model, problem.loss, regularization=0.0, rank=2)
    with pytest.raises(ValueError, match="positive regularization"):
        ArnoldiInfluence(problem.model, problem.loss, regularization=None, use_woodbury=True)


def test_non_finite_loss_or_gradients(problem):
    x = problem.x.clone()
    x[3, 1] = float("nan")
    data = DataLoader(TensorDataset(x, problem.y), batch_size=8)
    with pytest.raises(ValueError, match=r"not finite|NaN"):
        DirectInfluence(problem.model, problem.loss, 0.1).fit(data)
    model = DirectInfluence(problem.model, problem.loss, 0.1).fit(loader(problem))
    with pytest.raises(
        ValueError, match=r"Non-finite gradients for samples at batch positions \[3\]"
    ):
        model.influence_factors(x[:5], problem.y[:5])
    with pytest.raises(ValueError, match="batch 0 of the fit data are not finite"):
        CgInfluence(problem.model, problem.loss, 0.1).fit(data).influence_factors(
            problem.x[:2], problem.y[:2]
        )


def test_query_before_fit(problem):
    for model in (
        DirectInfluence(problem.model, problem.loss, 0.1),
        CgInfluence(problem.model, problem.loss, 0.1),
    ):
        with pytest.raises(NotFittedException, match="not fitted: call fit"):
            model.influence_factors(problem.x, problem.y)
        with pytest.raises(NotFittedException):
            model.influences(problem.x, problem.y)
        with pytest.raises(NotFittedException):
            model.influences_from_factors(torch.zeros(1, 6), problem.x, problem.y)
        with pytest.raises(NotFittedException):
            model.self_influences(problem.x, problem.y)
        assert not model.is_fitted


def test_x_without_y(problem):
    model = DirectInfluence(problem.model, problem.loss, 0.1).fit(loader(problem))
    with pytest.raises(ValueError, match="Inputs x were given without labels y"):
        model.influences(problem.x[:2], problem.y[:2], problem.x)
    with pytest.raises(ValueError, match="Labels y were given without inputs x"):
        model.influences(problem.x[:2], problem.y[:2], None, problem.y)


def test_bad_data_loaders(problem):
    with pytest.raises(ValueError, match="yielded no batches"):
        DirectInfluence(problem.model, problem.loss, 0.1).fit([])
    with pytest.raises(TypeError, match=r"\(x, y\) pairs"):
        DirectInfluence(problem.model, problem.loss, 0.1).fit([problem.x])
    with pytest.raises(TypeError, match="iterable data loader"):
        DirectInfluence(problem.model, problem.loss, 0.1).fit(None)


def test_singular_curvature_without_regularization():
    matrix = torch.zeros(3, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match="singular: set a positive regularization"):
        DirectSolveOperator(matrix)


def test_loss_must_be_per_sample_scalar(problem):
    def no_reduction(output, target):
        return torch.nn.functional.binary_cross_entropy_with_logits(
            output, target, reduction="none"
        ).repeat(1, 2)

    gp = TorchGradientProvider(problem.model, no_reduction)
    with pytest.raises(ValueError, match="one number per sample"):
        gp.flat_grads(TorchBatch(problem.x, problem.y))
