"""A snapshot of the asset graph: accidental changes to keys, dependencies, partitions,
code versions, automation, pools or checks fail here. After an intended change, rewrite
the snapshot with ``UPDATE_GRAPH_SNAPSHOT=1 pytest tests/pipeline/test_snapshot.py`` and
review the diff."""

from __future__ import annotations

import json
import os
from pathlib import Path

import dagster as dg

from influence_pipeline.defs import build_definitions
from influence_pipeline.examples.digits import digits_workload

SNAPSHOT = Path(__file__).with_name("graph_snapshot.json")


def describe(defs: dg.Definitions) -> dict:
    graph = defs.resolve_asset_graph()
    assets = {}
    for key in sorted(graph.get_all_asset_keys(), key=lambda k: k.to_user_string()):
        node = graph.get(key)
        partitions = node.partitions_def
        code_version = node.code_version
        if code_version and "+" in code_version:  # the method digest depends on the workload
            code_version = code_version.split("+")[0] + "+<method digest>"
        assets[key.to_user_string()] = {
            "deps": sorted(k.to_user_string() for k in node.parent_keys),
            "partitions": None if partitions is None else str(partitions),
            "code_version": code_version,
            "automation": node.automation_condition.get_label()
            if node.automation_condition
            else None,
            "pool": node.pools and sorted(node.pools),
            "observable": node.is_observable,
            "checks": sorted((c.name, bool(graph.get(c).blocking)) for c in node.check_keys),
        }
    return {
        "assets": assets,
        "executor": defs.executor.name
        if defs.executor
        else None,  # in process: no 6 s subprocess per run
        "jobs": sorted(
            (job.name, sorted(k.to_user_string() for k in job.asset_layer.executable_asset_keys))
            for job in defs.get_repository_def().get_all_jobs()
            if not job.name.startswith("__")
        ),
        "sensors": sorted(s.name for s in defs.sensors or []),
        "schedules": sorted(
            (s.name, s.cron_schedule, s.execution_timezone) for s in defs.schedules or []
        ),
    }


def test_asset_graph_snapshot(tmp_path):
    defs = build_definitions(
        digits_workload(tmp_path / "data", n_shards=2, n_test=10, store=str(tmp_path / "s")),
        gpu=False,
    )
    dg.Definitions.validate_loadable(defs)
    current = json.loads(json.dumps(describe(defs), default=list))
    if os.environ.get("UPDATE_GRAPH_SNAPSHOT"):
        SNAPSHOT.write_text(json.dumps(current, indent=1, sort_keys=True) + "\n")
    assert current == json.loads(SNAPSHOT.read_text())


def test_gpu_pool_only_when_a_gpu_is_configured(tmp_path):
    workload = digits_workload(tmp_path / "data", n_shards=2, n_test=10, store=str(tmp_path / "s"))
    for gpu, pools in ((True, {"gpu"}), (False, set())):
        graph = build_definitions(workload, gpu=gpu).resolve_asset_graph()
        assert set(graph.get(dg.AssetKey("influence_scores")).pools or ()) == pools
