"""Asset checks over the whole store, attached to ``data_audit`` (whose inputs they vouch for),
run by the main job after the audit and by automation once a night; the per-partition
checks live inside the assets as blocking check specs."""

import math
from typing import Any

import dagster as dg

from ..store import Provenance
from ..workload import Workload
from .automation import nightly_check_condition
from .resources import InfluenceStoreResource


def build_checks(workload: Workload, shards_name: str) -> list[Any]:
    @dg.asset_check(
        asset="data_audit",
        name="stored_scores_finite",
        automation_condition=nightly_check_condition(),
        description="every complete shard of every test set has finite scores",
    )
    def stored_scores_finite(store: InfluenceStoreResource) -> dg.AssetCheckResult:
        artifacts = store.open(mode="r")
        bad = []
        for test_set in artifacts.test_sets():
            for shard in artifacts.status(test_set)[test_set]["complete"]:
                record = artifacts.shard_record(test_set, shard) or {}
                if not (
                    math.isfinite(record.get("score_min", math.nan))
                    and math.isfinite(record.get("score_max", math.nan))
                ):
                    bad.append(f"{test_set}|{shard}")
        return dg.AssetCheckResult(
            passed=not bad, metadata={"non_finite": dg.MetadataValue.json(bad)}
        )

    @dg.asset_check(
        asset="data_audit",
        name="factors_provenance",
        automation_condition=nightly_check_condition(),
        description="every test set's factors come from the current block mapper",
    )
    def factors_provenance(store: InfluenceStoreResource) -> dg.AssetCheckResult:
        artifacts = store.open(mode="r")
        info = artifacts.block_mapper_info()
        if info is None:
            return dg.AssetCheckResult(passed=False, metadata={"reason": "no block mapper"})
        current = Provenance.from_json(info["provenance"])
        stale = []
        for test_set in artifacts.test_sets():
            try:
                record = artifacts.factors_record(test_set)
            except ValueError:
                stale.append(test_set)
                continue
            try:
                current.check_matches(Provenance.from_json(record["provenance"]), "factors")
            except ValueError:
                stale.append(test_set)
        return dg.AssetCheckResult(
            passed=not stale, metadata={"stale_test_sets": dg.MetadataValue.json(stale)}
        )

    @dg.asset_check(
        asset="data_audit",
        name="every_shard_scored",
        automation_condition=nightly_check_condition(),
        description="every registered training shard is scored for every test set",
    )
    def every_shard_scored(
        context: dg.AssetCheckExecutionContext, store: InfluenceStoreResource
    ) -> dg.AssetCheckResult:
        artifacts = store.open(mode="r")
        available = set(workload.shards.names())
        registered = [
            s
            for s in context.instance.get_dynamic_partitions(shards_name)
            if s in available and workload.shards.size(s) > 0
        ]  # the shards that exist and have rows (an empty shard is skipped)
        missing = []
        for test_set in workload.test_sets:
            complete = (
                artifacts.status(test_set)[test_set]["complete"]
                if test_set in artifacts.test_sets()
                else []
            )
            missing += [f"{test_set}|{s}" for s in registered if s not in complete]
        return dg.AssetCheckResult(
            passed=not missing, metadata={"missing": dg.MetadataValue.json(missing)}
        )

    return [stored_scores_finite, factors_provenance, every_shard_scored]
