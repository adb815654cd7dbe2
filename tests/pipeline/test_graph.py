"""The whole graph on a temporary instance: stored results equal the engine, tables and
audit are written, checks pass, and a second run computes nothing new."""

from __future__ import annotations

import dagster as dg
import numpy as np
import pandas as pd
import torch

from influence_pipeline.defs.runtime import restore
from influence_pipeline.store import InfluenceStore

from .conftest import N_SHARDS, N_TEST


def test_every_asset_and_check_succeeded(done):
    instance = done.instance
    for key in ("block_mapper", "data_audit"):
        assert instance.get_latest_materialization_event(dg.AssetKey(key)) is not None, key
    for key in ("influence_factors", "influence_table"):
        records = instance.fetch_materializations(dg.AssetKey(key), limit=100).records
        assert {r.partition_key for r in records} == set(done.workload.test_sets), key
    records = instance.fetch_materializations(dg.AssetKey("influence_scores"), limit=100).records
    assert len({r.partition_key for r in records}) == 2 * N_SHARDS
    for check in (
        "factors_finite",
        "factors_match_block_mapper",
        "scores_finite",
        "scores_spot_check",
        "all_shards_present",
    ):
        asset = {
            "factors": "influence_factors",
            "scores": "influence_scores",
            "all": "influence_table",
        }[check.split("_")[0]]
        evaluation = instance.event_log_storage.get_latest_asset_check_execution_by_key(
            [dg.AssetCheckKey(dg.AssetKey(asset), check)]
        )
        record = evaluation[dg.AssetCheckKey(dg.AssetKey(asset), check)]
        assert record.status.value == "SUCCEEDED", check


def test_stored_scores_equal_the_engine(done):
    store = InfluenceStore(done.workload.store, mode="r")
    influence = restore(store, done.workload, torch.device("cpu"), 256)
    for test_set in done.workload.test_sets:
        test = done.workload.test_set(test_set)
        allocation = store.allocation(test_set)["shards"]
        for shard in done.workload.shards.names():
            data = done.workload.shards.load(shard)
            expected = influence.influences(test.x, test.y, data.x, data.y).numpy()
            a = allocation[shard]
            stored = store.scores_array(test_set)[:, a["start"] : a["start"] + a["n_rows"]]
            # float32 factors and scores: relative error of float32 rounding
            assert np.linalg.norm(stored - expected) / np.linalg.norm(expected) < 1e-5
    status = store.status()
    assert set(status) == {"holdout", "validation"}
    for t in status:
        assert status[t]["factors"] is True
        assert status[t]["complete"] == [f"shard-{i}" for i in range(N_SHARDS)]
        assert status[t]["missing"] == status[t]["stale"] == []


def test_tables_and_audit_are_readable_with_pandas(done):
    store = InfluenceStore(done.workload.store, mode="r")
    top = store.read_table("validation/top_k")
    assert set(top.kind.unique()) == {"helpful", "harmful"}
    assert top.test_id.nunique() == N_TEST
    assert {"test_label", "train_label", "score", "train_shard"} <= set(top.columns)
    totals = store.read_table("validation/train_totals")
    assert len(totals) == sum(done.workload.shards.size(s) for s in done.workload.shards.names())
    audit = store.read_table("audit/latest")
    assert isinstance(audit, pd.DataFrame) and audit.flagged.any()
    known = set(done.workload.known_mislabeled())
    flagged_top = set(audit[audit.flagged].train_id.head(len(known)))
    assert len(flagged_top & known) >= 0.8 * len(known)  # the audit finds the flipped labels
    meta = done.instance.get_latest_materialization_event(
        dg.AssetKey("data_audit")
    ).asset_materialization.metadata
    assert "Known mislabeled examples found" in meta["summary"].value
    assert "data:image/png;base64" in meta["summary"].value


def test_second_run_computes_nothing_new(done):
    before = done.instance.get_latest_materialization_event(
        dg.AssetKey("block_mapper")
    ).asset_materialization
    result = done.materialize("block_mapper")
    after = result.get_asset_materialization_events()[0].materialization
    assert after.metadata["reused"].value is True
    assert after.tags["dagster/data_version"] == before.tags["dagster/data_version"]
    key = dg.MultiPartitionKey({"test_set": "holdout", "train_shard": "shard-1"})
    scores = done.materialize("influence_scores", key)
    assert (
        scores.get_asset_materialization_events()[0].materialization.metadata["reused"].value
        is True
    )
