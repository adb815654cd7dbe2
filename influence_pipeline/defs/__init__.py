"""Dagster definitions for one workload: ``build_definitions(workload)``.

The graph (see ``assets.py``): training_shards → block_mapper → influence_factors[test_set]
→ influence_scores[test_set|train_shard] → influence_table[test_set] → data_audit, with
in-asset blocking checks, whole-store checks, a training-shard sensor, declarative
automation and a nightly schedule (``automation.py``). Runs execute in process: a
partitioned run here is one step, and a step subprocess of the multiprocess executor costs
about 6 s of imports (torch, dagster) per run for no parallelism; runs still run side by
side, each in its own process, under the run queue. The scoring step is in pool ``gpu``
(limit 1 in ``dagster_home/dagster.yaml``; the in-process executor honours pools too).
"""

import dagster as dg

from ..workload import Workload
from .assets import CODE_VERSIONS, automation_condition, build_assets
from .automation import NIGHTLY, build_nightly_schedules, build_shard_sensor, stale_frontier
from .checks import build_checks
from .resources import InfluenceStoreResource

SHARD_PARTITIONS = "train_shards"


def build_definitions(workload: Workload, store: str | None = None) -> dg.Definitions:
    """All definitions for ``workload``; ``store`` overrides the workload's store root."""
    test_sets_def = dg.StaticPartitionsDefinition(list(workload.test_sets))
    shards_def = dg.DynamicPartitionsDefinition(name=SHARD_PARTITIONS)
    scores_def = dg.MultiPartitionsDefinition(
        {"test_set": test_sets_def, "train_shard": shards_def}
    )
    assets = build_assets(workload, test_sets_def, shards_def, scores_def)
    checks = build_checks(workload, SHARD_PARTITIONS)
    check_keys = [key for check in checks for key in check.check_keys]
    return dg.Definitions(
        assets=assets,
        asset_checks=checks,
        sensors=[
            build_shard_sensor(workload, shards_def),
            dg.AutomationConditionSensorDefinition(
                "influence_automation",
                target=dg.AssetSelection.all(),
                default_status=dg.DefaultSensorStatus.RUNNING,
                minimum_interval_seconds=30,
            ),
        ],
        schedules=build_nightly_schedules(workload, shards_def, check_keys),
        resources={"store": InfluenceStoreResource(root=store or workload.store)},
        executor=dg.in_process_executor,
    )


__all__ = [
    "CODE_VERSIONS",
    "NIGHTLY",
    "SHARD_PARTITIONS",
    "InfluenceStoreResource",
    "automation_condition",
    "build_definitions",
    "stale_frontier",
]
