"""Re-materialization on change: one changed shard re-scores exactly that shard, a new
regularization makes everything downstream stale, nothing changed requests nothing; the
sensor registers new shards; the nightly pass runs the whole-store checks and nothing else
when everything is current."""

from __future__ import annotations

import dagster as dg

from influence_pipeline.defs import build_definitions
from influence_pipeline.store import InfluenceStore
from influence_pipeline.workload import MethodSpec, ShardData, load_tensor_file, save_tensor_file

from .conftest import N_SHARDS, STORE_CHECKS, nightly, requested, settle


def shard_file(s, name):
    return s.data_dir / "train" / f"{name}.pt"


def change_shard(s, name):
    """Relabel one example of a shard (a new fingerprint and new content)."""
    data = load_tensor_file(shard_file(s, name))
    y = data.y.clone()
    y[0] = (y[0] + 1) % 10
    save_tensor_file(shard_file(s, name), ShardData(data.x, y, data.ids))


def test_changes_rescore_exactly_what_changed(setup):
    s = setup
    s.workload.fit_shards = ["shard-0", "shard-2"]  # shard-1 is scored, not fitted on
    s.defs = build_definitions(s.workload)
    s.run_all()
    result = settle(s)
    assert requested(result) == {}, "a complete run leaves nothing to do"
    # (c) nothing changed: the nightly pass requests only the whole-store checks
    assert requested(nightly(s, result.cursor)) == STORE_CHECKS

    # (a) one changed training shard re-scores exactly that shard, for every test set
    change_shard(s, "shard-1")
    s.register()
    result = dg.evaluate_automation_conditions(
        defs=s.defs, instance=s.instance, cursor=result.cursor
    )
    assert requested(result) == {"influence_scores": ["holdout|shard-1", "validation|shard-1"]}
    for partition in requested(result)["influence_scores"]:
        s.materialize("influence_scores", partition)
    result = dg.evaluate_automation_conditions(
        defs=s.defs, instance=s.instance, cursor=result.cursor
    )
    assert requested(result) == {"influence_table": ["holdout", "validation"]}
    for test_set in ("holdout", "validation"):
        s.materialize("influence_table", test_set)
    result = dg.evaluate_automation_conditions(
        defs=s.defs, instance=s.instance, cursor=result.cursor
    )
    assert requested(result) == {"data_audit": [""]}
    s.materialize("data_audit")
    result = dg.evaluate_automation_conditions(
        defs=s.defs, instance=s.instance, cursor=result.cursor
    )
    assert requested(result) == {}

    # (b) a new regularization (Launchpad config) gives a new fitted state: all downstream stale
    s.materialize(
        "block_mapper", run_config={"ops": {"block_mapper": {"config": {"regularization": 0.5}}}}
    )
    result = dg.evaluate_automation_conditions(
        defs=s.defs, instance=s.instance, cursor=result.cursor
    )
    assert requested(result) == {"influence_factors": ["holdout", "validation"]}
    for test_set in ("holdout", "validation"):
        s.materialize("influence_factors", test_set)
    result = dg.evaluate_automation_conditions(
        defs=s.defs, instance=s.instance, cursor=result.cursor
    )
    assert requested(result) == {
        "influence_scores": sorted(
            f"{t}|shard-{i}" for t in ("holdout", "validation") for i in range(N_SHARDS)
        )
    }


def test_method_change_in_code_is_a_code_version_change(setup):
    s = setup
    s.run_all()
    result = settle(s)
    assert requested(result) == {}
    method = s.workload.method
    changed = s.workload
    changed.method = MethodSpec(method="direct", regularization=0.3)
    new_defs = build_definitions(changed)
    result = dg.evaluate_automation_conditions(
        defs=new_defs, instance=s.instance, cursor=result.cursor
    )
    assert requested(result) == {"block_mapper": [""]}
    # back to the materialized code: a changed fit shard requests the block mapper (its
    # upstream) before anything runs
    s.workload.method = method
    result = settle(s)
    assert requested(result) == {}
    change_shard(s, "shard-0")
    s.register()
    result = dg.evaluate_automation_conditions(
        defs=s.defs, instance=s.instance, cursor=result.cursor
    )
    assert "block_mapper" in requested(result)


def test_sensor_registers_a_new_shard(setup):
    s = setup
    s.run_all()
    result = settle(s)
    extra = load_tensor_file(shard_file(s, "shard-0"))
    save_tensor_file(
        shard_file(s, "shard-9"), ShardData(extra.x[:20], extra.y[:20], extra.ids[:20] + 100_000)
    )
    sensor = s.defs.resolve_sensor_def("training_shard_sensor")
    with dg.build_sensor_context(instance=s.instance, definitions=s.defs) as context:
        sensor_result = sensor(context)
    assert [list(r.partition_keys) for r in sensor_result.dynamic_partitions_requests] == [
        ["shard-9"]
    ]
    observed = {e.partition for e in sensor_result.asset_events}
    assert "shard-9" in observed
    s.register()
    assert "shard-9" in s.instance.get_dynamic_partitions("train_shards")
    result = dg.evaluate_automation_conditions(
        defs=s.defs, instance=s.instance, cursor=result.cursor
    )
    assert requested(result) == {"influence_scores": ["holdout|shard-9", "validation|shard-9"]}
    # the new shard is allocated on demand by its scoring step and scored
    s.materialize("influence_scores", "validation|shard-9")
    store = InfluenceStore(s.workload.store, mode="r")
    assert "shard-9" in store.status("validation")["validation"]["complete"]
    assert store.scores_table("validation", shards=["shard-9"]).train_id.min() >= 100_000
    # a second sensor tick with nothing new reports nothing
    with dg.build_sensor_context(
        instance=s.instance, definitions=s.defs, cursor=sensor_result.cursor
    ) as context:
        again = sensor(context)
    assert again.dynamic_partitions_requests == [] and again.asset_events == []


def test_a_removed_shard_leaves_the_tables_and_the_audit(setup):
    s = setup
    s.run_all()
    result = settle(s)
    store = InfluenceStore(s.workload.store, mode="r")
    removed_ids = set(store.train_aggregates("validation", shards=["shard-2"]).train_id)
    shard_file(s, "shard-2").unlink()
    sensor = s.defs.resolve_sensor_def("training_shard_sensor")
    with dg.build_sensor_context(instance=s.instance, definitions=s.defs) as context:
        sensor_result = sensor(context)
    deletions = [
        list(r.partition_keys)
        for r in sensor_result.dynamic_partitions_requests
        if isinstance(r, dg.DeleteDynamicPartitionsRequest)
    ]
    assert deletions == [["shard-2"]]
    # the sensor asks for the tables again: nothing upstream of them changed
    rebuild = sorted(
        (r.partition_key, tuple(k.to_user_string() for k in r.asset_selection or []))
        for r in sensor_result.run_requests or []
    )
    assert rebuild == [(t, ("influence_table",)) for t in sorted(s.workload.test_sets)]
    assert s.register() == [f"shard-{i}" for i in range(N_SHARDS - 1)]
    for test_set in s.workload.test_sets:
        s.materialize("influence_table", test_set)
    # new tables: automation carries the change to the audit, and only there
    result = dg.evaluate_automation_conditions(
        defs=s.defs, instance=s.instance, cursor=result.cursor
    )
    assert requested(result) == {"data_audit": [""]}
    assert s.materialize("data_audit").success
    for test_set in s.workload.test_sets:
        top = store.read_table(f"{test_set}/top_k")
        totals = store.read_table(f"{test_set}/train_totals")
        assert not removed_ids & set(top.train_id) and not removed_ids & set(totals.train_id)
    flagged = store.read_table("audit/latest")
    assert not removed_ids & set(flagged.train_id)
