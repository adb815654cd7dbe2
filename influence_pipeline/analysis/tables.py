"""The influence tables of a test set, for pandas users and the audit.

* ``top_k``: per test point, the k most helpful and k most harmful training examples,
  merged from the per-shard top-k lists;
* ``train_totals``: per training example, the sum, mean, min and max of its scores over
  the test points.

Their columns and dtypes are the schemas ``TOP_K`` and ``TRAIN_TOTALS`` of
:mod:`influence_pipeline.store.schemas` (labels are NA where the targets are not class
labels), checked before they are returned.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

from ..store import InfluenceStore
from ..store.schemas import TOP_K, TRAIN_TOTALS


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
    top.insert(2, "test_label", _labels(top.test_id, test_labels))
    top.insert(
        top.columns.get_loc("train_row") + 1, "train_label", _labels(top.train_id, train_labels)
    )
    totals.insert(3, "train_label", _labels(totals.train_id, train_labels))
    totals = totals.sort_values("score_sum", kind="stable").reset_index(drop=True)
    TOP_K.check(top)
    TRAIN_TOTALS.check(totals)
    return top, totals


def _labels(ids: pd.Series, labels: Mapping[int, int] | None) -> pd.Series:
    """The label of each id (nullable Int64; NA when unknown)."""
    if labels is None:
        return pd.Series(pd.NA, index=ids.index, dtype="Int64")
    return ids.map(labels).astype("Int64")
