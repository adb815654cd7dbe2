"""The main job: the whole graph, launched by ``influence-pipeline run`` and shown in the UI.

Dagster (1.13) refuses an asset job whose assets have different partitions definitions
("Selected assets must have the same partitions definitions"), so the main job is one named
job per partitioning, run in dependency order, each run one (asset, partition):

* ``influence_main``: ``block_mapper``, ``data_audit`` and the whole-store checks attached
  to ``data_audit`` (they run right after the audit);
* ``influence_main_test_sets``: ``influence_factors`` and ``influence_table`` per test set;
* ``influence_main_scores``: ``influence_scores`` per test set × training shard.
"""

from typing import Any

import dagster as dg

MAIN_JOB = "influence_main"

#: job name → the assets it materializes (their checks come with them).
MAIN_JOBS: dict[str, tuple[str, ...]] = {
    MAIN_JOB: ("block_mapper", "data_audit"),
    f"{MAIN_JOB}_test_sets": ("influence_factors", "influence_table"),
    f"{MAIN_JOB}_scores": ("influence_scores",),
}

#: asset → the main job that materializes it.
JOB_OF: dict[str, str] = {asset: job for job, assets in MAIN_JOBS.items() for asset in assets}


def build_main_jobs() -> list[Any]:
    """The named jobs of the main job (see the module docstring)."""
    return [
        dg.define_asset_job(
            name,
            selection=dg.AssetSelection.assets(*assets),
            description=f"Main job, part {i} of {len(MAIN_JOBS)}: materialize "
            + ", ".join(assets)
            + (" and run the whole-store checks." if name == MAIN_JOB else "."),
        )
        for i, (name, assets) in enumerate(MAIN_JOBS.items(), 1)
    ]
