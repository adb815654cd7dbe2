"""Pipeline benchmark: stage timings, the overhead of Dagster itself, scoring memory.

1. Stage timings (cold store, temporary Dagster instance) of the whole graph for
   * the bundled digits workload (1,297 training points in 4 shards, 2 × 250 test points,
     DirectInfluence), and
   * a synthetic workload of 50,000 training points in 10 shards of 5,000 (64 features,
     10 classes, the same MLP, 2 × 200 test points, EK-FAC).
2. Dagster overhead at a realistic shard size (5,000 rows × 2,000 test points): a Dagster run
   of one ``influence_scores`` partition against the same ``InfluenceStore.write_shard_scores``
   call without Dagster, measured alternately; split into the framework's share (run wall
   time minus the asset function's own time) and the asset's extra work (restoring the
   block mapper, fingerprinting the shard, the read-back and spot checks).
3. Dagster's share when one run scores a range of shards (``BackfillPolicy.multi_run``, as
   the CLI and backfills do) against one run per shard, side by side: 10 shards of 5,000
   rows × 2,000 test points, alternately as one range run, as 10 single-partition runs and
   as 10 bare store calls; overhead = (runs' wall time - bare calls) / bare calls.
4. Peak memory (VmHWM of a fresh process) of one scoring step in a store with 5 and with
   20 allocated shards of the same size: it must not depend on the number of shards.

Run: ``.venv/bin/python benchmarks/pipeline_benchmark.py [--quick]``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import dagster as dg
import numpy as np
import torch

from influence_pipeline.cli import RANGE_END, RANGE_START, register_shards
from influence_pipeline.defs import JOB_OF, build_definitions
from influence_pipeline.defs.runtime import resolve_device, restore
from influence_pipeline.examples.digits import digits_workload, make_model
from influence_pipeline.store import InfluenceStore, ShardSpec
from influence_pipeline.workload import InMemoryShards, MethodSpec, ShardData, Workload

warnings.filterwarnings("ignore", category=dg.BetaWarning)
QUIET = {"loggers": {"console": {"config": {"log_level": "ERROR"}}}}
#: Test points per test set in the overhead measurement (nightly test sets are thousands).
OVERHEAD_TESTS = 2_000


def synthetic_workload(root: Path, n_train: int, n_shards: int, n_test: int) -> Workload:
    gen = torch.Generator().manual_seed(0)
    centers = torch.randn(10, 64, generator=gen)
    y = torch.randint(0, 10, (n_train + 2 * n_test,), generator=gen)
    x = (centers[y] + 0.8 * torch.randn(len(y), 64, generator=gen)).float()
    torch.manual_seed(0)
    model = make_model()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(60):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(x[:5000]), y[:5000]).backward()
        optimizer.step()
    root.mkdir(parents=True, exist_ok=True)
    checkpoint = root / "synthetic.pt"
    torch.save(model.state_dict(), checkpoint)
    ids = torch.arange(len(y))
    bounds = np.linspace(0, n_train, n_shards + 1).astype(int)
    shards = {
        f"shard-{i:02d}": ShardData(x[a:b], y[a:b], ids[a:b])
        for i, (a, b) in enumerate(itertools.pairwise(bounds))
    }
    tests = {
        name: ShardData(
            x[n_train + k * n_test : n_train + (k + 1) * n_test],
            y[n_train + k * n_test : n_train + (k + 1) * n_test],
            ids[n_train + k * n_test : n_train + (k + 1) * n_test],
        )
        for k, name in enumerate(("validation", "holdout"))
    }
    return Workload(
        name="synthetic",
        model_factory=make_model,
        checkpoint=checkpoint,
        loss=torch.nn.functional.cross_entropy,
        shards=InMemoryShards(shards),
        test_sets={name: (lambda d=d: d) for name, d in tests.items()},
        method=MethodSpec(method="ekfac", regularization=1e-3),
        batch_size=1000,
        store=str(root / "store"),
    )


def _materialize(
    defs: dg.Definitions, instance: dg.DagsterInstance, key: str, partition: str | None
) -> dg.ExecuteInProcessResult:
    """One in-process run of asset ``key`` (partition ``partition``), console logs quiet."""
    return dg.materialize(
        list(defs.assets or []),
        selection=[key],
        partition_key=partition,
        instance=instance,
        resources=defs.resources,
        run_config=QUIET,
    )


def stage_timings(workload: Workload, instance: dg.DagsterInstance) -> dict[str, float]:
    defs = build_definitions(workload)
    shards = register_shards(defs, instance)
    timings: dict[str, float] = {}

    def run(key: str, partition: str | None) -> None:
        start = time.perf_counter()
        result = _materialize(defs, instance, key, partition)
        assert result.success, key
        timings[key] = timings.get(key, 0.0) + time.perf_counter() - start

    run("block_mapper", None)
    for t in workload.test_sets:
        run("influence_factors", t)
    for t in workload.test_sets:
        for s in shards:
            run("influence_scores", f"{t}|{s}")
    for t in workload.test_sets:
        run("influence_table", t)
    run("data_audit", None)
    timings["per scoring partition (mean)"] = timings["influence_scores"] / (
        len(shards) * len(workload.test_sets)
    )
    return timings


def dagster_overhead(
    workload: Workload, instance: dg.DagsterInstance, repeats: int
) -> dict[str, float]:
    """Alternate a Dagster run of one scoring partition with the bare store call."""
    defs = build_definitions(workload)
    register_shards(defs, instance)
    for key, partition in (("block_mapper", None), ("influence_factors", "validation")):
        _materialize(defs, instance, key, partition)
    store = InfluenceStore(workload.store)
    shard = workload.shards.names()[0]
    data = workload.shards.load(shard)
    # the same restore on the same device as the asset (CUDA when there is one)
    influence = restore(store, workload, resolve_device("auto"), workload.batch_size)
    dagster_runs, asset_seconds, bare = [], [], []
    for _ in range(repeats):
        store.location.delete(store._shard_marker("validation", shard))  # force a recomputation
        start = time.perf_counter()
        result = _materialize(defs, instance, "influence_scores", f"validation|{shard}")
        dagster_runs.append(time.perf_counter() - start)
        asset_seconds.append(
            result.get_asset_materialization_events()[0].materialization.metadata["seconds"].value
        )
        start = time.perf_counter()
        store.write_shard_scores("validation", shard, influence, data.loader(256), top_k=20)
        bare.append(time.perf_counter() - start)
    run, own, call = (statistics.median(v) for v in (dagster_runs, asset_seconds, bare))
    return {
        "dagster_run": run,
        "asset_function": own,
        "store_call": call,
        "framework_share": (run - own) / call,
        "asset_extra_share": (own - call) / call,
        "total_overhead": (run - call) / call,
    }


def range_overhead(
    workload: Workload, instance: dg.DagsterInstance, repeats: int
) -> dict[str, float]:
    """Score every shard of ``validation`` alternately as one range run, as one run per shard
    and as bare store calls (medians of ``repeats``); every repeat recomputes the scores."""
    defs = build_definitions(workload)
    shards = register_shards(defs, instance)
    for key, partition in (("block_mapper", None), ("influence_factors", "validation")):
        _materialize(defs, instance, key, partition)
    store = InfluenceStore(workload.store)
    influence = restore(store, workload, resolve_device("auto"), workload.batch_size)
    job = defs.resolve_job_def(JOB_OF["influence_scores"])
    score = dg.AssetKey("influence_scores")

    def forget() -> None:  # drop the completion markers: the next scoring recomputes
        for shard in shards:
            store.location.delete(store._shard_marker("validation", shard))

    ranged, single, bare = [], [], []
    for _ in range(repeats):
        forget()
        start = time.perf_counter()
        tags = {RANGE_START: f"validation|{shards[0]}", RANGE_END: f"validation|{shards[-1]}"}
        assert job.execute_in_process(
            run_config=QUIET, instance=instance, asset_selection=[score], tags=tags
        ).success
        ranged.append(time.perf_counter() - start)
        forget()
        start = time.perf_counter()
        for shard in shards:
            assert job.execute_in_process(
                run_config=QUIET,
                instance=instance,
                asset_selection=[score],
                partition_key=f"validation|{shard}",
            ).success
        single.append(time.perf_counter() - start)
        start = time.perf_counter()
        for shard in shards:
            data = workload.shards.load(shard)
            store.write_shard_scores("validation", shard, influence, data.loader(256), top_k=20)
        bare.append(time.perf_counter() - start)
    r, s1, b = (statistics.median(v) for v in (ranged, single, bare))
    return {
        "shards": len(shards),
        "range_run": r,
        "single_runs": s1,
        "bare_calls": b,
        "range_overhead": (r - b) / b,
        "single_overhead": (s1 - b) / b,
    }


CHILD = """
import json, sys, resource
sys.argv = sys.argv[:1]
from pathlib import Path
from influence_pipeline.store import InfluenceStore
import benchmarks.pipeline_benchmark as pb
root = Path({root!r})
workload = pb.synthetic_workload(root, {n_train}, {n_shards}, 200)
store = InfluenceStore(workload.store)
influence = store.load_block_mapper(workload.load_model(), workload.loss)
shard = workload.shards.names()[0]
data = workload.shards.load(shard)
def status(field):
    lines = open("/proc/self/status").read().splitlines()
    return int([l for l in lines if l.startswith(field)][0].split()[1])
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset the high-water mark to the current resident set
before = status("VmRSS")
store.write_shard_scores("validation", shard, influence, data.loader(256), top_k=20)
peak = status("VmHWM")
print(json.dumps({{"peak_mb": peak / 1024, "growth_mb": (peak - before) / 1024}}))
"""


def scoring_memory(n_shards: int, shard_rows: int) -> tuple[float, float]:
    """(peak RSS, growth of the RSS during the scoring call) in MB; the child builds the
    whole synthetic data set first, so only the growth isolates the scoring step."""
    with tempfile.TemporaryDirectory(dir=os.getcwd()) as tmp:
        root = Path(tmp)
        workload = synthetic_workload(root, shard_rows * n_shards, n_shards, 200)
        store = InfluenceStore(workload.store)
        influence = workload.method.build(workload.load_model(), workload.loss)
        influence.fit(workload.fit_data().fit_loader(1000))
        store.save_block_mapper(influence)
        test = workload.test_set("validation")
        store.write_factors("validation", influence, test.loader(100))
        store.allocate_shards(
            "validation", [ShardSpec(s, shard_rows) for s in workload.shards.names()]
        )
        code = CHILD.format(root=str(root), n_train=shard_rows * n_shards, n_shards=n_shards)
        out = subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            check=True,
            cwd=Path(__file__).resolve().parents[1],
        )
        result = json.loads(out.stdout.strip().splitlines()[-1])
        return float(result["peak_mb"]), float(result["growth_mb"])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--quick", action="store_true", help="10,000 synthetic training points, 2 repeats"
    )
    parser.add_argument(
        "--ranges-only", action="store_true", help="only the range-run overhead (section 3)"
    )
    args = parser.parse_args()
    if args.ranges_only:
        n_train = 10_000 if args.quick else 50_000
        with tempfile.TemporaryDirectory(dir=os.getcwd()) as tmp, dg.instance_for_test() as inst:
            o = range_overhead(
                synthetic_workload(Path(tmp), n_train, 10, OVERHEAD_TESTS),
                inst,
                repeats=2 if args.quick else 3,
            )
        print(json.dumps({k: round(v, 3) for k, v in o.items()}))
        return
    torch.set_num_threads(max(1, (os.cpu_count() or 1)))
    n_train = 10_000 if args.quick else 50_000
    with tempfile.TemporaryDirectory(dir=os.getcwd()) as tmp:
        root = Path(tmp)
        rows = []
        with dg.instance_for_test() as instance:
            digits = digits_workload(
                root / "digits-data", store=str(root / "digits-store"), cache_dir=root / "cache"
            )
            digits.checkpoint_path()  # train and cache the example model outside the timings
            rows.append(("digits (1,297 train, 4 shards)", stage_timings(digits, instance)))
        with dg.instance_for_test() as instance:
            synthetic = synthetic_workload(root / "synthetic", n_train, 10, 200)
            rows.append(
                (f"synthetic ({n_train:,} train, 10 shards)", stage_timings(synthetic, instance))
            )
        print("\nStage timings (seconds, cold store, one Dagster run per partition):")
        keys = [
            "block_mapper",
            "influence_factors",
            "influence_scores",
            "per scoring partition (mean)",
            "influence_table",
            "data_audit",
        ]
        print(f"{'workload':36s} " + " ".join(f"{k[:22]:>22s}" for k in keys))
        for name, t in rows:
            print(f"{name:36s} " + " ".join(f"{t[k]:22.2f}" for k in keys))
        print(
            f"\nDagster overhead of one scoring partition ({OVERHEAD_TESTS:,} test points, "
            "in-process runs, medians; framework = run wall time - asset function time):"
        )
        print(
            f"{'shard rows':>10s} {'Dagster run':>12s} {'asset fn':>9s} {'store call':>11s} "
            f"{'framework':>10s} {'asset extra':>12s} {'total':>7s}"
        )
        for n_shards in (10, 2):  # shards of n_train/10 and n_train/2 rows
            with dg.instance_for_test() as instance:
                o = dagster_overhead(
                    synthetic_workload(
                        root / f"overhead-{n_shards}", n_train, n_shards, OVERHEAD_TESTS
                    ),
                    instance,
                    repeats=2 if args.quick else 3,
                )
            print(
                f"{n_train // n_shards:10,d} {o['dagster_run']:11.2f}s {o['asset_function']:8.2f}s "
                f"{o['store_call']:10.2f}s {100 * o['framework_share']:9.1f}% "
                f"{100 * o['asset_extra_share']:11.1f}% {100 * o['total_overhead']:6.1f}%"
            )
        with dg.instance_for_test() as instance:
            o = range_overhead(
                synthetic_workload(root / "ranges", n_train, 10, OVERHEAD_TESTS),
                instance,
                repeats=2 if args.quick else 3,
            )
        print(
            f"\nScoring {o['shards']:.0f} shards of {n_train // 10:,} rows x {OVERHEAD_TESTS:,} "
            "test points (medians; overhead = (Dagster - bare) / bare):"
        )
        print(
            f"  one range run {o['range_run']:7.2f} s ({100 * o['range_overhead']:5.1f} %), "
            f"one run per shard {o['single_runs']:7.2f} s ({100 * o['single_overhead']:5.1f} %), "
            f"bare store calls {o['bare_calls']:7.2f} s"
        )
    shard_rows = 1_000 if args.quick else 5_000
    print(f"\nMemory of one scoring step ({shard_rows:,}-row shard, 200 test points):")
    for n_shards in (5, 20):
        peak, growth = scoring_memory(n_shards, shard_rows)
        print(
            f"  store with {n_shards:2d} shards: peak RSS {peak:7.1f} MB, "
            f"growth during scoring {growth:6.1f} MB"
        )


if __name__ == "__main__":
    main()
