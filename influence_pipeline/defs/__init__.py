"""Dagster definitions for one workload: ``build_definitions(workload)``.

The graph (see ``assets.py``): training_shards → block_mapper → influence_factors[test_set]
→ influence_scores[test_set|train_shard] → influence_table[test_set] → data_audit, with
in-asset blocking checks, whole-store checks, the named main job (``jobs.py``), a
training-shard sensor and declarative automation with a nightly pass (``automation.py``).
A workload with a ``retrain`` function also gets the on-demand quality assets (group
``quality``: LDS against retraining, mislabel metrics, the methods comparison; ``quality.py``),
which no automation and no main job materializes.
Runs execute in process: a partitioned run here is one step, and a step subprocess of the
multiprocess executor costs about 6 s of imports (torch, dagster) per run for no
parallelism; runs still run side by side, each in its own process, under the run queue.
When a GPU is configured (``gpu=True``, default: torch sees one) the scoring step is in
pool ``gpu`` (limit 1 in ``dagster_home/dagster.yaml``); without one it is in no pool, so
scoring runs go side by side.
"""

import dagster as dg

from ..workload import Workload
from .assets import CODE_VERSIONS, build_assets
from .automation import (
    NIGHTLY_CRON,
    automation_condition,
    build_dead_run_sensor,
    build_shard_sensor,
)
from .checks import build_checks
from .jobs import JOB_OF, MAIN_JOB, MAIN_JOBS, build_main_jobs
from .resources import InfluenceStoreResource

SHARD_PARTITIONS = "train_shards"


def build_definitions(
    workload: Workload,
    store: str | None = None,
    gpu: bool | None = None,
    shards_per_run: int = 16,
) -> dg.Definitions:
    """All definitions for ``workload``; ``store`` overrides the workload's store root;
    ``gpu`` puts the scoring step in pool ``gpu`` (default: when torch sees a CUDA device);
    a backfill of ``influence_scores`` scores up to ``shards_per_run`` partitions per run."""
    if shards_per_run < 1:
        raise ValueError(f"shards_per_run must be >= 1, got {shards_per_run}.")
    if gpu is None:
        import torch

        gpu = torch.cuda.is_available()
    test_sets_def = dg.StaticPartitionsDefinition(list(workload.test_sets))
    shards_def = dg.DynamicPartitionsDefinition(name=SHARD_PARTITIONS)
    scores_def = dg.MultiPartitionsDefinition(
        {"test_set": test_sets_def, "train_shard": shards_def}
    )
    assets = build_assets(
        workload, test_sets_def, shards_def, scores_def, gpu=gpu, shards_per_run=shards_per_run
    )
    checks = build_checks(workload, SHARD_PARTITIONS)
    if workload.retrain is not None:
        from .quality import build_quality_assets

        assets = [*assets, *build_quality_assets(workload, workload.retrain)]
    return dg.Definitions(
        assets=assets,
        asset_checks=checks,
        sensors=[
            build_shard_sensor(workload, shards_def),
            build_dead_run_sensor(),
            dg.AutomationConditionSensorDefinition(
                "influence_automation",
                target=dg.AssetSelection.all(),
                default_status=dg.DefaultSensorStatus.RUNNING,
                minimum_interval_seconds=30,
            ),
        ],
        jobs=build_main_jobs(),
        resources={"store": InfluenceStoreResource(root=store or workload.store)},
        executor=dg.in_process_executor,
    )


__all__ = [
    "CODE_VERSIONS",
    "JOB_OF",
    "MAIN_JOB",
    "MAIN_JOBS",
    "NIGHTLY_CRON",
    "SHARD_PARTITIONS",
    "InfluenceStoreResource",
    "automation_condition",
    "build_definitions",
]
