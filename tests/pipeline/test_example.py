"""The bundled example has no side effects until used, and never rewrites user data."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

from influence_pipeline.examples.digits import digits_workload


def files_under(path: Path) -> list[Path]:
    return sorted(p for p in path.rglob("*") if p.is_file()) if path.exists() else []


def test_building_the_definitions_trains_and_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("INFLUENCE_PIPELINE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("INFLUENCE_STORE", str(tmp_path / "store"))
    sys.modules.pop("influence_pipeline.definitions", None)
    module = importlib.import_module("influence_pipeline.definitions")
    try:
        assert module.defs.resolve_asset_graph().get_all_asset_keys()
        assert files_under(tmp_path) == []  # no data files, no checkpoint, no store
    finally:
        sys.modules.pop("influence_pipeline.definitions", None)


def test_a_deleted_shard_stays_deleted(tmp_path, model_cache):
    data = tmp_path / "data"
    workload = digits_workload(data, n_shards=3, n_test=10, cache_dir=model_cache)
    assert files_under(tmp_path) == []
    assert workload.shards.names() == ["shard-0", "shard-1", "shard-2"]  # first use writes
    (data / "train" / "shard-1.pt").unlink()
    again = digits_workload(data, n_shards=3, n_test=10, cache_dir=model_cache)
    assert again.shards.names() == ["shard-0", "shard-2"]
    assert len(again.test_set("validation")) == 10
    assert not (data / "train" / "shard-1.pt").exists()
    assert sorted(p.name for p in data.iterdir()) == ["test", "train"]  # no staging left
