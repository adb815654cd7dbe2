"""Attribution quality metrics: ranks, Spearman correlation, mislabel detection.

* Ranks with ties averaged (the "fractional" ranking): equal values share the mean of the
  positions they occupy, so Spearman's ρ is the Pearson correlation of these ranks.
* Mislabel detection from a ranking (a score per training example, higher = more suspicious)
  and the known corrupted examples: the fraction of corrupted examples found when inspecting
  the top ``f`` of the training set (``ceil(f·n)`` examples) for ``f`` in 1/5/10/20 %;
  average precision, AP = (1/|pos|) Σ_{k: example k is corrupted} precision@k, with examples
  in descending score order (ties keep the given order, so a constant ranking is scored by
  position, not by luck); and the precision/recall of a boolean flag.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

FRACTIONS = (0.01, 0.05, 0.10, 0.20)


def average_ranks(values: np.ndarray) -> np.ndarray:
    """Ranks 1..n along the last axis, ties given the mean of their positions."""
    values = np.asarray(values, dtype=np.float64)
    if values.ndim not in (1, 2):
        raise ValueError(f"values must be 1-D or 2-D, got shape {values.shape}.")
    if np.isnan(values).any():
        raise ValueError("values contain NaN; ranks are undefined.")
    rows = values.reshape(-1, values.shape[-1])
    ranks = np.empty_like(rows)
    for r, row in enumerate(rows):
        order = np.argsort(row, kind="stable")
        sorted_row = row[order]
        # start of each run of equal values, and the run each sorted position belongs to
        new_run = np.concatenate([[True], sorted_row[1:] != sorted_row[:-1]])
        run_id = np.cumsum(new_run) - 1
        starts = np.flatnonzero(new_run)
        ends = np.concatenate([starts[1:], [len(row)]])
        mean_rank = (starts + ends + 1) / 2.0  # mean of positions start+1 .. end
        ranks[r, order] = mean_rank[run_id]
    return ranks.reshape(values.shape)


def spearman(a: np.ndarray, b: np.ndarray) -> np.ndarray | float:
    """Spearman's ρ (ties averaged) of ``a`` and ``b`` along the last axis.

    1-D inputs give a float; 2-D inputs (rows × n) give one ρ per row. A row whose ranks are
    constant has no defined correlation and gives NaN.
    """
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"a and b must have one shape, got {a.shape} and {b.shape}.")
    if a.shape[-1] < 2:
        raise ValueError(f"Spearman needs at least 2 values per row, got shape {a.shape}.")
    ra = average_ranks(a)
    rb = average_ranks(b)
    ra = ra - ra.mean(axis=-1, keepdims=True)
    rb = rb - rb.mean(axis=-1, keepdims=True)
    denominator = np.sqrt((ra * ra).sum(axis=-1) * (rb * rb).sum(axis=-1))
    with np.errstate(invalid="ignore", divide="ignore"):
        rho = (ra * rb).sum(axis=-1) / denominator
    rho = np.where(denominator > 0, rho, np.nan)
    return float(rho) if rho.ndim == 0 else rho


def _order(scores: np.ndarray, corrupted: np.ndarray) -> np.ndarray:
    scores = np.asarray(scores, dtype=np.float64)
    corrupted = np.asarray(corrupted, dtype=bool)
    if scores.ndim != 1 or corrupted.shape != scores.shape:
        raise ValueError(
            f"scores and corrupted must be 1-D of one length, got {scores.shape} and "
            f"{corrupted.shape}."
        )
    if np.isnan(scores).any():
        raise ValueError("scores contain NaN; a ranking needs every example scored.")
    if not corrupted.any():
        raise ValueError("corrupted marks no example; the metric needs at least one.")
    return corrupted[np.argsort(-scores, kind="stable")]


def fraction_found(
    scores: np.ndarray, corrupted: np.ndarray, fractions: Sequence[float] = FRACTIONS
) -> dict[float, float]:
    """Fraction of the corrupted examples among the top ``ceil(f·n)`` by ``scores`` (higher =
    more suspicious), for each fraction ``f`` of the training set."""
    ordered = _order(scores, corrupted)
    n, n_bad = len(ordered), int(ordered.sum())
    found = np.cumsum(ordered)
    result = {}
    for f in fractions:
        if not 0 < f <= 1:
            raise ValueError(f"fractions must lie in (0, 1], got {f}.")
        k = max(1, math.ceil(f * n - 1e-9))
        result[float(f)] = float(found[k - 1] / n_bad)
    return result


def average_precision(scores: np.ndarray, corrupted: np.ndarray) -> float:
    """AP of the ranking: the mean over corrupted examples of precision at their rank."""
    ordered = _order(scores, corrupted)
    hits = np.cumsum(ordered)
    positions = np.flatnonzero(ordered) + 1
    return float(np.mean(hits[positions - 1] / positions))


@dataclass(frozen=True)
class FlagQuality:
    flagged: int
    corrupted: int
    true_positives: int

    @property
    def precision(self) -> float:
        return self.true_positives / self.flagged if self.flagged else float("nan")

    @property
    def recall(self) -> float:
        return self.true_positives / self.corrupted if self.corrupted else float("nan")

    def to_json(self) -> dict[str, float | int]:
        return {
            "flagged": self.flagged,
            "corrupted": self.corrupted,
            "true_positives": self.true_positives,
            "precision": round(self.precision, 4) if self.flagged else float("nan"),
            "recall": round(self.recall, 4) if self.corrupted else float("nan"),
        }


def flag_quality(flag: np.ndarray, corrupted: np.ndarray) -> FlagQuality:
    """Precision and recall of a boolean flag against the known corrupted examples."""
    flag = np.asarray(flag, dtype=bool)
    corrupted = np.asarray(corrupted, dtype=bool)
    if flag.shape != corrupted.shape or flag.ndim != 1:
        raise ValueError(
            f"flag and corrupted must be 1-D of one length, got {flag.shape} and {corrupted.shape}."
        )
    return FlagQuality(int(flag.sum()), int(corrupted.sum()), int((flag & corrupted).sum()))
