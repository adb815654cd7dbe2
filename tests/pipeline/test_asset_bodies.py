"""Asset bodies called directly with ``dg.build_asset_context`` and a test store resource:
no run, no job; the first call fits and writes, the second reuses with the same data
version, and scoring a range of partitions in one call equals scoring them one by one."""

from __future__ import annotations

import dagster as dg
import numpy as np

from influence_pipeline.defs import build_definitions
from influence_pipeline.defs.config import FactorsConfig, ScoringConfig, method_config_class
from influence_pipeline.defs.resources import InfluenceStoreResource
from influence_pipeline.examples.digits import digits_workload
from influence_pipeline.store import InfluenceStore


def test_asset_bodies_with_a_test_resource(tmp_path, model_cache):
    workload = digits_workload(tmp_path / "data", n_shards=2, n_test=8, cache_dir=model_cache)
    defs = build_definitions(workload, store=str(tmp_path / "store"), gpu=False)
    # the asset definitions as built (the Definitions' copies have the store bound)
    asset = {a.key.to_user_string(): a for a in defs.assets or [] if hasattr(a, "key")}
    store = InfluenceStoreResource(root=str(tmp_path / "store"))
    method = method_config_class(workload.method)()
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions("train_shards", workload.shards.names())
        versions = []
        for _ in range(2):
            context = dg.build_asset_context(resources={"store": store}, instance=instance)
            result = asset["block_mapper"](context, config=method)
            versions.append((result.data_version, result.metadata["reused"]))
        assert versions[0][0] == versions[1][0] and [r for _, r in versions] == [False, True]
        context = dg.build_asset_context(
            resources={"store": store}, instance=instance, partition_key="validation"
        )
        factors = asset["influence_factors"](context, config=FactorsConfig())
        assert all(c.passed for c in factors.check_results)
        # one call over both shards of validation (a partition range) ...
        context = dg.build_asset_context(
            resources={"store": store},
            instance=instance,
            partition_key_range=dg.PartitionKeyRange("validation|shard-0", "validation|shard-1"),
        )
        both = asset["influence_scores"](context, config=ScoringConfig())
        assert both.metadata["partitions"] == 2 and all(c.passed for c in both.check_results)
        ranged = np.array(InfluenceStore(store.root, mode="r").scores_array("validation")[:])
        # ... which one call per shard then finds complete and reuses as it is
        for shard in ("shard-0", "shard-1"):
            context = dg.build_asset_context(
                resources={"store": store}, instance=instance, partition_key=f"validation|{shard}"
            )
            one = asset["influence_scores"](context, config=ScoringConfig())
            assert one.metadata["reused"] is True and one.metadata["train_shard"] == shard
        single = np.array(InfluenceStore(store.root, mode="r").scores_array("validation")[:])
        np.testing.assert_array_equal(ranged, single)
        allocation = InfluenceStore(store.root, mode="r").allocation("validation")["shards"]
        for shard in ("shard-0", "shard-1"):
            a = allocation[shard]
            assert np.isfinite(single[:, a["start"] : a["start"] + a["n_rows"]]).all()
