"""Keeping the pipeline current: a sensor for training shards and declarative automation
(continuous, plus a nightly pass), all through Dagster's public API.

* ``training_shard_sensor`` (every minute, running by default) registers new training
  shards as partitions of ``train_shards`` and reports each new or changed shard's
  fingerprint as an observation of ``training_shards``; a changed fingerprint is a new data
  version, which re-scores exactly that shard for every test set. A shard whose data is
  gone is unregistered and the tables are rebuilt without it (the audit follows).
* ``influence_automation`` (running by default) evaluates :func:`automation_condition` on
  every asset: a partition is requested when it is missing, its code version changed or an
  upstream data version changed; and once a night, at the first tick after ``NIGHTLY_CRON``
  (02:00 UTC), again when it is still missing or its latest run failed (a run that died is
  retried by the next night at the latest). The whole-store checks carry
  :func:`nightly_check_condition`: they run once after each nightly tick.
"""

import json
from typing import Any

import dagster as dg

from ..workload import Workload

DATA_VERSION_TAG = "dagster/data_version"
#: The nightly pass: 02:00 UTC.
NIGHTLY_CRON = "0 2 * * *"
NIGHTLY_TIMEZONE = "UTC"


def automation_condition() -> dg.AutomationCondition:
    """Request a partition when it is missing, its code version changed, or an upstream
    partition's data version changed (not when an upstream re-ran with the same data); at
    the nightly tick, also when it is still missing or its latest run failed. Never while
    an upstream is missing, failed a blocking check or is in progress."""
    AC: Any = dg.AutomationCondition  # (its generic typing does not compose under mypy)
    changed = (
        AC.missing() | AC.code_version_changed() | AC.any_deps_match(AC.data_version_changed())
    ).since_last_handled()
    nightly = AC.cron_tick_passed(NIGHTLY_CRON, NIGHTLY_TIMEZONE) & (
        AC.missing() | AC.execution_failed()
    )
    return (
        AC.in_latest_time_window()
        & (changed | nightly)
        & ~AC.any_deps_missing()
        & AC.all_deps_blocking_checks_passed()
        & ~AC.any_deps_in_progress()
        & ~AC.in_progress()
    ).with_label("missing, code or upstream data changed; nightly: missing or failed")


def nightly_check_condition() -> dg.AutomationCondition:
    """Run a (whole-store) check once after each nightly tick."""
    condition: Any = dg.AutomationCondition.cron_tick_passed(NIGHTLY_CRON, NIGHTLY_TIMEZONE)
    return condition.with_label("nightly (02:00 UTC)")


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
