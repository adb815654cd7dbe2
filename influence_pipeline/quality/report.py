"""Quality reports for a workload: retraining on subsets, LDS per method, the methods
comparison and mislabel curves. Used by the Dagster assets (``defs/quality.py``) and
``benchmarks/quality_benchmark.py``; pure torch/numpy/pandas.

* :func:`retrain_subsets` retrains the model on some of the M subsets (one partition's
  share) and records each test point's loss: a long table (subset, seed, test_id, loss), so
  partitions can run anywhere and their tables concatenate.
* :func:`compare_methods` fits each method on the training data, times fit / factors /
  scores, measures the peak memory above a baseline (RSS high-water mark on Linux, reset
  before each method), and reports agreement with Direct's scores, the LDS against the
  retrained losses and the seed-to-seed ceiling.
* :func:`mislabel_curve_png` plots the fraction of known corrupted examples found against
  the fraction of the training set inspected, one line per ranking.
"""

from __future__ import annotations

import contextlib
import gc
import resource
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from ..workload import MethodSpec, ShardData
from .lds import lds, predicted_losses
from .metrics import spearman
from .mislabel import per_sample_losses

RetrainFunction = Callable[[torch.Tensor, torch.Tensor, int], torch.nn.Module]


def retrain_subsets(
    retrain: RetrainFunction,
    train: ShardData,
    test: ShardData,
    masks: np.ndarray,
    subsets: Sequence[int],
    seeds: Sequence[int],
    loss: Any,
) -> pd.DataFrame:
    """Retrain on each subset in ``subsets`` (rows of ``masks``) with each seed; the test
    losses as a long table with columns subset, seed, test_id, loss."""
    if masks.ndim != 2 or masks.shape[1] != len(train):
        raise ValueError(f"masks must be (M, n_train = {len(train)}), got shape {masks.shape}.")
    frames = []
    for m in subsets:
        keep = torch.from_numpy(np.asarray(masks[m], dtype=bool))
        for seed in seeds:
            model = retrain(train.x[keep], train.y[keep], seed)
            values = per_sample_losses(model, loss, test.x, test.y)
            frames.append(
                pd.DataFrame(
                    {"subset": m, "seed": seed, "test_id": test.ids.numpy(), "loss": values}
                )
            )
    columns: dict[str, list[Any]] = {"subset": [], "seed": [], "test_id": [], "loss": []}
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns)


def actual_losses(
    table: pd.DataFrame, seed: int, n_subsets: int, test_ids: np.ndarray
) -> np.ndarray:
    """(n_test, M) losses of one seed from the long table, in ``test_ids`` order."""
    part = table[table.seed == seed]
    wide = part.pivot(index="test_id", columns="subset", values="loss")
    missing = sorted(set(range(n_subsets)) - set(wide.columns))
    if missing:
        raise ValueError(f"Retrained losses of seed {seed} miss subsets {missing[:10]}.")
    return wide.loc[test_ids, list(range(n_subsets))].to_numpy(dtype=np.float64)


def _status_kb(key: str) -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return float(line.split()[1]) * 1024.0
    except OSError:
        return None
    return None


class PeakMemory:
    """Peak RSS above the RSS at construction (Linux: the high-water mark is reset first)."""

    def __init__(self) -> None:
        gc.collect()
        with contextlib.suppress(OSError):
            Path("/proc/self/clear_refs").write_text("5")
        self.baseline = self._peak()

    @staticmethod
    def _peak() -> float:
        hwm = _status_kb("VmHWM")
        return (
            hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024.0
        )

    def mb(self) -> float:
        return max(0.0, self._peak() - self.baseline) / 2**20


def compare_methods(
    model: torch.nn.Module,
    loss: Any,
    train: ShardData,
    test: ShardData,
    specs: Mapping[str, MethodSpec],
    masks: np.ndarray,
    actual: np.ndarray,
    ceiling: np.ndarray | None = None,
    batch_size: int = 256,
    n_bootstrap: int = 1000,
) -> pd.DataFrame:
    """One row per method: seconds (fit, factors, scores), peak MB, agreement with Direct
    (Pearson over all scores; mean Spearman per test point) where ``direct`` is in ``specs``,
    and the LDS with its interval; a last row with the seed-to-seed ceiling."""
    rows: list[dict[str, Any]] = []
    reference = None
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(train.x, train.y), batch_size=batch_size
    )
    order = sorted(specs, key=lambda name: name != "direct")  # Direct first: the reference
    for name in order:
        meter = PeakMemory()
        start = time.perf_counter()
        influence = specs[name].build(model, loss).fit(loader)
        fitted = time.perf_counter()
        factors = influence.influence_factors(test.x, test.y)
        factored = time.perf_counter()
        scores = np.concatenate(
            [
                influence.influences_from_factors(
                    factors, train.x[i : i + batch_size], train.y[i : i + batch_size]
                )
                .detach()
                .double()
                .cpu()
                .numpy()
                for i in range(0, len(train), batch_size)
            ],
            axis=1,
        )
        scored = time.perf_counter()
        row: dict[str, Any] = {
            "method": name,
            "fit_s": fitted - start,
            "factors_s": factored - fitted,
            "scores_s": scored - factored,
            "peak_mb": meter.mb(),
        }
        if name == "direct":
            reference = scores
        if reference is not None:
            row["pearson_vs_direct"] = float(np.corrcoef(scores.ravel(), reference.ravel())[0, 1])
            row["spearman_vs_direct"] = float(np.nanmean(spearman(scores, reference)))
        result = lds(actual, predicted_losses(scores, masks), n_bootstrap=n_bootstrap)
        row.update({"lds": result.mean, "lds_low": result.low, "lds_high": result.high})
        rows.append(row)
    if ceiling is not None:
        result = lds(actual, ceiling, n_bootstrap=n_bootstrap)
        rows.append(
            {
                "method": "retrain, another seed (ceiling)",
                "lds": result.mean,
                "lds_low": result.low,
                "lds_high": result.high,
            }
        )
    return pd.DataFrame(rows)


def mislabel_curve_png(rankings: Mapping[str, np.ndarray], corrupted: np.ndarray) -> bytes:
    """Fraction of corrupted examples found against the fraction of examples inspected."""
    import matplotlib

    from ..analysis.plots import png_bytes

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    corrupted = np.asarray(corrupted, dtype=bool)
    n = len(corrupted)
    inspected = np.arange(1, n + 1) / n
    for name, scores in rankings.items():
        ordered = corrupted[np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")]
        ax.plot(inspected, np.cumsum(ordered) / corrupted.sum(), label=name, linewidth=1.2)
    ax.set_xlim(0, min(1.0, 4 * corrupted.mean() + 0.05))
    ax.set_xlabel("fraction of the training set inspected")
    ax.set_ylabel("fraction of corrupted labels found")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return png_bytes(fig)


def bar_png(table: pd.DataFrame, column: str, label: str) -> bytes:
    """A horizontal bar per row of ``table`` (its ``method``) with ``<column>_low/_high``
    error bars where present."""
    import matplotlib

    from ..analysis.plots import png_bytes

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 0.4 * len(table) + 1))
    values = table[column].to_numpy(dtype=np.float64)
    error = None
    if f"{column}_low" in table and f"{column}_high" in table:
        error = np.vstack(
            [
                values - table[f"{column}_low"].to_numpy(),
                table[f"{column}_high"].to_numpy() - values,
            ]
        )
    ax.barh(table.method.astype(str), values, xerr=error, color="#4c72b0")
    ax.invert_yaxis()
    ax.set_xlabel(label)
    fig.tight_layout()
    return png_bytes(fig)
