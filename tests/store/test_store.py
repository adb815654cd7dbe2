"""Round trips, equality with the engine, concurrency, crash/resume, provenance, integrity."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import time
from collections import OrderedDict

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from influence_pipeline.influence import (
    ArnoldiInfluence,
    BlockMode,
    CgInfluence,
    DirectInfluence,
    EkfacInfluence,
    InfluenceMode,
    InverseHarmonicMeanInfluence,
    JacobiPreconditioner,
    LissaInfluence,
    NystroemSketchInfluence,
    fitted_state,
)
from influence_pipeline.store import (
    IncompleteArtifactError,
    InfluenceStore,
    ProvenanceMismatchError,
    ShardSpec,
    StoreCorruptionError,
    StoreError,
)

from . import workload as w

FLOAT32_RTOL = 1e-5  # scores and factors are stored as float32: relative error ~ 1e-7·cond


def rel(a, b):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.fixture
def root(tmp_path):
    return str(tmp_path / "store")


def score_all(store, influence):
    for i in range(w.N_SHARDS):
        store.write_shard_scores("val", f"shard-{i}", influence, w.shard_loader(i))


def full_matrix(store):
    """Scores of all complete shards as (n_test, n_train) in training order."""
    allocation = store.allocation("val")["shards"]
    array = store.scores_array("val")[...]
    return np.concatenate(
        [array[:, a["start"] : a["start"] + a["n_rows"]] for a in allocation.values()], axis=1
    )


# ---------------------------------------------------------------- block mapper round trip
METHODS = {
    "direct": lambda m, loss: DirectInfluence(
        m, loss, {"0": 0.1, "2": None}, block_structure=BlockMode.LAYER_WISE
    ),
    "cg": lambda m, loss: CgInfluence(m, loss, 1.0, preconditioner=JacobiPreconditioner(2, seed=0)),
    "lissa": lambda m, loss: LissaInfluence(
        m, loss, 0.5, maxiter=20, scale=20.0, warn_on_max_iteration=False
    ),
    "arnoldi": lambda m, loss: ArnoldiInfluence(m, loss, 0.1, rank=4, use_woodbury=True),
    "nystroem": lambda m, loss: NystroemSketchInfluence(
        m, loss, 0.1, rank=4, block_structure=OrderedDict(weights=["0.weight", "2.weight"])
    ),
    "ihm": lambda m, loss: InverseHarmonicMeanInfluence(m, loss, 0.1),
    "ekfac": lambda m, loss: EkfacInfluence(m, update_diagonal=True, hessian_regularization=0.1),
}


@pytest.mark.parametrize("name", list(METHODS))
def test_block_mapper_round_trip(root, name):
    x, y, xt, yt = w.data()
    loader = DataLoader(TensorDataset(x, y), batch_size=64)
    influence = METHODS[name](w.model(), F.cross_entropy).fit(loader)
    store = InfluenceStore(root)
    digest = store.save_block_mapper(influence)
    assert store.block_mapper_info()["digest"] == digest
    reopened = InfluenceStore(root, mode="r")
    loaded = reopened.load_block_mapper(w.model(), data=loader)
    assert type(loaded) is type(influence)
    # the stored tensors come back bit for bit; scores from them agree to float32
    # round-off (BLAS may take another path for the reloaded tensors on some machines)
    for live, back in zip(fitted_state(influence).blocks, fitted_state(loaded).blocks, strict=True):
        for key, tensor in live.tensors.items():
            assert torch.equal(tensor, back.tensors[key]), (live.name, key)
    expected = influence.influences(xt, yt, x[:50], y[:50])
    torch.testing.assert_close(
        loaded.influences(xt, yt, x[:50], y[:50]),
        expected,
        rtol=0,
        atol=1e-5 * float(expected.abs().max()),
    )
    # saving the same state again is a no-op version-wise
    assert store.save_block_mapper(influence) == digest


def test_block_mapper_refuses_other_models(root):
    store = InfluenceStore(root)
    store.save_block_mapper(w.fitted())
    with pytest.raises(ProvenanceMismatchError, match="other weights"):
        store.load_block_mapper(w.model(seed=1))
    wider = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    with pytest.raises(ProvenanceMismatchError, match="parameter shapes"):
        store.load_block_mapper(wider)
    renamed = torch.nn.Sequential(
        OrderedDict(a=torch.nn.Linear(6, 7), t=torch.nn.Tanh(), b=torch.nn.Linear(7, 3))
    )
    with pytest.raises(ProvenanceMismatchError, match="lacks"):
        store.load_block_mapper(renamed)


# ---------------------------------------------------------------- factors and scores
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_factors_read_back_equal_the_engine(root, dtype):
    store = InfluenceStore(root)
    influence = w.fitted()
    _, _, xt, yt = w.data()
    ids = np.arange(500, 500 + len(xt))
    record = store.write_factors(
        "val", influence, DataLoader(TensorDataset(xt, yt), batch_size=7), ids=ids, dtype=dtype
    )
    assert record["n_rows"] == len(xt)
    values, stored_ids = store.read_factors("val")
    assert values.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(stored_ids, ids)
    # computed batch by batch (7 rows) in the store, at once here: float32 rounding differs
    expected = influence.influence_factors(xt, yt).numpy()
    assert rel(values, expected) < 1e-6


def test_union_of_shards_equals_engine_influences(root):
    store, influence = w.prepare(root)
    score_all(store, influence)
    x, y, xt, yt = w.data()
    expected = influence.influences(xt, yt, x, y).numpy()
    assert rel(full_matrix(store), expected) < FLOAT32_RTOL
    status = store.status()
    assert status == {
        "val": {
            "factors": True,
            "factors_state": "complete",
            "complete": [f"shard-{i}" for i in range(8)],
            "missing": [],
            "stale": [],
            "problems": {},
        }
    }
    # padding columns stay NaN, the allocation is whole Zarr shards
    allocation = store.allocation("val")
    assert allocation["shard_width"] == 16
    for a in allocation["shards"].values():
        assert a["start"] % 16 == 0 and (a["stop"] - a["start"]) % 16 == 0
        assert np.isnan(store.scores_array("val")[:, a["start"] + a["n_rows"] : a["stop"]]).all()


def test_readers_tidy_table_topk_and_aggregates(root):
    store, influence = w.prepare(root)
    score_all(store, influence)
    x, y, xt, yt = w.data()
    expected = influence.influences(xt, yt, x, y).numpy()  # (30, 240); train id = 1000 + row
    table = store.scores_table("val", test_ids=[3, 7], train_ids=[1000, 1100, 1239])
    assert list(table.columns) == [
        "test_id",
        "test_position",
        "train_id",
        "train_shard",
        "train_row",
        "score",
    ]
    assert len(table) == 6
    for row in table.itertuples():
        assert row.score == pytest.approx(expected[row.test_id, row.train_id - 1000], rel=1e-5)
    # test points by position give the same rows (ids are 0..29 here: position = id)
    by_position = store.scores_table("val", test_positions=[3, 7], train_ids=[1000, 1100, 1239])
    pd.testing.assert_frame_equal(by_position, table)
    with pytest.raises(StoreError, match=r"test_positions \[30\] are out of range"):
        store.scores_table("val", test_positions=[30])
    everything = store.scores_table("val")
    assert len(everything) == 30 * 240
    top = store.top_k("val", 5)
    for test in (0, 11, 29):
        helpful = top[(top.test_id == test) & (top.kind == "helpful")].sort_values("rank")
        harmful = top[(top.test_id == test) & (top.kind == "harmful")].sort_values("rank")
        np.testing.assert_array_equal(helpful.train_id - 1000, np.argsort(-expected[test])[:5])
        np.testing.assert_array_equal(harmful.train_id - 1000, np.argsort(expected[test])[:5])
        np.testing.assert_allclose(helpful.score, np.sort(expected[test])[::-1][:5], rtol=1e-5)
    aggregates = store.train_aggregates("val").sort_values("train_id")
    np.testing.assert_allclose(aggregates.score_sum, expected.sum(0), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(aggregates.score_mean, expected.mean(0), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(aggregates.score_min, expected.min(0), rtol=1e-5)
    np.testing.assert_allclose(aggregates.score_max, expected.max(0), rtol=1e-5)
    index = store.column_index("val")
    assert len(index) == 240 and index.column.is_unique
    assert store.scores_array("val").metadata.dimension_names == ("test", "train")


def test_perturbation_scores(root):
    store, influence = w.prepare(root)
    store.allocate_shards(
        "val", [ShardSpec(f"shard-{i}", n) for i, n in enumerate(w.SHARD_ROWS)], input_shape=(6,)
    )
    store.write_shard_scores(
        "val", "shard-2", influence, w.shard_loader(2), mode=InfluenceMode.Perturbation
    )
    x, y, xt, yt = w.data()
    rows = torch.from_numpy(w.shard_rows()[2])
    expected = influence.influences(
        xt, yt, x[rows], y[rows], mode=InfluenceMode.Perturbation
    ).numpy()
    a = store.allocation("val")["shards"]["shard-2"]
    got = store.scores_array("val", InfluenceMode.Perturbation)[
        :, a["start"] : a["start"] + a["n_rows"]
    ]
    assert got.shape == (30, 30, 6)
    assert rel(got, expected) < FLOAT32_RTOL


def test_memory_and_file_urls(tmp_path):
    for url in (f"memory://store-{os.getpid()}-{time.time_ns()}", f"file://{tmp_path}/url-store"):
        store, influence = w.prepare(url)
        store.write_shard_scores("val", 0, influence, w.shard_loader(0))
        reopened = InfluenceStore(url, mode="r")
        assert reopened.status()["val"]["complete"] == ["shard-0"]
        assert len(reopened.scores_table("val", shards=[0])) == 30 * 31


# ---------------------------------------------------------------- concurrency, crash, resume
def test_eight_processes_write_eight_shards_at_once(tmp_path):
    serial_root, parallel_root = str(tmp_path / "serial"), str(tmp_path / "parallel")
    store, influence = w.prepare(serial_root)
    score_all(store, influence)
    w.prepare(parallel_root)
    flag = str(tmp_path / "go")
    ctx = mp.get_context("spawn")
    workers = [
        ctx.Process(target=w.score_in_process, args=(parallel_root, i, flag)) for i in range(8)
    ]
    for p in workers:
        p.start()
    time.sleep(1.0)
    open(flag, "w").close()
    for p in workers:
        p.join(timeout=240)
        assert p.exitcode == 0
    parallel = InfluenceStore(parallel_root, mode="r")
    assert parallel.status()["val"]["missing"] == []
    a = parallel.scores_array("val")[...]
    b = InfluenceStore(serial_root, mode="r").scores_array("val")[...]
    np.testing.assert_array_equal(a, b)  # every value present and identical
    assert not np.isnan(full_matrix(parallel)).any()


def test_killed_writer_leaves_its_shard_incomplete_and_resume_completes(tmp_path):
    root = str(tmp_path / "crash")
    store, influence = w.prepare(root)
    for i in (0, 1, 2):
        store.write_shard_scores("val", f"shard-{i}", influence, w.shard_loader(i))
    flag = str(tmp_path / "mid-shard")
    worker = mp.get_context("spawn").Process(target=w.score_slowly, args=(root, 3, 5, flag))
    worker.start()
    deadline = time.time() + 240
    while not os.path.exists(flag):
        assert time.time() < deadline and worker.is_alive()
        time.sleep(0.05)
    os.kill(worker.pid, signal.SIGKILL)
    worker.join()
    assert worker.exitcode == -signal.SIGKILL
    status = InfluenceStore(root).status()["val"]
    assert status["complete"] == ["shard-0", "shard-1", "shard-2"]
    assert "shard-3" in status["missing"]
    a = store.allocation("val")["shards"]["shard-3"]
    partial = store.scores_array("val")[:, a["start"] : a["stop"]]
    assert not np.isnan(partial[:, :16]).any()  # its first Zarr shard was written before the kill
    with pytest.raises(IncompleteArtifactError, match="shard-3"):
        store.scores_table("val", shards=["shard-3"])
    # resume: redo only what is missing
    resumed = InfluenceStore(root)
    for shard in resumed.status()["val"]["missing"]:
        resumed.write_shard_scores(
            "val", shard, influence, w.shard_loader(int(shard.split("-")[1]))
        )
    reference_root = str(tmp_path / "reference")
    reference, _ = w.prepare(reference_root)
    score_all(reference, influence)
    np.testing.assert_array_equal(
        resumed.scores_array("val")[...], reference.scores_array("val")[...]
    )


# ---------------------------------------------------------------- provenance refusals
def test_scores_refuse_factors_of_another_model_method_or_blocks(root):
    store, _ = w.prepare(root)
    x, y, _, _ = w.data()
    loader = DataLoader(TensorDataset(x, y), batch_size=64)
    other_weights = DirectInfluence(w.model(seed=3), F.cross_entropy, 0.1).fit(loader)
    with pytest.raises(ProvenanceMismatchError, match="model_fingerprint"):
        store.write_shard_scores("val", 0, other_weights, w.shard_loader(0))
    other_method = CgInfluence(w.model(), F.cross_entropy, 0.1).fit(loader)
    with pytest.raises(ProvenanceMismatchError, match="method"):
        store.write_shard_scores("val", 0, other_method, w.shard_loader(0))
    other_blocks = DirectInfluence(
        w.model(), F.cross_entropy, 0.1, block_structure=BlockMode.LAYER_WISE
    ).fit(loader)
    with pytest.raises(ProvenanceMismatchError, match="block_structure"):
        store.write_shard_scores("val", 0, other_blocks, w.shard_loader(0))
    # nothing was marked complete by the refused writes
    assert store.status()["val"]["complete"] == []
    # factors for another model than the stored block mapper are refused too
    _, _, xt, yt = w.data()
    with pytest.raises(ProvenanceMismatchError, match="block mapper"):
        store.write_factors("other", other_weights, DataLoader(TensorDataset(xt, yt), batch_size=8))


# ---------------------------------------------------------------- integrity and bad input
def test_flipped_byte_is_reported_as_corruption(root):
    store, influence = w.prepare(root)
    store.write_shard_scores("val", 1, influence, w.shard_loader(1))
    chunk_dir = os.path.join(root, "scores", "val", "c")
    files = sorted(os.path.join(d, f) for d, _, fs in os.walk(chunk_dir) for f in fs)
    assert files
    with open(files[0], "r+b") as handle:
        handle.seek(100)
        byte = handle.read(1)
        handle.seek(100)
        handle.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(StoreCorruptionError, match=r"'scores/val'.*chunk \("):
        InfluenceStore(root, mode="r").scores_table("val", shards=["shard-1"])


def test_bad_input(tmp_path, root):
    with pytest.raises(StoreError, match="No influence store at"):
        InfluenceStore(str(tmp_path / "missing"), mode="r")
    store, influence = w.prepare(root)
    with pytest.raises(StoreError, match="Unknown test set 'test'"):
        store.status("test")
    with pytest.raises(StoreError, match="Unknown test set"):
        store.top_k("nope")
    with pytest.raises(StoreError, match="Shard index 8 is out of range"):
        store.write_shard_scores("val", 8, influence, w.shard_loader(0))
    with pytest.raises(StoreError, match="not allocated"):
        store.write_shard_scores("val", "shard-x", influence, w.shard_loader(0))
    with pytest.raises(StoreError, match="yielded 31 rows but was allocated with 29"):
        store.write_shard_scores("val", "shard-1", influence, w.shard_loader(0))
    assert store.status()["val"]["complete"] == []
    with pytest.raises(StoreError, match="Invalid test set 'a/b'"):
        store.write_factors("a/b", influence, [])


def test_non_finite_factors_are_refused(root):
    store = InfluenceStore(root)
    influence = w.fitted()
    _, _, xt, yt = w.data()
    bad = xt.clone()
    bad[9, 2] = float("nan")
    with pytest.raises(ValueError, match="Non-finite gradients"):
        store.write_factors("val", influence, DataLoader(TensorDataset(bad, yt), batch_size=4))
    status = store.status("val")["val"]
    assert (status["factors"], status["factors_state"]) == (False, "missing")
    assert status["complete"] == status["missing"] == []
    with pytest.raises(IncompleteArtifactError, match="not complete"):
        store.read_factors("val")
