"""Retraining helpers: the digits trainer's checkpoints and determinism, the long table of
retrained losses and its (n_test, M) view."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from influence_pipeline.examples.digits_memorizing import (
    TrainingSettings,
    retrainer,
    train_digits_mlp,
)
from influence_pipeline.quality import sample_subsets
from influence_pipeline.quality.report import actual_losses, retrain_subsets
from influence_pipeline.workload import ShardData

TINY = TrainingSettings(epochs=6, lr=0.05, weight_decay=0.0, hidden=4)


def _data(n: int, seed: int) -> ShardData:
    generator = torch.Generator().manual_seed(seed)
    return ShardData(
        torch.rand(n, 64, generator=generator),
        torch.randint(0, 10, (n,), generator=generator),
        torch.arange(n) + 100 * seed,
    )


def test_train_digits_mlp_saves_checkpoints_and_is_seeded() -> None:
    data = _data(30, 0)
    model, saved = train_digits_mlp(data.x, data.y, 3, TINY, save_at=(2, 6))
    assert sorted(saved) == [2, 6]
    for name, value in model.state_dict().items():
        torch.testing.assert_close(saved[6][name], value)  # the last save is the final model
    assert not torch.equal(saved[2]["0.weight"], saved[6]["0.weight"])
    again = retrainer(TINY)(data.x, data.y, 3)
    torch.testing.assert_close(again.state_dict()["2.bias"], model.state_dict()["2.bias"])
    other = retrainer(TINY)(data.x, data.y, 4)
    assert not torch.equal(other.state_dict()["2.bias"], model.state_dict()["2.bias"])
    with pytest.raises(ValueError, match=r"x must be \(n, 64\) and y \(n,\)"):
        train_digits_mlp(data.x, data.y[:5], 0, TINY)


def test_retrain_subsets_long_table_round_trips() -> None:
    train, test = _data(40, 0), _data(7, 1)
    masks = sample_subsets(len(train), 4, 0.5, seed=0)
    retrain = retrainer(TINY)
    parts = [
        retrain_subsets(
            retrain, train, test, masks, subsets, (0, 1), torch.nn.functional.cross_entropy
        )
        for subsets in ([0, 2], [1, 3])
    ]
    long = pd.concat(parts, ignore_index=True)
    assert list(long.columns) == ["subset", "seed", "test_id", "loss"] and len(long) == 4 * 2 * 7
    wide = actual_losses(long, 1, 4, test.ids.numpy()[::-1].copy())
    assert wide.shape == (7, 4)
    # one entry recomputed by hand: subset 2, seed 1, the last test point (first row here)
    model = retrain(train.x[torch.from_numpy(masks[2])], train.y[torch.from_numpy(masks[2])], 1)
    with torch.no_grad():
        expected = torch.nn.functional.cross_entropy(model(test.x[-1:]), test.y[-1:]).item()
    assert wide[0, 2] == pytest.approx(expected, rel=1e-5)
    with pytest.raises(ValueError, match=r"miss subsets \[1, 3\]"):
        actual_losses(parts[0], 0, 4, test.ids.numpy())
    with pytest.raises(ValueError, match=r"masks must be \(M, n_train = 40\)"):
        retrain_subsets(
            retrain, train, test, masks[:, :10], [0], (0,), torch.nn.functional.cross_entropy
        )


def test_checkpoint_loss_is_the_mean_over_checkpoints(tmp_path: Path) -> None:
    from influence_pipeline.quality.mislabel import checkpoint_loss, per_sample_losses

    data = _data(12, 0)
    _, saved = train_digits_mlp(data.x, data.y, 0, TINY, save_at=(1, 6))
    paths = []
    for epoch, state in saved.items():
        paths.append(tmp_path / f"epoch-{epoch}.pt")
        torch.save(state, paths[-1])

    def factory() -> torch.nn.Module:
        from influence_pipeline.examples.digits import make_model

        return make_model(TINY.hidden)

    expected = []
    for state in saved.values():
        model = factory()
        model.load_state_dict(state)
        expected.append(per_sample_losses(model, torch.nn.functional.cross_entropy, data.x, data.y))
    got = checkpoint_loss(factory, paths, torch.nn.functional.cross_entropy, data.x, data.y, 5)
    np.testing.assert_allclose(got, np.mean(expected, axis=0), rtol=1e-6)
    with pytest.raises(ValueError, match="checkpoints is empty"):
        checkpoint_loss(factory, [], torch.nn.functional.cross_entropy, data.x, data.y)
