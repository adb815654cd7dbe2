"""Influence factors of all blocks come from one forward and backward pass per batch.

The factors of block B are A_B⁻¹ g_B with g_B the block's slice of the per-sample gradient;
computing the whole gradient once and slicing it must give what one gradient pass per
block gives (float64, to rounding), and the per-sample gradients must be computed once,
not once per block.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from influence_pipeline.influence import (
    ArnoldiInfluence,
    BlockMode,
    CgInfluence,
    DirectInfluence,
    TorchBatch,
    TorchGradientProvider,
)

from .closed_forms import rel_error


def _mlp() -> torch.nn.Sequential:
    torch.manual_seed(1)
    return torch.nn.Sequential(
        torch.nn.Linear(4, 5),
        torch.nn.Tanh(),
        torch.nn.Linear(5, 3),
        torch.nn.Tanh(),
        torch.nn.Linear(3, 2),
    ).double()


def _build(name: str, model: torch.nn.Module) -> torch.nn.Module:
    loss = F.cross_entropy
    if name == "direct":
        return DirectInfluence(model, loss, 0.1, block_structure=BlockMode.LAYER_WISE)
    if name == "cg":
        return CgInfluence(
            model,
            loss,
            0.1,
            block_structure=BlockMode.LAYER_WISE,
            rtol=1e-10,
            atol=1e-12,
            solve_simultaneously=True,
        )
    return ArnoldiInfluence(model, loss, 0.1, rank=6, block_structure=BlockMode.LAYER_WISE)


@pytest.mark.parametrize("name", ["direct", "cg", "arnoldi"])
def test_factors_equal_the_per_block_path_with_one_gradient_pass(name, monkeypatch):
    model = _mlp()
    x = torch.randn(30, 4, dtype=torch.float64)
    y = torch.randint(0, 2, (30,))
    influence = _build(name, model).fit([(x[:16], y[:16]), (x[16:], y[16:])])
    x_test, y_test = x[:7], y[:7]

    calls = []
    original = TorchGradientProvider.flat_grads

    def counted(self, batch):
        calls.append(len(batch))
        return original(self, batch)

    monkeypatch.setattr(TorchGradientProvider, "flat_grads", counted)
    by_block = influence.influence_factors_by_block(x_test, y_test)
    factors = influence.influence_factors(x_test, y_test)
    monkeypatch.undo()
    assert calls == [7, 7]  # one gradient pass per call, whatever the number of blocks (3)

    batch = TorchBatch(x_test, y_test)
    per_block = {
        block: composition.op.apply(composition.gp.flat_grads(batch))
        for block, composition in influence.block_mapper.items()
    }
    assert list(by_block) == list(per_block) == ["0", "2", "4"]
    for block, expected in per_block.items():
        assert rel_error(by_block[block], expected) < 1e-12
    assert torch.equal(factors, torch.cat(list(by_block.values()), dim=1))

    expected_self = sum(
        (per_block[b] * influence.block_mapper[b].gp.flat_grads(batch)).sum(dim=1)
        for b in per_block
    )
    assert rel_error(influence.self_influences(x_test, y_test), expected_self) < 1e-12
