"""Nothing wrong is ever served as complete (issue 11's store findings).

Missing and corrupt chunks of every array the store reads, damaged metadata and markers,
completeness relative to the inputs (factors, fitted state, loss), two writers of one
shard, atomic replacement of factors and block mappers, names validated before any file is
opened, and allocation before fan-out. Each test failed on the store before these rules.
"""

from __future__ import annotations

import os
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from influence_pipeline.influence import BlockMode, DirectInfluence
from influence_pipeline.store import (
    IncompleteArtifactError,
    InfluenceStore,
    ProvenanceMismatchError,
    ShardSpec,
    StaleArtifactError,
    StoreCorruptionError,
    StoreError,
    validate_name,
)
from influence_pipeline.store.location import StoreLocation

from . import workload as w


@pytest.fixture
def root(tmp_path):
    return str(tmp_path / "store")


def _chunk_files(root: str, array: str) -> list[str]:
    top = os.path.join(root, *array.split("/"), "c")
    found = sorted(os.path.join(d, f) for d, _, fs in os.walk(top) for f in fs)
    if not found and os.path.isfile(top):  # a 0-d array
        found = [top]
    assert found, f"no chunk files under {top}"
    return found


def _flip_byte(path: str, at: int = 40) -> None:
    with open(path, "r+b") as handle:
        handle.seek(at)
        byte = handle.read(1)
        handle.seek(at)
        handle.write(bytes([byte[0] ^ 0xFF]))


def _stamp(path: str) -> tuple[int, bytes]:
    with open(path, "rb") as handle:
        return os.stat(path).st_mtime_ns, handle.read()


def _scored(root: str, shards=(0, 1)):
    store, influence = w.prepare(root)
    for i in shards:
        store.write_shard_scores("val", f"shard-{i}", influence, w.shard_loader(i))
    return store, influence


# ------------------------------------------------------------ missing and corrupt chunks
SHARD_ARRAYS = [
    "scores/val",
    "train_stats/val/shard-0/ids",
    "train_stats/val/shard-0/sum",
    "topk/val/shard-0/harmful_rows",
]


@pytest.mark.parametrize("array", SHARD_ARRAYS)
def test_a_missing_chunk_of_a_shard_makes_it_incomplete_and_a_rerun_redoes_it(root, array):
    store, influence = _scored(root)
    both = ["shard-0", "shard-1"]
    before = store.top_k("val", 5, shards=both).sort_values(["test_id", "kind", "rank"])
    os.remove(_chunk_files(root, array)[0])  # chunk (0, ...): shard-0 owns column block 0
    readonly = InfluenceStore(root, mode="r")
    state = readonly.shard_state("val", "shard-0")
    assert state.state == "damaged"
    assert repr(array) in state.reason and "is missing" in state.reason
    with pytest.raises(IncompleteArtifactError, match=r"shard-0.*damaged"):
        readonly.top_k("val", 5, shards=both)
    with pytest.raises(StoreCorruptionError, match=rf"'{array}'.*chunk .*is missing"):
        readonly._read(array, ...)
    assert readonly.shard_state("val", "shard-1").complete  # only the damaged shard
    # a writable store marks it incomplete; a re-run redoes exactly that shard
    assert store.status("val")["val"]["missing"][0] == "shard-0"
    store.write_shard_scores("val", "shard-0", influence, w.shard_loader(0))
    after = store.top_k("val", 5, shards=both).sort_values(["test_id", "kind", "rank"])
    np.testing.assert_array_equal(after.score.to_numpy(), before.score.to_numpy())


def test_a_corrupt_score_chunk_is_found_by_verify_and_redone(root):
    store, influence = _scored(root)
    expected = store.scores_table("val", shards=["shard-1"]).score.to_numpy()
    slot = store.allocation("val")["shards"]["shard-1"]
    block = slot["start"] // store.allocation("val")["shard_width"]
    _flip_byte(os.path.join(root, "scores", "val", "c", "0", str(block)))
    with pytest.raises(StoreCorruptionError, match=rf"'scores/val'.*chunk \(0, {block}\)"):
        InfluenceStore(root, mode="r").scores_table("val", shards=["shard-1"])
    assert store.shard_record("val", "shard-1", verify=True) is None  # and it is unmarked
    status = store.status("val")["val"]
    assert "shard-1" in status["missing"] and "shard-1" not in status["complete"]
    store.write_shard_scores("val", "shard-1", influence, w.shard_loader(1))
    got = store.scores_table("val", shards=["shard-1"]).score.to_numpy()
    np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("which", ["values", "ids"])
def test_a_missing_factors_chunk_makes_the_factors_incomplete(root, which):
    store, influence = _scored(root, shards=(0,))
    path = f"{store.factors_record('val')['path']}/{which}"
    os.remove(_chunk_files(root, path)[0])
    assert InfluenceStore(root, mode="r").factors_state("val").state == "damaged"
    with pytest.raises(IncompleteArtifactError, match=rf"'{path}'.*is missing"):
        store.factors_record("val")
    with pytest.raises(IncompleteArtifactError):
        store.top_k("val", 3, shards=["shard-0"])
    # recomputing the same factors restores them, and the shard scored with them is served
    _, _, xt, yt = w.data()
    store.write_factors("val", influence, DataLoader(TensorDataset(xt, yt), batch_size=7))
    assert store.status("val")["val"]["complete"] == ["shard-0"]


def test_a_missing_or_corrupt_block_mapper_chunk_is_reported_and_rewritten(root):
    store = InfluenceStore(root)
    influence = w.fitted()
    digest = store.save_block_mapper(influence)
    array = (
        f"block_mapper/v-{digest}/b0/"
        + sorted(os.listdir(os.path.join(root, "block_mapper", f"v-{digest}", "b0")))[0]
    )
    chunk = _chunk_files(root, array)[0]
    _flip_byte(chunk, at=os.path.getsize(chunk) // 2)
    with pytest.raises(StoreCorruptionError, match=rf"'{array}'.*chunk .*fails to decode"):
        store.load_block_mapper(w.model())
    with pytest.warns(UserWarning, match="incomplete"):  # marked incomplete when found
        assert store.block_mapper_info() is None
    assert store.save_block_mapper(influence) == digest  # rewritten, intact again
    assert store.load_block_mapper(w.model()) is not None
    os.remove(_chunk_files(root, array)[0])
    with pytest.warns(UserWarning, match=rf"'{array}'.*is missing"):
        assert store.block_mapper_info() is None
    with (
        pytest.raises(StoreError, match="no intact fitted block mapper"),
        pytest.warns(UserWarning, match="marked incomplete"),
    ):
        store.load_block_mapper(w.model())
    store.save_block_mapper(influence)
    assert store.load_block_mapper(w.model()) is not None


def test_damaged_markers_and_metadata_name_their_file(root):
    store, _ = _scored(root)
    marker = os.path.join(root, "_status", "scores", "val", "shard-0.json")
    with open(marker, "r+b") as handle:
        handle.truncate(10)  # JSONDecodeError
    state = InfluenceStore(root, mode="r").shard_state("val", "shard-0")
    assert state.state == "damaged" and "shard-0.json" in state.reason
    assert "shard-0" in store.status("val")["val"]["missing"]
    metadata = os.path.join(root, "scores", "val", "zarr.json")
    _flip_byte(metadata, at=5)  # UnicodeDecodeError or invalid JSON
    with pytest.raises(StoreCorruptionError, match=r"scores/val/zarr\.json"):
        InfluenceStore(root, mode="r").status("val")
    with open(metadata, "r+b") as handle:
        handle.truncate(30)
    # a truncated zarr.json never makes the shards vanish nor brings old values back
    with pytest.raises(StoreCorruptionError, match=r"scores/val/zarr\.json"):
        store.status("val")
    with pytest.raises(StoreCorruptionError, match=r"scores/val/zarr\.json"):
        store.allocate_shards("val", [ShardSpec("shard-0", w.SHARD_ROWS[0])])
    factors_marker = os.path.join(root, "_status", "factors", "val.json")
    _flip_byte(factors_marker, at=3)
    with pytest.raises(StoreCorruptionError, match=r"val\.json"):
        StoreLocation(root).read_json("_status/factors/val.json")


def test_a_lost_scores_metadata_file_never_brings_old_values_back(root):
    store, _ = _scored(root, shards=(0, 1, 2))
    os.remove(os.path.join(root, "scores", "val", "zarr.json"))
    store.allocate_shards("val", [ShardSpec("late", 40)])
    assert store.status("val")["val"]["complete"] == []
    slot = store.allocation("val")["shards"]["late"]
    assert slot["start"] == 0  # the columns that held shard-0 ...
    assert np.isnan(store.scores_array("val")[:, : slot["stop"]]).all()  # ... hold no old value


# ------------------------------------------------------------ completeness relative to inputs
def test_shards_of_other_factors_or_another_block_mapper_are_stale(root):
    store, influence = _scored(root, shards=(0, 1))
    _, _, xt, yt = w.data()
    # other test points under the same name: every old shard is stale, none served
    store.write_factors("val", influence, DataLoader(TensorDataset(xt * 2, yt), batch_size=7))
    status = store.status("val")["val"]
    assert status["complete"] == [] and status["stale"] == ["shard-0", "shard-1"]
    assert "factors_fingerprint" in status["problems"]["shard-0"]
    with pytest.raises(IncompleteArtifactError, match="stale"):
        store.top_k("val", 3, shards=["shard-0", "shard-1"])
    with pytest.raises(IncompleteArtifactError, match="stale"):
        store.train_aggregates("val", shards=["shard-0"])
    store.write_shard_scores("val", "shard-0", influence, w.shard_loader(0))
    assert store.status("val")["val"]["complete"] == ["shard-0"]
    # another block mapper saved: the factors (and so every shard) are stale
    other = w.fitted(w.model(seed=3))
    store.save_block_mapper(other)
    assert store.factors_state("val").state == "stale"
    with pytest.raises(StaleArtifactError, match="block mapper"):
        store.factors_record("val")
    status = store.status("val")["val"]
    assert status["factors"] is False and status["complete"] == []
    assert status["stale"] == ["shard-0", "shard-1"]


def test_scoring_with_another_fitted_state_or_loss_is_refused(root):
    store, _ = w.prepare(root)
    x, y, _, _ = w.data()
    refit = DirectInfluence(w.model(), F.cross_entropy, regularization=0.1).fit(
        DataLoader(TensorDataset(x[:100], y[:100]), batch_size=50)
    )  # same model, method and config, fitted on other data
    with pytest.raises(ProvenanceMismatchError, match="fitted state"):
        store.write_shard_scores("val", "shard-0", refit, w.shard_loader(0))
    with pytest.raises(ProvenanceMismatchError, match="loss"):
        store.load_block_mapper(w.model(), loss=F.mse_loss)
    assert store.status("val")["val"]["complete"] == []


def test_a_second_writer_of_a_shard_is_refused_while_the_first_runs(root):
    """The lease is an flock: a second open of it conflicts, in this process or another
    (a killed writer's lease is freed by the kernel: see the killed-writer test)."""
    from influence_pipeline.store import ShardWriter

    store, influence = w.prepare(root)
    first = ShardWriter(store, "val", "shard-2")  # a writer in the middle of its shard
    first.add(np.zeros((w.N_TEST, 8), np.float32))
    with pytest.raises(StoreError, match=r"shard-2.*being written by another writer"):
        store.write_shard_scores("val", "shard-2", influence, w.shard_loader(2))
    assert store.shard_record("val", "shard-2") is None
    first.close()  # stopped without finishing: its lease is free, nothing is complete
    assert store.shard_record("val", "shard-2") is None
    store.write_shard_scores("val", "shard-2", influence, w.shard_loader(2))
    x, y, xt, yt = w.data()
    rows = torch.from_numpy(w.shard_rows()[2])
    expected = influence.influences(xt, yt, x[rows], y[rows]).numpy()
    stored = store.scores_table("val", shards=["shard-2"]).score.to_numpy()
    # float32 storage: relative error of float32 rounding (as the other store tests)
    assert np.linalg.norm(stored.reshape(expected.shape) - expected) < 1e-5 * np.linalg.norm(
        expected
    )
    totals = store.train_aggregates("val", shards=["shard-2"]).score_sum.to_numpy()
    assert np.linalg.norm(totals - expected.sum(0)) < 1e-5 * np.linalg.norm(expected.sum(0))


class _NoLease:
    def release(self) -> None:
        pass


def test_without_leases_the_marker_belongs_to_the_latest_writer(root, monkeypatch):
    """Object storage has no lease: the latest writer's claim decides whose data is marked."""
    from influence_pipeline.store import ShardWriter

    store, _ = w.prepare(root)
    monkeypatch.setattr(StoreLocation, "lease", lambda self, key, what: _NoLease())
    n = w.SHARD_ROWS[0]
    first, second = np.random.default_rng(0).standard_normal((2, w.N_TEST, n)).astype(np.float32)
    a = ShardWriter(store, "val", "shard-0")
    a.add(first[:, :20])
    b = ShardWriter(store, "val", "shard-0")  # a staggered start
    b.add(second)
    a.add(first[:, 20:])
    with pytest.raises(StoreError, match="Another writer claimed shard 'shard-0'"):
        a.finish("a")
    assert store.shard_record("val", "shard-0") is None  # b is still writing
    b.finish("b")
    stored = store.scores_table("val", shards=["shard-0"]).score.to_numpy()
    np.testing.assert_array_equal(stored.reshape(w.N_TEST, n), second)
    sums = store.train_aggregates("val", shards=["shard-0"]).score_sum.to_numpy()
    np.testing.assert_allclose(sums, second.sum(axis=0, dtype=np.float64), rtol=1e-12)
    # a writer that starts after a marker was written voids it, even if it then dies
    c = ShardWriter(store, "val", "shard-0")
    assert store.shard_state("val", "shard-0").state == "missing"
    c.close()  # killed: the shard stays incomplete until scored again


def test_the_memory_store_lease_excludes_a_second_writer():
    store, _ = w.prepare("memory://lease-test")
    from influence_pipeline.store import ShardWriter

    first = ShardWriter(store, "val", "shard-0")
    with pytest.raises(StoreError, match="being written by another writer"):
        ShardWriter(store, "val", "shard-0")
    first.close()
    ShardWriter(store, "val", "shard-0").close()  # free again


# ------------------------------------------------------------ atomic replacement
class _FailingLoader:
    def __init__(self, batches):
        self.batches = batches

    def __iter__(self):
        yield from self.batches
        raise RuntimeError("the loader broke mid-write")


def test_a_failed_rewrite_of_the_factors_keeps_the_previous_ones(root):
    store, influence = _scored(root, shards=(0,))
    values, ids = store.read_factors("val")
    _, _, xt, yt = w.data()
    bad = xt.clone()
    bad[4, 1] = float("nan")
    with pytest.raises(ValueError, match=r"not finite|Non-finite"):
        store.write_factors("val", influence, DataLoader(TensorDataset(bad, yt), batch_size=7))
    with pytest.raises(StoreError, match="yielded no rows"):
        store.write_factors("val", influence, [])
    with pytest.raises(RuntimeError, match="broke mid-write"):
        store.write_factors("val", influence, _FailingLoader([(xt[:7] * 3, yt[:7])]))
    again, again_ids = store.read_factors("val")
    np.testing.assert_array_equal(again, values)
    np.testing.assert_array_equal(again_ids, ids)
    assert store.status("val")["val"]["complete"] == ["shard-0"]
    versions = os.listdir(os.path.join(root, "factors", "val"))
    assert [v for v in versions if v.startswith("v-")] == [store.factors_record("val")["path"][12:]]


def test_a_failed_save_of_a_block_mapper_keeps_the_previous_one(root, monkeypatch):
    store = InfluenceStore(root)
    influence = w.fitted()
    digest = store.save_block_mapper(influence)
    import zarr

    calls = {"n": 0}
    original = zarr.Group.create_array

    def fail_after_the_first(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] >= 2:
            raise OSError("disk full")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(zarr.Group, "create_array", fail_after_the_first)
    other = DirectInfluence(
        w.model(), F.cross_entropy, regularization=0.5, block_structure=BlockMode.LAYER_WISE
    ).fit(  # two blocks: the save fails after its first tensor
        DataLoader(TensorDataset(*w.data()[:2]), batch_size=64)
    )
    with pytest.raises(OSError, match="disk full"):
        store.save_block_mapper(other)
    monkeypatch.undo()
    assert store.block_mapper_info()["digest"] == digest
    restored = store.load_block_mapper(w.model())
    _, _, xt, yt = w.data()
    np.testing.assert_allclose(
        restored.influence_factors(xt[:3], yt[:3]).numpy(),
        influence.influence_factors(xt[:3], yt[:3]).numpy(),
        rtol=1e-6,
    )


# ------------------------------------------------------------ names and allocation
@pytest.mark.parametrize("bad", ["../test/holdout", "..", "a/b", "", "@x", None, "x" * 201])
def test_names_are_validated_before_any_file_is_opened(tmp_path, bad):
    with pytest.raises(StoreError, match="Invalid training shard"):
        validate_name(bad, "training shard")
    store = InfluenceStore(str(tmp_path / "s"))
    before = sorted(os.listdir(tmp_path))
    for call in (
        lambda: store.factors_record(bad),
        lambda: store.allocation(bad),
        lambda: store.read_table(f"{bad}/top_k" if isinstance(bad, str) else bad),
        lambda: store.write_example_values("audit", bad, {}, {}),
    ):
        with pytest.raises(StoreError, match=r"Invalid|Unknown table"):
            call()
    assert sorted(os.listdir(tmp_path)) == before


def test_allocation_is_idempotent_and_unallocated_shards_are_refused(root, monkeypatch):
    store, influence = w.prepare(root)
    metadata = os.path.join(root, "scores", "val", "zarr.json")
    stamp = _stamp(metadata)
    specs = [ShardSpec(f"shard-{i}", n) for i, n in enumerate(w.SHARD_ROWS)]
    time.sleep(0.01)
    assert store.allocate_shards("val", specs) == store.allocation("val")
    assert store.ensure_allocated("val", "shard-3", w.SHARD_ROWS[3])["n_rows"] == w.SHARD_ROWS[3]
    assert _stamp(metadata) == stamp  # nothing was written
    with pytest.raises(StoreError, match=r"'late' is not allocated.*allocate it before scoring"):
        store.write_shard_scores("val", "late", influence, w.shard_loader(0))
    # without a lock (object storage) a late shard is refused, not allocated racily
    monkeypatch.setattr(StoreLocation, "has_lock", property(lambda self: False))
    with pytest.raises(StoreError, match=r"object storage.*before fanning out"):
        store.ensure_allocated("val", "late", 12)
    assert "late" not in store.allocation("val")["shards"]
    monkeypatch.undo()
    assert store.ensure_allocated("val", "late", 12)["n_rows"] == 12  # local: under its lock
