"""LDS on ridge regression: exact influences (the engine's Direct method) against
closed-form retraining on random subsets must rank the subsets almost perfectly."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from influence_pipeline.influence import DirectInfluence
from influence_pipeline.quality import lds, predicted_losses, sample_subsets


def _ridge(x: np.ndarray, y: np.ndarray, n_total: int, lam: float) -> np.ndarray:
    """argmin_w (1/N) Σ_{j∈S} (x_j·w − y_j)² + (λ/2)|w|²  (N = the full training size)."""
    d = x.shape[1]
    return np.linalg.solve((2 / n_total) * x.T @ x + lam * np.eye(d), (2 / n_total) * x.T @ y)


def test_lds_of_exact_influences_on_ridge_regression_is_high() -> None:
    rng = np.random.default_rng(0)
    n, d, n_test, lam = 300, 6, 25, 0.1
    w_true = rng.normal(size=d)
    x = rng.normal(size=(n, d))
    y = x @ w_true + rng.normal(scale=0.5, size=n)
    x_test = rng.normal(size=(n_test, d))
    y_test = x_test @ w_true + rng.normal(scale=0.5, size=n_test)

    model = torch.nn.Linear(d, 1, bias=False).double()
    with torch.no_grad():
        model.weight.copy_(torch.from_numpy(_ridge(x, y, n, lam))[None])
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(torch.from_numpy(x), torch.from_numpy(y)[:, None]),
        batch_size=64,
    )
    influence = DirectInfluence(model, torch.nn.functional.mse_loss, regularization=lam).fit(loader)
    scores = influence.influences(
        torch.from_numpy(x_test),
        torch.from_numpy(y_test)[:, None],
        torch.from_numpy(x),
        torch.from_numpy(y)[:, None],
    ).numpy()  # (n_test, n)

    masks = sample_subsets(n, n_subsets=40, fraction=0.5, seed=1)
    actual = np.stack(
        [(x_test @ _ridge(x[m], y[m], n, lam) - y_test) ** 2 for m in masks], axis=1
    )  # (n_test, M)
    result = lds(actual, predicted_losses(scores, masks), n_bootstrap=200)
    assert result.mean > 0.95
    assert result.low <= result.mean <= result.high
    # a prediction that ignores the subsets entirely scores near zero
    noise = np.random.default_rng(5).normal(size=actual.shape)
    assert abs(lds(actual, noise).mean) < 0.2


def test_sample_subsets_keep_the_fraction() -> None:
    masks = sample_subsets(101, 7, 0.3, seed=2)
    assert masks.shape == (7, 101)
    assert (masks.sum(axis=1) == 30).all()
    assert not (masks == masks[0]).all()
    np.testing.assert_array_equal(masks, sample_subsets(101, 7, 0.3, seed=2))


def test_lds_input_errors() -> None:
    with pytest.raises(ValueError, match="fraction must lie in"):
        sample_subsets(10, 5, 1.0)
    with pytest.raises(ValueError, match=r"share n.*\(2, 3\).*\(4, 5\)"):
        predicted_losses(np.zeros((2, 3)), np.zeros((4, 5), dtype=bool))
    with pytest.raises(ValueError, match=r"\(n_test, M\)"):
        lds(np.zeros((2, 3)), np.zeros((3, 2)))
