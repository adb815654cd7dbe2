"""Keeping the pipeline current: a sensor for training shards, declarative automation, and
the nightly schedule.

* ``training_shard_sensor`` (every minute, running by default) registers new training
  shards as partitions of ``train_shards`` and reports each new or changed shard's
  fingerprint as an observation of ``training_shards``; a changed fingerprint is a new data
  version, which re-scores exactly that shard for every test set. A shard whose data is
  gone is unregistered and the tables are rebuilt without it (the audit follows).
* ``influence_automation`` (running by default) materializes partitions whose automation
  condition holds: missing, code version changed, or an upstream data version changed.
* ``nightly_influence_audit`` (02:00 UTC, running by default) requests the stale or missing
  partitions whose own upstream is fresh (the frontier; automation carries the change
  downstream as each run lands), and runs the whole-store asset checks.
"""

import datetime as _dt
import json
from collections.abc import Sequence
from typing import Any

import dagster as dg
from dagster._core.definitions.data_version import CachingStaleStatusResolver, StaleStatus
from dagster._core.loader import LoadingContext

from ..workload import Workload

DATA_VERSION_TAG = "dagster/data_version"


def build_shard_sensor(
    workload: Workload, shards_def: dg.DynamicPartitionsDefinition
) -> dg.SensorDefinition:
    @dg.sensor(
        name="training_shard_sensor",
        minimum_interval_seconds=60,
        default_status=dg.DefaultSensorStatus.RUNNING,
        asset_selection=[dg.AssetKey("influence_table")],
        description="Registers new training shards as partitions, reports changed shards and "
        "unregisters removed ones.",
    )
    def training_shard_sensor(context: dg.SensorEvaluationContext) -> dg.SensorResult:
        names = workload.shards.names()
        known = set(context.instance.get_dynamic_partitions(str(shards_def.name)))
        new = [name for name in names if name not in known]
        fingerprints = {name: workload.shards.fingerprint(name) for name in names}
        previous = json.loads(context.cursor) if context.cursor else {}
        changed = [name for name in names if previous.get(name) != fingerprints[name]]
        events = [
            dg.AssetObservation(
                asset_key="training_shards",
                partition=name,
                tags={DATA_VERSION_TAG: fingerprints[name]},
            )
            for name in changed
        ]
        # a shard whose data is gone stops being a partition (its stored scores stay, but
        # the tables and the audit cover only the shards that exist)
        gone = sorted(known - set(names))
        requests: list[Any] = [shards_def.build_add_request(new)] if new else []
        rebuild: list[dg.RunRequest] = []
        if gone:
            requests.append(shards_def.build_delete_request(gone))
            # nothing upstream of the tables changed, so automation would not notice:
            # rebuild them (the audit follows as their data versions change)
            rebuild = [
                dg.RunRequest(
                    partition_key=test_set,
                    asset_selection=[dg.AssetKey("influence_table")],
                    tags={"influence_pipeline/reason": f"shards removed: {', '.join(gone)}"},
                )
                for test_set in workload.test_sets
            ]
        return dg.SensorResult(
            run_requests=rebuild,
            dynamic_partitions_requests=requests,
            asset_events=events,
            cursor=json.dumps(fingerprints, sort_keys=True),
        )

    return training_shard_sensor


class _Loading(LoadingContext):
    """The minimal loading context the stale-status resolver needs."""

    def __init__(self, instance: dg.DagsterInstance) -> None:
        self._instance = instance
        self._loaders: dict[type, Any] = {}

    @property
    def instance(self) -> dg.DagsterInstance:
        return self._instance

    @property
    def loaders(self) -> dict[type, Any]:
        return self._loaders


def stale_frontier(
    instance: dg.DagsterInstance,
    asset_graph: Any,
    test_sets: Sequence[str],
    shards: Sequence[str],
) -> list[tuple[str, str | dg.MultiPartitionKey | None]]:
    """(asset, partition) pairs that are stale or missing while everything they read from is
    fresh, in dependency order."""
    resolver = CachingStaleStatusResolver(instance, asset_graph, _Loading(instance))

    def bad(key: str, partition: str | dg.MultiPartitionKey | None) -> bool:
        return resolver.get_status(dg.AssetKey(key), partition) in (
            StaleStatus.STALE,
            StaleStatus.MISSING,
        )

    requests: list[tuple[str, str | dg.MultiPartitionKey | None]] = []
    if bad("block_mapper", None):
        return [("block_mapper", None)]
    factors_bad = {t: bad("influence_factors", t) for t in test_sets}
    requests += [("influence_factors", t) for t, b in factors_bad.items() if b]
    scores_bad: dict[str, bool] = {}
    for t in test_sets:
        if factors_bad[t]:
            scores_bad[t] = True
            continue
        partitions = [dg.MultiPartitionKey({"test_set": t, "train_shard": s}) for s in shards]
        stale = [p for p in partitions if bad("influence_scores", p)]
        requests += [("influence_scores", p) for p in stale]
        scores_bad[t] = bool(stale)
    tables_bad = {}
    for t in test_sets:
        if scores_bad[t]:
            tables_bad[t] = True
            continue
        tables_bad[t] = bad("influence_table", t)
        if tables_bad[t]:
            requests.append(("influence_table", t))
    if not any(tables_bad.values()) and bad("data_audit", None):
        requests.append(("data_audit", None))
    return requests


#: The nightly schedules, one per partitioning of the assets (an asset job, hence a schedule
#: target, cannot mix partitions definitions): name → (assets, include the store checks).
NIGHTLY = {
    "nightly_influence_audit": (("block_mapper", "data_audit"), True),
    "nightly_influence_test_sets": (("influence_factors", "influence_table"), False),
    "nightly_influence_scores": (("influence_scores",), False),
}


def build_nightly_schedules(
    workload: Workload,
    shards_def: dg.DynamicPartitionsDefinition,
    check_keys: Sequence[dg.AssetCheckKey],
) -> list[dg.ScheduleDefinition]:
    """Three schedules at 02:00 UTC that together request the stale-or-missing frontier
    (each the part whose partitioning matches its job) and run the whole-store checks."""
    schedules = []
    for name, (assets, with_checks) in NIGHTLY.items():
        selection: dg.AssetSelection = dg.AssetSelection.assets(*assets)
        if with_checks:
            selection = selection | dg.AssetSelection.checks(*check_keys)
        job = dg.define_asset_job(f"{name}_job", selection=selection)
        schedules.append(
            _nightly(name, job, set(assets), with_checks, workload, shards_def, check_keys)
        )
    return schedules


def _nightly(
    name: str,
    job: Any,
    assets: set[str],
    with_checks: bool,
    workload: Workload,
    shards_def: dg.DynamicPartitionsDefinition,
    check_keys: Sequence[dg.AssetCheckKey],
) -> dg.ScheduleDefinition:
    @dg.schedule(
        name=name,
        cron_schedule="0 2 * * *",
        execution_timezone="UTC",
        default_status=dg.DefaultScheduleStatus.RUNNING,
        job=job,
        description=f"02:00 UTC: materialize the stale or missing partitions of {sorted(assets)} "
        "whose upstream is fresh" + (", and run the whole-store checks." if with_checks else "."),
    )
    def nightly(context: dg.ScheduleEvaluationContext) -> list[dg.RunRequest]:
        try:
            when = context.scheduled_execution_time
        except Exception:  # a context built without a tick time (tests, manual evaluation)
            when = None
        night = (when or _dt.datetime.now(_dt.UTC)).strftime("%Y-%m-%d")
        available = set(workload.shards.names())
        shards = [
            s
            for s in context.instance.get_dynamic_partitions(str(shards_def.name))
            if s in available
        ]
        frontier = stale_frontier(
            context.instance, context.repository_def.asset_graph, list(workload.test_sets), shards
        )
        requests = [
            dg.RunRequest(
                run_key=f"{night}:{asset}:{partition}",
                asset_selection=[dg.AssetKey(asset)],
                partition_key=str(partition) if partition is not None else None,
                tags={"influence/nightly": night},
            )
            for asset, partition in frontier
            if asset in assets
        ]
        if with_checks:
            requests.append(
                dg.RunRequest(
                    run_key=f"{night}:checks",
                    asset_selection=[],
                    asset_check_keys=list(check_keys),
                    tags={"influence/nightly": night},
                )
            )
        return requests

    return nightly
