"""A small bundled workload (3 shards, 30 test points per test set) on temporary instances."""

from __future__ import annotations

import datetime
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import dagster as dg
import pytest

from influence_pipeline.cli import register_shards, run_pipeline
from influence_pipeline.defs import build_definitions
from influence_pipeline.examples.digits import digits_workload
from influence_pipeline.workload import Workload

warnings.filterwarnings("ignore", category=dg.BetaWarning)
warnings.filterwarnings("ignore", category=dg.PreviewWarning)

N_SHARDS, N_TEST = 3, 30


@dataclass
class Setup:
    workload: Workload
    defs: dg.Definitions
    instance: dg.DagsterInstance
    root: Path

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    def materialize(
        self,
        key: str,
        partition: str | dg.MultiPartitionKey | None = None,
        run_config: dict | None = None,
        raise_on_error: bool = True,
    ) -> dg.ExecuteInProcessResult:
        return dg.materialize(
            list(self.defs.assets or []),
            selection=[key],
            partition_key=str(partition) if partition is not None else None,
            instance=self.instance,
            resources=self.defs.resources,
            run_config=run_config or {},
            raise_on_error=raise_on_error,
        )

    def run_all(self) -> dg.ExecuteInProcessResult:
        return run_pipeline(self.defs, self.instance, list(self.workload.test_sets))

    def register(self) -> list[str]:
        return register_shards(self.defs, self.instance)


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("model-cache")


def make_setup(root: Path, model_cache: Path, instance: dg.DagsterInstance, **kwargs) -> Setup:
    workload = digits_workload(
        root / "data",
        n_shards=N_SHARDS,
        n_test=N_TEST,
        store=str(root / "store"),
        cache_dir=model_cache,
        **kwargs,
    )
    return Setup(workload, build_definitions(workload), instance, root)


@pytest.fixture
def setup(tmp_path: Path, model_cache: Path):
    with dg.instance_for_test() as instance:
        yield make_setup(tmp_path, model_cache, instance)


@pytest.fixture(scope="module")
def done(tmp_path_factory: pytest.TempPathFactory, model_cache: Path):
    """A workload whose whole graph has been materialized once (shared by read-only tests)."""
    root = tmp_path_factory.mktemp("done")
    with dg.instance_for_test() as instance:
        s = make_setup(root, model_cache, instance)
        s.run_all()
        yield s


def requested(result) -> dict[str, list[str]]:
    """{asset: sorted partition keys} requested by an automation evaluation."""
    out = {}
    for res in result.results:
        if res.true_subset.size:
            if res.true_subset.is_partitioned:
                keys = sorted(str(k) for k in res.true_subset.expensively_compute_partition_keys())
            else:
                keys = [""]
            out[res.key.to_user_string()] = keys
    return out


def settle(s: Setup, cursor=None):
    """Evaluate automation until a tick requests nothing new; returns the last result."""
    result = dg.evaluate_automation_conditions(defs=s.defs, instance=s.instance, cursor=cursor)
    return dg.evaluate_automation_conditions(defs=s.defs, instance=s.instance, cursor=result.cursor)


#: What the nightly pass requests when everything is current: the whole-store checks.
STORE_CHECKS = {
    f"data_audit:{name}": [""]
    for name in ("every_shard_scored", "factors_provenance", "stored_scores_finite")
}


def nightly(s: Setup, cursor):
    """Evaluate automation at the first minute after the next 02:00 UTC (the nightly tick)."""
    now = datetime.datetime.now(datetime.UTC)
    tick = now.replace(hour=2, minute=1, second=0, microsecond=0)
    if tick <= now:
        tick += datetime.timedelta(days=1)
    return dg.evaluate_automation_conditions(
        defs=s.defs, instance=s.instance, cursor=cursor, evaluation_time=tick
    )


def env_home(path: Path) -> dict[str, str]:
    return {**os.environ, "DAGSTER_HOME": str(path)}
