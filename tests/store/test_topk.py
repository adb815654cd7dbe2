"""The running top-k of a shard writer equals a full sort of the concatenated blocks."""

from __future__ import annotations

import numpy as np
import pytest

from influence_pipeline.store.scoring import _RunningTopK


def _reference(matrix: np.ndarray, k: int, largest: bool) -> tuple[np.ndarray, np.ndarray]:
    # stable sort: among equal values the earlier column comes first
    order = np.argsort(-matrix if largest else matrix, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(matrix, order, 1), order


@pytest.mark.parametrize("largest", [True, False])
@pytest.mark.parametrize(
    ("widths", "k", "integer"),
    [
        ([7, 300, 1, 64, 512, 5, 1000], 10, False),  # first block narrower than k
        ([512] * 12, 10, False),  # the common case: candidates get rare
        ([50, 50, 50], 50, False),  # k equals a block's width
        ([3, 3, 3], 20, False),  # fewer values than k in total
        ([40, 200, 13, 77], 6, True),  # many ties
    ],
)
def test_running_topk_equals_full_sort(widths, k, integer, largest):
    rng = np.random.default_rng(sum(widths) + k)
    n_rows = 37
    blocks = [
        (
            rng.integers(-5, 6, size=(n_rows, w)).astype(np.float32)
            if integer
            else rng.standard_normal((n_rows, w), dtype=np.float32)
        )
        for w in widths
    ]
    # a row that only ever improves (every block beats the kept values) and a constant row
    drift = np.concatenate([np.full(w, float(i)) for i, w in enumerate(widths)]).astype(np.float32)
    start = 0
    for block in blocks:
        block[0] = drift[start : start + block.shape[1]] * (1 if largest else -1)
        block[1] = 0.5
        start += block.shape[1]
    tracker = _RunningTopK(n_rows, k, largest=largest)
    offset = 0
    for block in blocks:
        tracker.update(block, offset)
        offset += block.shape[1]
    matrix = np.concatenate(blocks, axis=1)
    values, positions = _reference(matrix, k, largest)
    np.testing.assert_array_equal(tracker.values, values)
    if integer:  # ties: the kept positions hold the right values, each once
        np.testing.assert_array_equal(np.take_along_axis(matrix, tracker.positions, 1), values)
        assert all(len(set(row)) == len(row) for row in tracker.positions.tolist())
    else:
        np.testing.assert_array_equal(tracker.positions, positions)


def test_duplicated_training_rows_rank_the_same_for_any_batch_size(tmp_path):
    """Duplicated training examples score identically; the stored top-k keeps the earlier
    row among equal scores, so it does not depend on how the shard was batched."""
    from influence_pipeline.store import ShardWriter

    from . import workload as w

    store, _ = w.prepare(str(tmp_path / "store"))
    rng = np.random.default_rng(3)
    n = w.SHARD_ROWS[0]
    scores = rng.integers(-3, 4, size=(w.N_TEST, n)).astype(np.float32)  # many ties
    scores[:, 20] = scores[:, 4]  # an exact duplicate of row 4
    tops = []
    for batch in (1, 7, n):
        writer = ShardWriter(store, "val", "shard-0", top_k=5)
        for start in range(0, n, batch):
            writer.add(scores[:, start : start + batch])
        writer.finish("synthetic")
        top = store.top_k("val", 5, allow_incomplete=True)
        tops.append(top.sort_values(["test_id", "kind", "rank"])[["train_id", "score"]].to_numpy())
    for top in tops[1:]:
        np.testing.assert_array_equal(top, tops[0])
    helpful = np.argsort(-scores, axis=1, kind="stable")[:, :5]
    table = store.top_k("val", 5, allow_incomplete=True)
    first = table[(table.kind == "helpful")].sort_values(["test_id", "rank"])
    start = store.allocation("val")["shards"]["shard-0"]["start"]
    np.testing.assert_array_equal(first.train_id.to_numpy().reshape(w.N_TEST, 5) - start, helpful)
