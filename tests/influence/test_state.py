"""Fitted state round trip: JSON attributes + tensors rebuild the same method.

The stored tensors come back bit for bit (no arithmetic involved). Influences computed from
them agree to a stated tolerance, never asserted bit-equal: the restored tensors may reach
BLAS through another memory layout or thread split than the live ones on some machines.
"""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from influence_pipeline.influence import (
    ArnoldiInfluence,
    BlockMode,
    CgInfluence,
    DirectInfluence,
    EkfacInfluence,
    InverseHarmonicMeanInfluence,
    JacobiPreconditioner,
    LissaInfluence,
    NotFittedException,
    NystroemPreconditioner,
    NystroemSketchInfluence,
    SecondOrderMode,
    fitted_state,
    restore_influence,
)


def problem():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(40, 5, generator=gen)
    y = torch.randint(0, 3, (40,), generator=gen)
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(5, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3))
    return net, x, y


def methods(net):
    loss = F.cross_entropy
    return {
        "direct": DirectInfluence(
            net, loss, {"0": 0.5, "2": None}, block_structure=BlockMode.LAYER_WISE
        ),
        "cg_jacobi": CgInfluence(net, loss, 0.5, preconditioner=JacobiPreconditioner(2, seed=1)),
        "cg_nystroem_block": CgInfluence(
            net,
            loss,
            0.5,
            preconditioner=NystroemPreconditioner(4, seed=1),
            solve_simultaneously=True,
        ),
        "lissa": LissaInfluence(
            net, loss, 0.5, maxiter=30, scale=20.0, warn_on_max_iteration=False
        ),
        "arnoldi": ArnoldiInfluence(
            net,
            loss,
            0.5,
            rank=5,
            use_woodbury=True,
            second_order_mode=SecondOrderMode.GAUSS_NEWTON,
        ),
        "nystroem": NystroemSketchInfluence(
            net, loss, 0.5, rank=5, block_structure=OrderedDict(w=["0.weight", "2.weight"])
        ),
        "ihm": InverseHarmonicMeanInfluence(net, loss, 0.5),
        "ekfac": EkfacInfluence(net, update_diagonal=True, hessian_regularization=0.5),
    }


def _assert_states_equal(a, b):
    assert a.method == b.method and a.config == b.config and a.loss == b.loss
    assert [(blk.name, blk.parameters, blk.attrs) for blk in a.blocks] == [
        (blk.name, blk.parameters, blk.attrs) for blk in b.blocks
    ]
    for left, right in zip(a.blocks, b.blocks, strict=True):
        assert left.tensors.keys() == right.tensors.keys()
        for key in left.tensors:
            assert torch.equal(left.tensors[key], right.tensors[key]), (left.name, key)


@pytest.mark.parametrize("name", list(methods(problem()[0])))
def test_round_trip_restores_the_state_exactly(name):
    net, x, y = problem()
    net = net.double()
    x = x.double()
    loader = DataLoader(TensorDataset(x, y), batch_size=16)
    model = methods(net)[name].fit(loader)
    state = fitted_state(model)
    assert state.method == type(model).__name__
    restored = restore_influence(state, net, data=loader)  # loss resolved by name
    assert type(restored) is type(model)
    assert restored.block_names == model.block_names
    # the state itself: bit for bit
    _assert_states_equal(fitted_state(restored), state)
    # what is computed from it: float64 round-off only (1e-10 relative to the largest score)
    expected = model.influences(x[:4], y[:4], x, y)
    scale = expected.abs().max()
    torch.testing.assert_close(
        restored.influences(x[:4], y[:4], x, y), expected, rtol=0, atol=1e-10 * scale
    )
    factors = model.influence_factors(x[:4], y[:4])
    torch.testing.assert_close(
        restored.influence_factors(x[:4], y[:4]),
        factors,
        rtol=0,
        atol=1e-10 * factors.abs().max(),
    )


def test_restore_refuses_other_models_and_missing_data():
    net, x, y = problem()
    loader = DataLoader(TensorDataset(x, y), batch_size=16)
    state = fitted_state(DirectInfluence(net, F.cross_entropy, 0.1).fit(loader))
    other = torch.nn.Sequential(torch.nn.Linear(5, 3))
    with pytest.raises(ValueError, match="fitted for another model"):
        restore_influence(state, other)
    cg_state = fitted_state(CgInfluence(net, F.cross_entropy, 0.1).fit(loader))
    with pytest.raises(ValueError, match="pass the training data loader"):
        restore_influence(cg_state, net)
    with pytest.raises(NotFittedException):
        fitted_state(DirectInfluence(net, F.cross_entropy, 0.1))
    custom_loss_state = fitted_state(
        DirectInfluence(net, lambda o, t: F.cross_entropy(o, t), 0.1).fit(loader)
    )
    with pytest.raises(ValueError, match="pass that loss"):
        restore_influence(custom_loss_state, net)
