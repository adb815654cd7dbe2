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
* ``dead_run_sensor`` (every 30 s, running by default) marks a started run whose worker
  process is gone as failed; the instance retries such runs once and frees their pool
  slots (``dagster_home/dagster.yaml``), so a killed scoring run needs no hand.
"""

import json
import os
from typing import Any

import dagster as dg

from ..workload import Workload

DATA_VERSION_TAG = "dagster/data_version"
#: The nightly pass: 02:00 UTC.
NIGHTLY_CRON = "0 2 * * *"
NIGHTLY_TIMEZONE = "UTC"


def automation_condition(on_observed_sources: bool = False) -> dg.AutomationCondition:
    """Request a partition when it is missing, its code version changed, or an upstream
    partition's data version changed (not when an upstream re-ran with the same data); at
    the nightly tick, also when it is still missing or its latest run failed. Never while
    an upstream is missing, failed a blocking check or is in progress.

    ``on_observed_sources`` (the block mapper, whose upstream is the fit shards): an upstream
    *update* is the trigger instead, since Dagster 1.13's ``any_deps_match`` ignores a
    ``SpecificPartitionsPartitionMapping`` from a partitioned upstream (any shard would
    count) while ``any_deps_updated`` respects it; the shard sensor reports a shard only
    when its fingerprint changed, so an update is a change there."""
    AC: Any = dg.AutomationCondition  # (its generic typing does not compose under mypy)
    upstream = (
        AC.any_deps_updated()
        if on_observed_sources
        else AC.any_deps_match(AC.data_version_changed())
    )
    changed = (AC.missing() | AC.code_version_changed() | upstream).since_last_handled()
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
    ).with_label(
        "missing, code or upstream "
        + ("updated" if on_observed_sources else "data changed")
        + "; nightly: missing or failed"
    )


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


def _process_alive(pid: int) -> bool:
    """Whether ``pid`` is a live process on this machine (a zombie counts as dead)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:  # no /proc (macOS): kill(0) said it exists
        return True


def dead_runs(instance: dg.DagsterInstance) -> list[tuple[Any, list[int]]]:
    """STARTED runs whose worker processes (the pids their engine events name) are all gone:
    killed or crashed without reporting. Only meaningful when runs execute on this machine
    (the default run launcher); empty otherwise."""
    if not isinstance(instance.run_launcher, dg.DefaultRunLauncher):
        return []
    found = []
    for run in instance.get_runs(filters=dg.RunsFilter(statuses=[dg.DagsterRunStatus.STARTED])):
        records = instance.get_records_for_run(
            run.run_id, of_type=dg.DagsterEventType.ENGINE_EVENT
        ).records
        pids = set()
        for record in records:
            event = record.event_log_entry.dagster_event
            data = event.engine_event_data if event is not None else None
            pid = data.metadata.get("pid") if data is not None else None
            if pid is not None:
                pids.add(int(str(pid.value)))
        if pids and not any(_process_alive(pid) for pid in pids):
            found.append((run, sorted(pids)))
    return found


def build_dead_run_sensor() -> dg.SensorDefinition:
    """Marks runs whose worker died (SIGKILL, out of memory) as failed, so that run
    retries (``dagster_home/dagster.yaml``: once, never for a failed step) launch them again
    and run monitoring frees their pool slots. Dagster's own run monitoring cannot see
    this under the default run launcher, which has no worker health check."""

    @dg.sensor(
        name="dead_run_sensor",
        minimum_interval_seconds=30,
        default_status=dg.DefaultSensorStatus.RUNNING,
        description="Marks STARTED runs whose worker process is gone as failed (they are "
        "retried once and their pool slots freed).",
    )
    def dead_run_sensor(context: dg.SensorEvaluationContext) -> dg.SkipReason | None:
        dead = dead_runs(context.instance)
        for run, pids in dead:
            context.instance.report_run_failed(
                run, f"The run's worker process ({', '.join(map(str, pids))}) is gone."
            )
            context.log.warning(f"Run {run.run_id} ({run.job_name}): worker gone, failed.")
        return None if dead else dg.SkipReason("every started run has a live worker")

    return dead_run_sensor
