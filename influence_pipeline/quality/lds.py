"""The linear datamodeling score (LDS): do summed influences predict retraining?

Draw M random subsets S_1..S_M of the training set, each keeping a fraction α of it
(:func:`sample_subsets`), retrain the model on each and measure every test point's loss
L_i(S_m). Influence predicts that keeping S changes test point i's loss by the sum of the
members' influences; with this project's sign (I[i, j] > 0 means j *lowers* i's loss) the
predicted loss is -Σ_{j∈S} I[i, j] up to a constant (:func:`predicted_losses`). The LDS is
the mean over test points of Spearman's ρ (ties averaged), across the M subsets, between the
actual and the predicted losses; its interval resamples test points (percentile bootstrap).

The seed-to-seed ceiling is the same statistic with a second retraining (another seed)
standing in for the prediction: how well retraining predicts retraining.

Memory: the subsets are an (M, n_train) boolean mask; predictions are (n_test, M) and are
accumulated shard by shard (:func:`predicted_losses` takes any column block of the scores),
so the full score matrix never has to be held at once.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .metrics import spearman


def sample_subsets(n_train: int, n_subsets: int, fraction: float, seed: int = 0) -> np.ndarray:
    """(M, n_train) boolean masks, each keeping ``round(fraction·n_train)`` examples drawn
    without replacement."""
    if n_train < 2:
        raise ValueError(f"n_train must be at least 2, got {n_train}.")
    if n_subsets < 2:
        raise ValueError(f"n_subsets must be at least 2 (a rank correlation), got {n_subsets}.")
    if not 0 < fraction < 1:
        raise ValueError(f"fraction must lie in (0, 1), got {fraction}.")
    keep = max(1, round(fraction * n_train))
    rng = np.random.default_rng(seed)
    masks = np.zeros((n_subsets, n_train), dtype=bool)
    for m in range(n_subsets):
        masks[m, rng.choice(n_train, size=keep, replace=False)] = True
    return masks


def predicted_losses(influences: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """(n_test, M) predicted losses, -Σ_{j∈S_m} I[i, j], from ``influences`` (n_test, n_cols)
    and ``masks`` (M, n_cols) over the same columns; sum the results of column blocks."""
    influences = np.asarray(influences, dtype=np.float64)
    masks = np.asarray(masks)
    if influences.ndim != 2 or masks.ndim != 2 or influences.shape[1] != masks.shape[1]:
        raise ValueError(
            f"influences (n_test, n) and masks (M, n) must share n, got {influences.shape} "
            f"and {masks.shape}."
        )
    return -(influences @ masks.astype(np.float64).T)


@dataclass(frozen=True)
class LdsResult:
    """The LDS, its bootstrap interval and the per-test-point correlations."""

    mean: float
    low: float
    high: float
    per_test: np.ndarray  # (n_test,) Spearman ρ per test point (NaN where undefined)
    n_subsets: int

    def to_json(self) -> dict[str, float | int]:
        return {
            "lds": round(self.mean, 4),
            "low": round(self.low, 4),
            "high": round(self.high, 4),
            "n_subsets": self.n_subsets,
            "n_test": int(np.isfinite(self.per_test).sum()),
        }


def lds(
    actual: np.ndarray,
    predicted: np.ndarray,
    n_bootstrap: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> LdsResult:
    """LDS of ``predicted`` against ``actual``, both (n_test, M): mean over test points of
    Spearman's ρ across the M subsets, with a percentile bootstrap interval over test points.
    Test points whose actual or predicted values are constant are left out."""
    actual = np.asarray(actual, dtype=np.float64)
    predicted = np.asarray(predicted, dtype=np.float64)
    if actual.shape != predicted.shape or actual.ndim != 2:
        raise ValueError(
            f"actual and predicted must both be (n_test, M), got {actual.shape} and "
            f"{predicted.shape}."
        )
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence}.")
    per_test = np.asarray(spearman(actual, predicted))
    valid = per_test[np.isfinite(per_test)]
    if len(valid) == 0:
        raise ValueError("No test point has a defined rank correlation (constant values).")
    rng = np.random.default_rng(seed)
    means = valid[rng.integers(0, len(valid), size=(n_bootstrap, len(valid)))].mean(axis=1)
    tail = (1 - confidence) / 2
    low, high = np.quantile(means, [tail, 1 - tail]) if n_bootstrap else (np.nan, np.nan)
    return LdsResult(float(valid.mean()), float(low), float(high), per_test, actual.shape[1])
