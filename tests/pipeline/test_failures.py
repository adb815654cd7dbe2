"""A failing step fails its run with a clear message, leaves earlier artifacts and other
shards intact, and a retry after the cause is fixed completes the work."""

from __future__ import annotations

import shutil

import dagster as dg
import torch

from influence_pipeline.defs import build_definitions
from influence_pipeline.store import InfluenceStore
from influence_pipeline.workload import ShardData, load_tensor_file, save_tensor_file

from .conftest import STORE_CHECKS, nightly, requested, settle


def failure_message(result: dg.ExecuteInProcessResult) -> str:
    failures = [e for e in result.all_events if e.is_step_failure]
    assert failures, "expected a failed step"
    data = failures[0].step_failure_data
    error = data.error.message if data.error else ""
    description = data.user_failure_data.description if data.user_failure_data else ""
    return f"{error} {description}"


def test_bad_checkpoint_fails_clearly_and_keeps_the_store(setup, tmp_path):
    s = setup
    s.run_all()
    store = InfluenceStore(s.workload.store, mode="r")
    digest = store.block_mapper_info()["digest"]
    status = store.status()
    good = s.workload.checkpoint
    bad = tmp_path / "broken.pt"
    bad.write_bytes(b"not a checkpoint")
    s.workload.checkpoint = bad
    s.defs = build_definitions(s.workload)
    result = s.materialize(
        "block_mapper",
        run_config={"ops": {"block_mapper": {"config": {"regularization": 0.2}}}},
        raise_on_error=False,
    )
    assert not result.success
    assert "Cannot load the checkpoint" in failure_message(result) and str(bad) in failure_message(
        result
    )
    store = InfluenceStore(s.workload.store, mode="r")
    assert store.block_mapper_info()["digest"] == digest
    assert store.status() == status
    # fix the cause and retry: it completes
    s.workload.checkpoint = good
    s.defs = build_definitions(s.workload)
    retry = s.materialize(
        "block_mapper", run_config={"ops": {"block_mapper": {"config": {"regularization": 0.2}}}}
    )
    assert retry.success
    assert InfluenceStore(s.workload.store, mode="r").block_mapper_info()["digest"] != digest


def test_non_finite_shard_fails_its_partition_only(setup):
    s = setup
    s.run_all()
    path = s.data_dir / "train" / "shard-2.pt"
    backup = path.with_suffix(".bak")
    shutil.copy(path, backup)
    data = load_tensor_file(path)
    x = data.x.clone()
    x[5, 3] = float("nan")
    save_tensor_file(path, ShardData(x, data.y, data.ids))
    s.register()
    result = s.materialize("influence_scores", "validation|shard-2", raise_on_error=False)
    assert not result.success
    message = failure_message(result)
    assert "Non-finite gradients for samples at batch positions [5]" in message
    # no retries were spent on a data error
    assert sum(1 for e in result.all_events if e.event_type_value == "STEP_RESTARTED") == 0
    # automation does not loop on the failure; the nightly pass requests it again (with
    # the whole-store checks)
    settled = settle(s)
    assert requested(settled) == {}
    assert requested(nightly(s, settled.cursor)) == {
        "influence_scores": ["validation|shard-2"],
        **STORE_CHECKS,
    }
    store = InfluenceStore(s.workload.store, mode="r")
    status = store.status("validation")["validation"]
    assert status["missing"] == ["shard-2"]
    assert status["complete"] == ["shard-0", "shard-1"]
    assert store.status("holdout")["holdout"]["complete"] == ["shard-0", "shard-1", "shard-2"]
    # the table refuses to pretend: its blocking check fails while a shard is missing
    table = s.materialize("influence_table", "validation", raise_on_error=False)
    checks = {c.check_name: c.passed for c in table.get_asset_check_evaluations()}
    assert checks == {"all_shards_present": False}
    # fix the data and retry the partition: it completes
    shutil.copy(backup, path)
    s.register()
    retry = s.materialize("influence_scores", "validation|shard-2")
    assert retry.success
    assert (
        InfluenceStore(s.workload.store, mode="r").status("validation")["validation"]["missing"]
        == []
    )
    assert torch.isfinite(torch.as_tensor(load_tensor_file(path).x)).all()
    # a shard of the wrong shape is a data error: refused naming the shard, never retried
    data = load_tensor_file(path)
    save_tensor_file(path, ShardData(data.x[:, :10].contiguous(), data.y, data.ids))
    s.register()
    result = s.materialize("influence_scores", "validation|shard-2", raise_on_error=False)
    assert not result.success
    assert "Training shard 'shard-2'" in failure_message(result)
    assert "expected (n, 64)" in failure_message(result)
    assert sum(1 for e in result.all_events if e.event_type_value == "STEP_RESTARTED") == 0
    shutil.copy(backup, path)
    # an empty shard is skipped with a warning: scoring succeeds, the tables do not wait for it
    empty = ShardData(data.x[:0], data.y[:0], data.ids[:0])
    save_tensor_file(s.data_dir / "train" / "shard-7.pt", empty)
    s.register()
    scored = s.materialize("influence_scores", "validation|shard-7")
    assert (
        scored.get_asset_materialization_events()[0].materialization.metadata["n_rows"].value == 0
    )
    table = s.materialize("influence_table", "validation")
    assert {c.check_name: c.passed for c in table.get_asset_check_evaluations()} == {
        "all_shards_present": True
    }
