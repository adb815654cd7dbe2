"""pandas views of stored scores.

* :func:`scores_table`: a tidy long table (test_id, test_position, train_id, train_shard,
  train_row, score) for a selection of test points (by id or by position) and training
  ids, reading only the selected columns.
* :func:`top_k`: the k most helpful and most harmful training examples per test point,
  merged from the per-shard top-k lists (work independent of the number of training
  examples; the full score matrix is never read).
* :func:`train_aggregates`: per training example, the sum, mean, min and max of its scores
  over the test set (from per-shard statistics written by the shard writers).
* :func:`column_index`: which training example each column of the raw scores array holds,
  for xarray/dask users who open the Zarr arrays directly (every array has
  ``dimension_names``).

Only complete shards are served: a shard that is missing, stale (scored against other
factors, another block mapper or loss) or damaged raises :class:`IncompleteArtifactError`
naming why, unless ``allow_incomplete`` skips it. Column names follow
:mod:`~influence_pipeline.store.schemas`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from .errors import IncompleteArtifactError, StoreError

if TYPE_CHECKING:
    from .store import InfluenceStore


def _complete_shards(
    store: InfluenceStore, test_set: str, shards: Sequence[str | int] | None, allow_incomplete: bool
) -> list[str]:
    order = store.allocation(test_set)["order"]
    names = order if shards is None else [store.resolve_shard(test_set, s) for s in shards]
    factors = store.factors_state(test_set, check_chunks=False)
    states = {s: store.shard_state(test_set, s, _factors=factors) for s in names}
    incomplete = [s for s in names if not states[s].complete]
    if incomplete and not allow_incomplete:
        reasons = "; ".join(f"{s}: {states[s].state} ({states[s].reason})" for s in incomplete[:5])
        raise IncompleteArtifactError(
            f"Shards {incomplete} of test set {test_set!r} are not complete ({reasons}); score "
            "them first or pass allow_incomplete=True to skip them."
        )
    return [s for s in names if s not in incomplete]


def _positions(ids: np.ndarray, wanted: Sequence[int] | np.ndarray | None, what: str) -> np.ndarray:
    if wanted is None:
        return np.arange(len(ids))
    wanted = np.asarray(wanted, dtype=np.int64)
    lookup = pd.Index(ids)
    positions = lookup.get_indexer(wanted)
    if (positions < 0).any():
        raise StoreError(f"Unknown {what} ids {wanted[positions < 0][:10].tolist()}.")
    return positions


def scores_table(
    store: InfluenceStore,
    test_set: str,
    *,
    test_ids: Sequence[int] | np.ndarray | None = None,
    test_positions: Sequence[int] | np.ndarray | None = None,
    train_ids: Sequence[int] | np.ndarray | None = None,
    shards: Sequence[str | int] | None = None,
    allow_incomplete: bool = False,
) -> pd.DataFrame:
    """Long table of scores for the selected test points (``test_ids`` or
    ``test_positions``, all by default) × training ids (all by default)."""
    all_test_ids = store.test_ids(test_set)
    if test_ids is not None and test_positions is not None:
        raise StoreError("Select test points by test_ids or by test_positions, not both.")
    if test_positions is not None:
        rows = np.asarray(test_positions, dtype=np.int64).reshape(-1)
        bad = rows[(rows < 0) | (rows >= len(all_test_ids))]
        if bad.size:
            raise StoreError(
                f"test_positions {bad[:10].tolist()} are out of range: test set {test_set!r} "
                f"has {len(all_test_ids)} test points (positions 0..{len(all_test_ids) - 1})."
            )
    else:
        rows = _positions(all_test_ids, test_ids, "test")
    allocation = store.allocation(test_set)["shards"]
    frames = []
    wanted = (
        None if train_ids is None else pd.Index(pd.unique(np.asarray(train_ids, dtype=np.int64)))
    )
    found: set[int] = set()
    for shard in _complete_shards(store, test_set, shards, allow_incomplete):
        ids = store._read(f"train_stats/{test_set}/{shard}/ids", ...)
        local = (
            np.arange(len(ids)) if wanted is None else np.nonzero(wanted.get_indexer(ids) >= 0)[0]
        )
        if len(local) == 0:
            continue
        found.update(ids[local].tolist())
        start = int(allocation[shard]["start"])
        block = store._read(f"scores/{test_set}", (rows, start + local))
        frames.append(
            pd.DataFrame(
                {
                    "test_id": np.repeat(all_test_ids[rows], len(local)),
                    "test_position": np.repeat(rows, len(local)).astype(np.int64),
                    "train_id": np.tile(ids[local], len(rows)),
                    "train_shard": pd.Categorical([shard] * (len(rows) * len(local))),
                    "train_row": np.tile(local, len(rows)).astype(np.int64),
                    "score": block.reshape(-1),
                }
            )
        )
    if wanted is not None:
        missing = sorted(set(wanted.tolist()) - found)
        if missing:
            raise StoreError(
                f"Training ids {missing[:10]} are not in the complete shards of {test_set!r}."
            )
    if not frames:
        return pd.DataFrame(
            {
                "test_id": pd.Series(dtype="int64"),
                "test_position": pd.Series(dtype="int64"),
                "train_id": pd.Series(dtype="int64"),
                "train_shard": pd.Categorical([]),
                "train_row": pd.Series(dtype="int64"),
                "score": pd.Series(dtype="float32"),
            }
        )
    table = pd.concat(frames, ignore_index=True)
    table["train_shard"] = table["train_shard"].astype("category")
    return table


def top_k(
    store: InfluenceStore,
    test_set: str,
    k: int = 10,
    *,
    kind: str = "both",
    shards: Sequence[str | int] | None = None,
    allow_incomplete: bool = False,
) -> pd.DataFrame:
    """Per test point, the k most helpful (largest scores) and/or most harmful (smallest)
    training examples: columns test_id, test_position, kind, rank (1 = strongest),
    train_id, train_shard, train_row, score."""
    if isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 1:
        raise StoreError(f"k must be a positive integer, got {k!r}.")
    if kind not in ("helpful", "harmful", "both"):
        raise StoreError(f"kind must be 'helpful', 'harmful' or 'both', not {kind!r}.")
    test_ids = store.test_ids(test_set)
    shards = _complete_shards(store, test_set, shards, allow_incomplete)
    if not shards:
        raise IncompleteArtifactError(f"No complete shards for test set {test_set!r}.")
    frames = []
    for which in ("helpful", "harmful") if kind == "both" else (kind,):
        values, rows, shard_index, ids_list = [], [], [], []
        for i, shard in enumerate(shards):
            v = store._read(f"topk/{test_set}/{shard}/{which}_values", ...)
            r = store._read(f"topk/{test_set}/{shard}/{which}_rows", ...)
            values.append(v)
            rows.append(r)
            shard_index.append(np.full_like(r, i))
            ids_list.append(store._read(f"train_stats/{test_set}/{shard}/ids", ...))
        for v, ids, shard in zip(values, ids_list, shards, strict=True):
            if v.shape[1] < min(k, len(ids)):  # a shard of n rows keeps at most n
                raise StoreError(
                    f"Shard {shard!r} of {test_set!r} kept only its top {v.shape[1]}; asked "
                    f"for {k} (score it again with a larger top_k)."
                )
        v_all = np.concatenate(values, axis=1)
        r_all = np.concatenate(rows, axis=1)
        s_all = np.concatenate(shard_index, axis=1)
        order = np.argsort(-v_all if which == "helpful" else v_all, axis=1, kind="stable")[:, :k]
        kk = order.shape[1]
        v_top = np.take_along_axis(v_all, order, 1)
        r_top = np.take_along_axis(r_all, order, 1)
        s_top = np.take_along_axis(s_all, order, 1)
        offsets = np.cumsum([0] + [len(ids) for ids in ids_list])
        all_ids = np.concatenate(ids_list)
        train_ids = all_ids[offsets[s_top] + r_top]
        frames.append(
            pd.DataFrame(
                {
                    "test_id": np.repeat(test_ids, kk),
                    "test_position": np.repeat(np.arange(len(test_ids), dtype=np.int64), kk),
                    "kind": which,
                    "rank": np.tile(np.arange(1, kk + 1, dtype=np.int64), len(test_ids)),
                    "train_id": train_ids.reshape(-1),
                    "train_shard": np.asarray(shards, dtype=object)[s_top.reshape(-1)],
                    "train_row": r_top.reshape(-1).astype(np.int64),
                    "score": v_top.reshape(-1).astype(np.float32),
                }
            )
        )
    table = pd.concat(frames, ignore_index=True)
    table["kind"] = table["kind"].astype("category")
    table["train_shard"] = table["train_shard"].astype("category")
    return table


def train_aggregates(
    store: InfluenceStore,
    test_set: str,
    *,
    shards: Sequence[str | int] | None = None,
    allow_incomplete: bool = False,
) -> pd.DataFrame:
    """Per training example (train_id, train_shard, train_row): score_sum, score_mean,
    score_min, score_max over the test set (of the given ``shards``, all allocated ones by
    default)."""
    n_test = len(store.test_ids(test_set))
    frames = []
    for shard in _complete_shards(store, test_set, shards, allow_incomplete):
        base = f"train_stats/{test_set}/{shard}"
        ids = store._read(f"{base}/ids", ...)
        total = store._read(f"{base}/sum", ...)
        frames.append(
            pd.DataFrame(
                {
                    "train_id": ids,
                    "train_shard": shard,
                    "train_row": np.arange(len(ids), dtype=np.int64),
                    "score_sum": total,
                    "score_mean": total / n_test,
                    "score_min": store._read(f"{base}/min", ...),
                    "score_max": store._read(f"{base}/max", ...),
                }
            )
        )
    if not frames:
        raise IncompleteArtifactError(f"No complete shards for test set {test_set!r}.")
    table = pd.concat(frames, ignore_index=True)
    table["train_shard"] = table["train_shard"].astype("category")
    return table


def column_index(store: InfluenceStore, test_set: str) -> pd.DataFrame:
    """column, train_shard, train_row, train_id (NaN-free: only complete shards' columns)."""
    allocation = store.allocation(test_set)["shards"]
    frames = []
    for shard in _complete_shards(store, test_set, None, allow_incomplete=True):
        ids = store._read(f"train_stats/{test_set}/{shard}/ids", ...)
        start = int(allocation[shard]["start"])
        frames.append(
            pd.DataFrame(
                {
                    "column": np.arange(start, start + len(ids), dtype=np.int64),
                    "train_shard": shard,
                    "train_row": np.arange(len(ids), dtype=np.int64),
                    "train_id": ids,
                }
            )
        )
    return (
        pd.concat(frames, ignore_index=True)
        if frames
        else pd.DataFrame(columns=["column", "train_shard", "train_row", "train_id"])
    )
