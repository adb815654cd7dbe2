"""EK-FAC's fitted state: the new settings (fisher, modules, layer kinds and groups) survive a
save/restore, and a state saved before the group axis existed (2-D factors) still loads."""

from __future__ import annotations

import torch

from influence_pipeline.influence import BlockState, FittedState, fitted_state, restore_influence

from .ekfac_brute import rel
from .test_ekfac_layers import fitted


def test_round_trip_keeps_settings_and_scores():
    influence, model, _, (x, y), (x_test, y_test) = fitted("cnn", "sampled")
    state = fitted_state(influence)
    assert state.config["fisher"] == "sampled" and state.config["modules"] == influence.modules
    assert {b.attrs["groups"] for b in state.blocks} == {1, 2}
    restored = restore_influence(state, model)
    assert restored.fisher == "sampled" and restored.modules == influence.modules
    scores = influence.influences(x_test, y_test, x, y)
    assert torch.equal(restored.influences(x_test, y_test, x, y), scores)


def test_state_with_two_dimensional_factors_loads():
    model = torch.nn.Sequential(torch.nn.Linear(3, 2)).to(torch.float64)
    evecs_a, evecs_g = torch.eye(4, dtype=torch.float64), torch.eye(2, dtype=torch.float64)
    diag = torch.ones(2, 4, dtype=torch.float64)
    block = BlockState(
        "0",
        ["0.weight", "0.bias"],
        {"regularization": 0.0, "in_features": 3, "out_features": 2, "has_bias": True},
        {"evecs_a": evecs_a, "evecs_g": evecs_g, "diag": diag},
    )
    config = {"update_diagonal": True, "hessian_regularization": 0.0, "progress": False}
    state = FittedState("EkfacInfluence", config, "torch.nn.functional.cross_entropy", [block])
    influence = restore_influence(state, model)
    x, y = torch.randn(3, 3, dtype=torch.float64), torch.tensor([0, 1, 1])
    # identity curvature: factors are the gradients, scores their inner products
    grads = influence.influence_factors(x, y)
    assert rel(influence.influences(x, y), grads @ grads.T) < 1e-12
