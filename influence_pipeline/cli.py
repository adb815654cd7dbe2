"""Command line.

``influence-pipeline run`` materializes the whole graph of the bundled workload into the
Dagster instance at ``$DAGSTER_HOME`` (default: ``./dagster_home``, made absolute), so the
runs show up when the UI is opened afterwards: it registers the training shards (as the
sensor does), then runs block_mapper, influence_factors per test set, influence_scores per
test set × shard, influence_table per test set and data_audit, one Dagster run each,
printing progress, and ends with the audit summary. Artifacts already in the store for the
same inputs are reused, so a second run computes nothing new.
"""

import argparse
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import dagster as dg


def _instance() -> dg.DagsterInstance:
    home = os.environ.get("DAGSTER_HOME") or str(Path("dagster_home").resolve())
    os.environ["DAGSTER_HOME"] = str(Path(home).resolve())
    Path(os.environ["DAGSTER_HOME"]).mkdir(parents=True, exist_ok=True)
    return dg.DagsterInstance.get()


def register_shards(defs: dg.Definitions, instance: dg.DagsterInstance) -> list[str]:
    """Evaluate training_shard_sensor once and apply its result (what the daemon does)."""
    sensor = defs.resolve_sensor_def("training_shard_sensor")
    with dg.build_sensor_context(instance=instance, definitions=defs) as context:
        result: Any = sensor(context)
    for request in result.dynamic_partitions_requests:
        keys = list(request.partition_keys or [])
        if isinstance(request, dg.DeleteDynamicPartitionsRequest):
            for key in keys:
                instance.delete_dynamic_partition(request.partitions_def_name, key)
        else:
            instance.add_dynamic_partitions(request.partitions_def_name, keys)
    for event in result.asset_events:
        instance.report_runless_asset_event(event)
    return list(instance.get_dynamic_partitions("train_shards"))


def run_pipeline(defs: dg.Definitions, instance: dg.DagsterInstance, test_sets: list[str]) -> Any:
    """Materialize every asset partition in dependency order; returns the audit result."""
    from .defs import JOB_OF

    shards = register_shards(defs, instance)
    run_config = {"loggers": {"console": {"config": {"log_level": "ERROR"}}}}
    steps: list[tuple[str, str | dg.MultiPartitionKey | None]] = [("block_mapper", None)]
    steps += [("influence_factors", t) for t in test_sets]
    steps += [
        ("influence_scores", dg.MultiPartitionKey({"test_set": t, "train_shard": s}))
        for t in test_sets
        for s in shards
    ]
    steps += [("influence_table", t) for t in test_sets]
    steps += [("data_audit", None)]
    tags = {"influence/main_job": time.strftime("%Y-%m-%dT%H:%M:%S")}
    result = None
    for i, (key, partition) in enumerate(steps, 1):
        label = key if partition is None else f"{key}[{partition}]"
        print(f"[{i:2d}/{len(steps)}] {label:48s}", end="", flush=True)
        start = time.perf_counter()
        result = defs.resolve_job_def(JOB_OF[key]).execute_in_process(
            run_config=run_config,
            instance=instance,
            partition_key=str(partition) if partition is not None else None,
            asset_selection=[dg.AssetKey(key)],
            tags=tags,
            raise_on_error=False,
        )
        if not result.success:
            print("FAILED")
            for event in result.all_events:
                if event.is_failure and event.step_failure_data is not None:
                    print(
                        event.step_failure_data.error.to_string()
                        if event.step_failure_data.error
                        else event
                    )
            raise SystemExit(1)
        events = result.get_asset_materialization_events()
        metadata = events[0].materialization.metadata if events else {}
        reused = metadata.get("reused")
        note = " (reused)" if reused is not None and reused.value else ""
        failed_checks = [c.check_name for c in result.get_asset_check_evaluations() if not c.passed]
        if failed_checks:
            note += f"  CHECK FAILED: {', '.join(failed_checks)}"
        print(f"{time.perf_counter() - start:6.1f} s{note}")
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="influence-pipeline",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("run", help="materialize the whole graph of the bundled workload")
    args = parser.parse_args(argv)
    if args.command != "run":  # pragma: no cover
        return 2
    warnings.filterwarnings("ignore", category=dg.BetaWarning)
    warnings.filterwarnings("ignore", category=dg.PreviewWarning)
    instance = _instance()
    from .definitions import defs, workload

    print(f"influence_pipeline: workload {workload.name!r} — {workload.description}")
    print(
        f"Dagster instance: {os.environ['DAGSTER_HOME']}   store: {Path(workload.store).resolve()}"
    )
    start = time.perf_counter()
    result = run_pipeline(defs, instance, list(workload.test_sets))
    print(f"\nWhole graph materialized in {time.perf_counter() - start:.1f} s.\n")
    metadata = result.get_asset_materialization_events()[0].materialization.metadata
    summary = metadata["summary"].value.split("![audit]")[0].rstrip()
    print(summary)
    print(
        "\nOpen the UI: DAGSTER_HOME=$PWD/dagster_home .venv/bin/dagster dev -h 127.0.0.1 -p 3000"
        "\nRead the tables with pandas: see README.md, 'Reading results with pandas'."
    )
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
