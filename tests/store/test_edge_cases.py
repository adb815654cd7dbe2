"""Edge cases of writing and reading shard scores: tiny shards, both modes side by side,
re-allocation, a caller that reuses its buffer, failures inside the writer."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from influence_pipeline.influence import InfluenceMode
from influence_pipeline.store import ShardSpec, ShardWriter, StoreError, scoring

from . import workload as w


def _write(store, shard, scores, *, block=8, top_k=10, mode=InfluenceMode.Up):
    writer = ShardWriter(store, "val", shard, top_k=top_k, mode=mode)
    for start in range(0, scores.shape[1], block):
        writer.add(scores[:, start : start + block])
    return writer.finish("synthetic")


def test_top_k_with_a_shard_smaller_than_k(tmp_path):
    store, _ = w.prepare(str(tmp_path / "store"))
    store.allocate_shards("val", [ShardSpec("tiny", 3)])
    rng = np.random.default_rng(0)
    everything = []
    for i, n in enumerate(w.SHARD_ROWS):
        scores = rng.standard_normal((w.N_TEST, n)).astype(np.float32)
        _write(store, f"shard-{i}", scores)
        everything.append(scores)
    tiny = rng.standard_normal((w.N_TEST, 3)).astype(np.float32)
    _write(store, "tiny", tiny)  # keeps 3 values per test point: all it has
    everything.append(tiny)
    matrix = np.concatenate(everything, axis=1)
    top = store.top_k("val", 10, kind="helpful").sort_values(["test_id", "rank"])
    np.testing.assert_array_equal(
        top.score.to_numpy().reshape(w.N_TEST, 10), -np.sort(-matrix, axis=1)[:, :10]
    )
    with pytest.raises(StoreError, match="kept only its top 10; asked for 11"):
        store.top_k("val", 11)
    for bad in (0, -1, 2.5):
        with pytest.raises(StoreError, match="k must be a positive integer"):
            store.top_k("val", bad)


def test_perturbation_and_up_scores_complete_separately(tmp_path):
    store, _ = w.prepare(str(tmp_path / "store"))
    store.allocate_shards(
        "val", [ShardSpec(f"shard-{i}", n) for i, n in enumerate(w.SHARD_ROWS)], input_shape=(6,)
    )
    rng = np.random.default_rng(1)
    n = w.SHARD_ROWS[0]
    up = rng.standard_normal((w.N_TEST, n)).astype(np.float32)
    _write(store, "shard-0", up)
    assert store.shard_record("val", "shard-0") is not None
    perturbation = rng.standard_normal((w.N_TEST, w.SHARD_ROWS[1], 6)).astype(np.float32)
    _write(store, "shard-1", perturbation, mode=InfluenceMode.Perturbation)
    # a perturbation run completes only its own mode ...
    assert store.shard_record("val", "shard-1") is None
    assert store.shard_record("val", "shard-1", InfluenceMode.Perturbation) is not None
    assert store.status("val")["val"]["complete"] == ["shard-0"]
    # ... and neither starts nor failures of one mode touch the other's completion
    writer = ShardWriter(store, "val", "shard-0", mode=InfluenceMode.Perturbation)
    writer.close()
    assert store.shard_record("val", "shard-0") is not None
    assert store.shard_record("val", "shard-0", InfluenceMode.Perturbation) is None


def test_perturbation_array_follows_a_new_allocation(tmp_path):
    store, _ = w.prepare(str(tmp_path / "store"))
    store.allocate_shards(
        "val", [ShardSpec(f"shard-{i}", n) for i, n in enumerate(w.SHARD_ROWS)], input_shape=(6,)
    )
    store.allocate_shards("val", [ShardSpec("late", 20)])  # no input_shape this time
    scores = np.random.default_rng(2).standard_normal((w.N_TEST, 20, 6)).astype(np.float32)
    _write(store, "late", scores, mode=InfluenceMode.Perturbation)
    slot = store.allocation("val")["shards"]["late"]
    stored = store.scores_array("val", InfluenceMode.Perturbation)[
        :, slot["start"] : slot["start"] + 20
    ]
    np.testing.assert_array_equal(stored, scores)


def test_perturbation_without_its_array_is_refused(tmp_path):
    store, _ = w.prepare(str(tmp_path / "store"))
    with pytest.raises(StoreError, match="No perturbation scores array for 'val'"):
        ShardWriter(store, "val", "shard-0", mode=InfluenceMode.Perturbation)


@pytest.mark.parametrize("kind", ["numpy", "torch"])
def test_the_caller_may_reuse_its_buffer(tmp_path, kind):
    store, _ = w.prepare(str(tmp_path / "store"))
    n = w.SHARD_ROWS[0]
    scores = np.random.default_rng(3).standard_normal((w.N_TEST, n)).astype(np.float32)
    buffer = np.empty((w.N_TEST, 1), np.float32)
    shared = torch.from_numpy(buffer) if kind == "torch" else buffer
    writer = ShardWriter(store, "val", "shard-0", top_k=3)
    for j in range(n):  # one column at a time through the same memory
        buffer[:, 0] = scores[:, j]
        writer.add(shared)
    writer.finish("synthetic")
    slot = store.allocation("val")["shards"]["shard-0"]
    np.testing.assert_array_equal(
        store.scores_array("val")[:, slot["start"] : slot["start"] + n], scores
    )


def test_a_failed_write_surfaces_and_nothing_is_complete(tmp_path, monkeypatch):
    store, influence = w.prepare(str(tmp_path / "store"))
    calls = []

    def failing(self, buffer, column):
        calls.append(column)
        raise OSError("disk full (injected)")

    monkeypatch.setattr(scoring.ShardWriter, "_write_block", failing)
    with pytest.raises(OSError, match="disk full"):
        store.write_shard_scores("val", "shard-0", influence, w.shard_loader(0))
    assert calls and store.shard_record("val", "shard-0") is None


def test_the_first_error_is_reported(tmp_path, monkeypatch):
    """A loader that fails while a write also failed: the loader's error is the one raised."""
    store, influence = w.prepare(str(tmp_path / "store"))
    monkeypatch.setattr(
        scoring.ShardWriter, "_write_block", lambda *a: (_ for _ in ()).throw(OSError("io"))
    )

    def loader():
        yield from w.shard_loader(0, batch_size=16)
        raise RuntimeError("the loader broke")

    with pytest.raises(RuntimeError, match="the loader broke"):
        store.write_shard_scores("val", "shard-0", influence, loader())
    assert store.shard_record("val", "shard-0") is None


def test_scores_table_with_repeated_ids(tmp_path):
    store, influence = w.prepare(str(tmp_path / "store"))
    store.write_shard_scores("val", "shard-0", influence, w.shard_loader(0))
    table = store.scores_table("val", train_ids=[1003, 1003, 1005], shards=[0])
    assert sorted(set(table.train_id)) == [1003, 1005] and len(table) == 2 * w.N_TEST
