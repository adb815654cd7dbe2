"""Per-layer EK-FAC query factors in the store: round trip, lazy row blocks, scores equal to
the in-memory ones, refusals of other settings, lost chunks."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from influence_pipeline.influence import EkfacInfluence
from influence_pipeline.store import (
    IncompleteArtifactError,
    InfluenceStore,
    ProvenanceMismatchError,
    ShardSpec,
    StoreCorruptionError,
    StoreError,
)
from influence_pipeline.store import query_factors as qf

from . import workload as w

FLOAT32_RTOL = 1e-5  # scores are stored as float32


def _model(seed: int = 0) -> torch.nn.Module:
    return w.model(seed).double()


def _ekfac(net: torch.nn.Module, **kwargs: object) -> EkfacInfluence:
    x, y, _, _ = w.data()
    settings: dict = {"fisher": "empirical", **kwargs}
    influence = EkfacInfluence(net, update_diagonal=True, hessian_regularization=0.1, **settings)
    return influence.fit(DataLoader(TensorDataset(x.double(), y), batch_size=64))


def _test_loader() -> DataLoader:
    _, _, xt, yt = w.data()
    return DataLoader(TensorDataset(xt.double(), yt), batch_size=7)


def _shard_loader(i: int) -> DataLoader:
    x, y, ids = w.shard_loader(i).dataset.tensors
    return DataLoader(TensorDataset(x.double(), y, ids), batch_size=8)


@pytest.fixture
def small_chunks(monkeypatch):
    """About 3 test rows per chunk, so the 30 test rows span several chunks."""
    monkeypatch.setattr(qf, "CHUNK_BYTES", 3 * 8 * 7 * 7)


def _prepare(root: str, rank: int | None = 2, dtype: str = "float64"):
    store = InfluenceStore(root)
    influence = _ekfac(_model())
    store.save_block_mapper(influence)
    record = store.write_query_factors("val", influence, _test_loader(), rank=rank, dtype=dtype)
    return store, influence, record


def test_round_trip_and_lazy_rows(tmp_path, small_chunks):
    store, influence, record = _prepare(str(tmp_path / "s"))
    _, _, xt, yt = w.data()
    expected = influence.compressed_factors(xt.double(), yt, rank=2)
    stored = store.query_factors("val", influence, rank=2)
    assert record["kind"] == "query" and record["rank"] == 2
    assert record["modules"] == influence.modules == ["0", "2"]
    assert record["fisher"] == "empirical" and len(stored) == 30
    assert stored.nbytes == expected.nbytes  # float64 either way
    # both layers are compressed at rank 2: (out, r) and (r, in) factors, not (out, in)
    for layer in record["layers"]:
        assert set(layer["shapes"]) == {"left", "right"}
    everything = stored.all()
    for name, query in expected.layers.items():
        torch.testing.assert_close(
            everything.layers[name].matrix(), query.matrix(), rtol=1e-10, atol=1e-12
        )
    block = stored.rows(4, 11)  # spans chunk boundaries
    for name, query in expected.layers.items():
        torch.testing.assert_close(
            block.layers[name].matrix(), query.matrix()[4:11], rtol=1e-10, atol=1e-12
        )
    picked = stored.select([2, 17, 29])  # a spot-check's rows
    for name, query in expected.layers.items():
        torch.testing.assert_close(
            picked.layers[name].matrix(), query.matrix()[[2, 17, 29]], rtol=1e-10, atol=1e-12
        )
    assert stored.row_block == 1176 // (8 * 2 * 8)  # layer "2": right (1, r=2, in=7+1) float64
    np.testing.assert_array_equal(store.test_ids("val"), np.arange(30))
    # rows() reads only its chunks: with the last chunk of a layer gone after opening,
    # early rows still load and the rows of that chunk name it
    lazy = InfluenceStore(str(tmp_path / "s"), mode="r").query_factors("val")
    files = _chunk_files(str(tmp_path / "s"), f"{record['path']}/layers/l1/right")
    assert len(files) > 3
    os.remove(files[-1])
    lazy.rows(0, 3)
    with pytest.raises(StoreCorruptionError, match="layers/l1/right"):
        lazy.rows(27, 30)
    with pytest.raises(StoreError, match="outside the 30 test rows"):
        stored.rows(5, 31)


@pytest.mark.parametrize("hold", [None, 0])  # factors held in memory / read per row block
def test_scores_from_stored_query_factors_equal_the_in_memory_ones(
    tmp_path, small_chunks, hold, monkeypatch
):
    if hold is not None:
        monkeypatch.setattr(qf, "HOLD_BYTES", hold)
    store, influence, _ = _prepare(str(tmp_path / "s"), dtype="float32")
    store.allocate_shards(
        "val", [ShardSpec(f"shard-{i}", n) for i, n in enumerate(w.SHARD_ROWS)], shard_width=16
    )
    for i in range(w.N_SHARDS):
        store.write_shard_scores("val", f"shard-{i}", influence, _shard_loader(i), query_rank=2)
    assert store.status("val")["val"]["complete"] == [f"shard-{i}" for i in range(w.N_SHARDS)]
    x, y, xt, yt = w.data()
    queries = influence.compressed_factors(xt.double(), yt, rank=2)
    expected = influence.influences_from_factors(queries, x.double(), y).numpy()
    allocation = store.allocation("val")["shards"]
    array = store.scores_array("val")[...]
    got = np.concatenate(
        [array[:, a["start"] : a["start"] + a["n_rows"]] for a in allocation.values()], axis=1
    )
    # float32 factors and scores: relative error ~ 1e-7 · conditioning
    assert np.linalg.norm(got - expected) / np.linalg.norm(expected) < FLOAT32_RTOL
    top = store.top_k("val", k=3)
    assert len(top) > 0


def test_other_rank_modules_fisher_or_model_are_refused(tmp_path):
    store, influence, _ = _prepare(str(tmp_path / "s"))
    store.allocate_shards("val", [ShardSpec("shard-0", w.SHARD_ROWS[0])], shard_width=16)
    with pytest.raises(ProvenanceMismatchError, match="rank: stored 2, given 3"):
        store.query_factors("val", rank=3)
    with pytest.raises(ProvenanceMismatchError, match="rank: stored 2, given 3"):
        store.write_shard_scores("val", "shard-0", influence, _shard_loader(0), query_rank=3)
    with pytest.raises(ProvenanceMismatchError, match="rank: stored 2, given None"):
        store.query_factors("val", rank=None)
    only_last = _ekfac(_model(), modules=["2"])
    with pytest.raises(
        ProvenanceMismatchError, match=r"modules: stored \['0', '2'\], given \['2'\]"
    ):
        store.query_factors("val", only_last)
    with pytest.raises(ProvenanceMismatchError, match="modules"):
        store.write_shard_scores("val", "shard-0", only_last, _shard_loader(0))
    sampled = _ekfac(_model(), fisher="sampled", seed=0)
    with pytest.raises(
        ProvenanceMismatchError, match="fisher: stored 'empirical', given 'sampled'"
    ):
        store.query_factors("val", sampled)
    other_weights = _ekfac(_model(seed=5))
    with pytest.raises(ProvenanceMismatchError, match="model_fingerprint"):
        store.query_factors("val", other_weights)
    with pytest.raises(StoreError, match="per-layer query factors"):
        store.read_factors("val")
    with pytest.raises(ValueError, match="rank must be a positive integer"):
        store.write_query_factors("other", influence, _test_loader(), rank=0)
    # nothing above was scored or marked
    assert store.status("val")["val"]["complete"] == []


def test_dense_factors_are_not_taken_for_query_factors(tmp_path):
    store = InfluenceStore(str(tmp_path / "s"))
    influence = _ekfac(_model())
    store.save_block_mapper(influence)
    store.write_factors("val", influence, _test_loader())
    with pytest.raises(StoreError, match="dense"):
        store.query_factors("val")
    store.allocate_shards("val", [ShardSpec("shard-0", w.SHARD_ROWS[0])], shard_width=16)
    with pytest.raises(ProvenanceMismatchError, match="dense"):
        store.write_shard_scores("val", "shard-0", influence, _shard_loader(0), query_rank=2)


def test_replacing_dense_by_query_factors_makes_scored_shards_stale(tmp_path):
    store = InfluenceStore(str(tmp_path / "s"))
    influence = _ekfac(_model())
    store.save_block_mapper(influence)
    store.write_factors("val", influence, _test_loader())
    store.allocate_shards("val", [ShardSpec("shard-0", w.SHARD_ROWS[0])], shard_width=16)
    store.write_shard_scores("val", "shard-0", influence, _shard_loader(0))
    assert store.status("val")["val"]["complete"] == ["shard-0"]
    store.write_query_factors("val", influence, _test_loader(), rank=None)
    assert store.status("val")["val"]["stale"] == ["shard-0"]
    assert len(list((tmp_path / "s" / "factors" / "val").iterdir())) == 2  # version + zarr.json
    store.write_shard_scores("val", "shard-0", influence, _shard_loader(0))
    assert store.status("val")["val"]["complete"] == ["shard-0"]


def test_a_missing_query_factors_chunk_makes_them_incomplete(tmp_path, small_chunks):
    root = str(tmp_path / "s")
    store, influence, record = _prepare(root)
    os.remove(_chunk_files(root, f"{record['path']}/layers/l0/left")[1])
    state = store.factors_state("val")
    assert state.state == "damaged" and "layers/l0/left" in state.reason
    with pytest.raises(IncompleteArtifactError, match="not complete"):
        store.query_factors("val")
    # a re-run writes a complete new version
    store.write_query_factors("val", influence, _test_loader(), rank=2, dtype="float64")
    assert store.factors_state("val").complete


def test_a_failed_write_keeps_the_previous_query_factors(tmp_path):
    store, influence, record = _prepare(str(tmp_path / "s"))
    x, y = next(iter(_test_loader()))

    def bad_batches():
        yield x, y
        raise RuntimeError("loader broke")

    with pytest.raises(RuntimeError, match="loader broke"):
        store.write_query_factors("val", influence, bad_batches(), rank=4)
    assert store.factors_record("val")["path"] == record["path"]
    assert store.query_factors("val", influence, rank=2).rows(0, 2).n_rows == 2


def _chunk_files(root: str, array: str) -> list[str]:
    top = os.path.join(root, *array.split("/"), "c")
    found = sorted(
        (os.path.join(d, f) for d, _, fs in os.walk(top) for f in fs),
        key=lambda p: [int(part) for part in os.path.relpath(p, top).split(os.sep)],
    )
    assert found, f"no chunk files under {top}"
    return found
