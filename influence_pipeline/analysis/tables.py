"""The influence tables of a test set, for pandas users and the audit.

* ``top_k``: per test point, the k most helpful and k most harmful training examples
  (test_id, kind, rank, train_id, train_shard, train_row, score, and the labels when the
  targets are class labels), merged from the per-shard top-k lists;
* ``train_totals``: per training example, the sum, mean, min and max of its scores over
  the test points (and its label).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

from ..store import InfluenceStore


def label_map(ids: np.ndarray, y: np.ndarray) -> dict[int, int] | None:
    """id → class label, when the targets are one integer per example."""
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
        return None
    return dict(zip(ids.tolist(), y.tolist(), strict=True))


def influence_tables(
    store: InfluenceStore,
    test_set: str,
    k: int,
    train_labels: Mapping[int, int] | None = None,
    test_labels: Mapping[int, int] | None = None,
    allow_incomplete: bool = False,
    shards: Sequence[str] | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(top_k, train_totals) of a test set over ``shards`` (all allocated by default; only
    the complete ones with ``allow_incomplete``)."""
    top = store.top_k(test_set, k, shards=shards, allow_incomplete=allow_incomplete)
    totals = store.train_aggregates(test_set, shards=shards, allow_incomplete=allow_incomplete)
    if test_labels is not None:
        top.insert(1, "test_label", top.test_id.map(test_labels).astype("Int64"))
    if train_labels is not None:
        top["train_label"] = top.train_id.map(train_labels).astype("Int64")
        totals["label"] = totals.train_id.map(train_labels).astype("Int64")
    totals = totals.sort_values("score_sum", kind="stable").reset_index(drop=True)
    return top, totals
