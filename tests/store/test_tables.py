"""Tables for pandas users: one documented schema per table, the same names for the same
things, clear errors for unknown or unwritten tables, test points by id and by position,
and reading a store without importing torch."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from influence_pipeline.analysis.tables import influence_tables
from influence_pipeline.store import TABLES, InfluenceStore, StoreError
from influence_pipeline.store.schemas import TOP_K, TRAIN_TOTALS

from . import workload as w

SHARDS = ["shard-0", "shard-1"]


@pytest.fixture(scope="module")
def tables(tmp_path_factory):
    """A store with two scored shards and both tables written (with labels)."""
    root = str(tmp_path_factory.mktemp("tables") / "store")
    store, influence = w.prepare(root)
    for shard in SHARDS:
        i = int(shard.split("-")[1])
        store.write_shard_scores("val", shard, influence, w.shard_loader(i))
    _, y, _, yt = w.data()
    train_labels = {1000 + i: int(label) for i, label in enumerate(y.tolist())}
    test_labels = {i: int(label) for i, label in enumerate(yt.tolist())}
    top, totals = influence_tables(store, "val", 3, train_labels, test_labels, shards=SHARDS)
    store.write_table("val/top_k", top)
    store.write_table("val/train_totals", totals)
    return root, train_labels, test_labels


def test_every_schema_documents_its_columns():
    for schema in TABLES.values():
        names = [c.name for c in schema.columns]
        assert len(names) == len(set(names)), schema.kind
        assert all(c.description and c.dtype for c in schema.columns), schema.kind
    shared = {"train_id", "train_shard", "train_row", "train_label"}
    for schema in (TOP_K, TRAIN_TOTALS):  # the same names for the same things
        assert shared <= set(schema.dtypes())
        assert {c.name: c.dtype for c in schema.columns if c.name in shared} == {
            "train_id": "int64",
            "train_shard": "category",
            "train_row": "int64",
            "train_label": "Int64",
        }


def test_written_tables_read_back_with_their_schema(tables):
    root, train_labels, test_labels = tables
    store = InfluenceStore(root, mode="r")
    top = store.read_table("val/top_k")
    totals = store.read_table("val/train_totals")
    assert {c: str(t) for c, t in top.dtypes.items()} == TOP_K.dtypes()
    assert {c: str(t) for c, t in totals.dtypes.items()} == TRAIN_TOTALS.dtypes()
    TOP_K.check(top)
    TRAIN_TOTALS.check(totals)
    # test points by id and by position agree; labels follow the ids
    ids = store.test_ids("val")
    np.testing.assert_array_equal(ids[top.test_position.to_numpy()], top.test_id.to_numpy())
    assert (top.test_label == top.test_id.map(test_labels)).all()
    assert (top.train_label == top.train_id.map(train_labels)).all()
    assert (totals.train_label == totals.train_id.map(train_labels)).all()
    by_position = store.scores_table("val", test_positions=[2], shards=SHARDS)
    by_id = store.scores_table("val", test_ids=[int(ids[2])], shards=SHARDS)
    pd.testing.assert_frame_equal(by_position, by_id)


def test_tables_without_labels_keep_their_columns(tables):
    root, _, _ = tables
    top, totals = influence_tables(InfluenceStore(root, mode="r"), "val", 2, shards=SHARDS)
    assert list(top.columns) == list(TOP_K.dtypes())
    assert top.test_label.isna().all() and top.train_label.isna().all()
    assert totals.train_label.isna().all() and str(totals.train_label.dtype) == "Int64"


def test_unknown_unwritten_and_malformed_tables_are_clear_errors(tables, tmp_path):
    root, _, _ = tables
    store = InfluenceStore(root, mode="r")
    with pytest.raises(StoreError, match=r"Unknown table 'val/unknown'.*top_k.*audit/latest"):
        store.read_table("val/unknown")
    with pytest.raises(StoreError, match=r"'holdout/top_k' has not been written.*val/top_k"):
        store.read_table("holdout/top_k")
    assert store.read_table("holdout/top_k", missing_ok=True) is None
    assert store.tables() == ["val/top_k", "val/train_totals"]
    writable = InfluenceStore(str(tmp_path / "other"))
    bad = store.read_table("val/top_k").drop(columns=["test_position"])
    with pytest.raises(StoreError, match=r"top_k table.*missing column 'test_position'"):
        writable.write_table("val/top_k", bad)
    with pytest.raises(StoreError, match="Unknown table"):
        writable.write_table("val/scratch", bad)


def test_reading_a_store_does_not_import_torch(tables):
    root, _, _ = tables
    code = f"""
import json, sys
from influence_pipeline.store import InfluenceStore
store = InfluenceStore({root!r}, mode="r")
status = store.status("val")["val"]
top = store.top_k("val", 2, shards={SHARDS!r})
totals = store.train_aggregates("val", shards={SHARDS!r})
pairs = store.scores_table("val", test_positions=[0, 1], shards={SHARDS!r})
table = store.read_table("val/top_k")
print(json.dumps({{"torch": "torch" in sys.modules, "complete": status["complete"],
                  "rows": [len(top), len(totals), len(pairs), len(table)]}}))
"""
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    result = json.loads(done.stdout.strip().splitlines()[-1])
    n_rows = sum(w.SHARD_ROWS[:2])
    assert result == {
        "torch": False,
        "complete": SHARDS,
        "rows": [2 * 2 * w.N_TEST, n_rows, 2 * n_rows, 2 * 3 * w.N_TEST],
    }
