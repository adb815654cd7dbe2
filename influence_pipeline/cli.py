"""influence-pipeline: run the bundled influence pipeline and read its results.

Commands:
  run     materialize the whole graph (the main job, influence_main) into the project's
          Dagster instance and store, printing one line per step, then the audit summary;
          artifacts already stored for the same inputs are reused
  status  where the store stands: factors and scored shards per test set, recent runs
  audit   print the latest data audit (flag counts and the most suspicious examples)
  ui      open Dagster's UI on the project's instance (dagster dev)

Paths do not depend on the current directory: the instance is --home, else $DAGSTER_HOME,
else <project>/dagster_home; the store is --store, else $INFLUENCE_STORE, else
<project>/influence_store (<project>: the source checkout this package runs from).
`run --example tiny-gpt` (and `ui --example tiny-gpt`) use the GPT example instead of
the digits: a byte-level transformer trained on first use on the standard library's
docstrings; its default store is <project>/influence_store-tiny-gpt.
`run --example digits-memorizing` uses the memorizing digits (10 % flipped labels, an MLP
trained until it fits them, the audit ranked by the mean loss over its saved checkpoints);
its default store is <project>/influence_store-digits-memorizing.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
import warnings
from pathlib import Path
from typing import Any

from .project import default_home, default_store, project_root

#: The bundled workloads (see influence_pipeline.definitions).
EXAMPLES = ("digits", "tiny-gpt", "digits-memorizing")
#: Dagster's run tags for a run over a range of partitions (as a backfill sets them).
RANGE_START = "dagster/asset_partition_range_start"
RANGE_END = "dagster/asset_partition_range_end"
MINIMAL_DAGSTER_YAML = "telemetry:\n  enabled: false\n"


class CliError(Exception):
    """A problem the user can fix; printed as one line, exit status 2."""


def register_shards(defs: Any, instance: Any) -> list[str]:
    """Evaluate training_shard_sensor once and apply its result (what the daemon does)."""
    import dagster as dg

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


def run_pipeline(
    defs: Any,
    instance: Any,
    test_sets: list[str],
    run_config: dict[str, Any] | None = None,
    out: Any = None,
    shards_per_run: int = 16,
) -> Any:
    """Materialize every asset partition in dependency order, one run of the main job per
    step (block_mapper, factors, scores, tables, data_audit with the whole-store checks);
    scoring runs take up to ``shards_per_run`` shards of a test set each (a partition
    range). Prints one line per step to ``out`` (default stdout); returns the audit run's
    result."""
    import dagster as dg

    from .defs import JOB_OF

    out = out or sys.stdout
    shards = register_shards(defs, instance)
    quiet = {"loggers": {"console": {"config": {"log_level": "ERROR"}}}}
    steps: list[tuple[str, str | tuple[str, str] | None]] = [("block_mapper", None)]
    steps += [("influence_factors", t) for t in test_sets]
    for t in test_sets:  # ranges of partitions: the shards' order as registered
        for first in range(0, len(shards), shards_per_run):
            batch = shards[first : first + shards_per_run]
            steps.append(("influence_scores", (f"{t}|{batch[0]}", f"{t}|{batch[-1]}")))
    steps += [("influence_table", t) for t in test_sets]
    steps += [("data_audit", None)]
    tags = {"influence/main_job": time.strftime("%Y-%m-%dT%H:%M:%S")}
    result = None
    for i, (key, partition) in enumerate(steps, 1):
        ops = {k: v for k, v in ((run_config or {}).get("ops") or {}).items() if k == key}
        run_tags = dict(tags)
        if isinstance(partition, tuple):
            label = (
                f"{key}[{partition[0]}]"
                if partition[0] == partition[1]
                else (f"{key}[{partition[0]} ... {partition[1].split('|')[1]}]")
            )
            run_tags[RANGE_START], run_tags[RANGE_END] = partition
            partition = None
        else:
            label = key if partition is None else f"{key}[{partition}]"
        start = time.perf_counter()
        result = defs.resolve_job_def(JOB_OF[key]).execute_in_process(
            run_config={**quiet, **({"ops": ops} if ops else {})},
            instance=instance,
            partition_key=partition,
            asset_selection=[dg.AssetKey(key)],
            tags=run_tags,
            raise_on_error=False,
        )
        seconds = time.perf_counter() - start
        if not result.success:
            print(f"[{i:2d}/{len(steps)}] {label:48s} FAILED", file=out)
            for event in result.all_events:
                # only step failures carry step_failure_data (a RUN_FAILURE event raises)
                if event.is_step_failure:
                    data = event.step_failure_data
                    user = data.user_failure_data
                    print(user.description if user and user.description else data.error, file=out)
            raise SystemExit(1)
        events = result.get_asset_materialization_events()
        metadata = events[0].materialization.metadata if events else {}
        reused = metadata.get("reused")
        note = " (reused)" if reused is not None and reused.value else ""
        failed_checks = [c.check_name for c in result.get_asset_check_evaluations() if not c.passed]
        if failed_checks:
            note += f"  CHECK FAILED: {', '.join(failed_checks)}"
        # the whole line at once: nothing Dagster prints can land inside it
        print(f"[{i:2d}/{len(steps)}] {label:48s}{seconds:6.1f} s{note}", file=out, flush=True)
    return result


def _paths(args: argparse.Namespace) -> tuple[Path, str]:
    """(Dagster home, store) for this invocation, exported as DAGSTER_HOME and
    INFLUENCE_STORE for the definitions; nothing is created."""
    home = Path(args.home).resolve() if args.home else default_home()
    if home is None:
        raise CliError(
            "No project checkout next to the package and no DAGSTER_HOME: pass --home DIR "
            "(the Dagster instance folder)."
        )
    example = getattr(args, "example", "digits")
    store = args.store or default_store()
    if not args.store and not os.environ.get("INFLUENCE_STORE") and example != "digits":
        store += f"-{example}"  # one store per workload
    if store and "://" not in store:
        store = str(Path(store).resolve())
    os.environ["DAGSTER_HOME"] = str(home)
    os.environ["INFLUENCE_STORE"] = store
    return home, store


def _ensure_home(home: Path) -> None:
    """Make the instance folder with the project's dagster.yaml (telemetry off, pools, run
    monitoring) when it has none, so Dagster prints no first-run banner."""
    if (home / "dagster.yaml").is_file():
        return
    home.mkdir(parents=True, exist_ok=True)
    root = project_root()
    template = root / "dagster_home" / "dagster.yaml" if root else None
    if template is not None and template.is_file():
        shutil.copyfile(template, home / "dagster.yaml")
    else:
        (home / "dagster.yaml").write_text(MINIMAL_DAGSTER_YAML)


def _quiet_dagster() -> None:
    import dagster as dg

    warnings.filterwarnings("ignore", category=dg.BetaWarning)
    warnings.filterwarnings("ignore", category=dg.PreviewWarning)


def cmd_run(args: argparse.Namespace) -> int:
    home, store = _paths(args)
    _quiet_dagster()
    import dagster as dg

    from .definitions import example_workload
    from .defs import JOB_OF, build_definitions

    workload = example_workload(args.example, store)
    defs = build_definitions(workload)
    from .defs.config import validate_run_config

    test_sets = args.test_set or list(workload.test_sets)
    unknown = sorted(set(test_sets) - set(workload.test_sets))
    if unknown:
        raise CliError(
            f"--test-set {', '.join(unknown)}: not a test set of workload {workload.name!r}; "
            f"choose from {', '.join(workload.test_sets)}."
        )
    method: dict[str, Any] = {}
    if args.method is not None:
        method["method"] = args.method
    if args.regularization is not None:
        method["regularization"] = args.regularization
    run_config = {"ops": {"block_mapper": {"config": method}}} if method else {}
    try:  # before anything is written
        validate_run_config(defs, JOB_OF["block_mapper"], run_config, workload.method)
    except ValueError as error:
        raise CliError(str(error)) from error
    _ensure_home(home)
    print(f"influence_pipeline: workload {workload.name!r}: {workload.description}")
    print(f"Dagster instance: {home}\nstore: {store}", flush=True)
    instance = dg.DagsterInstance.get()
    start = time.perf_counter()
    result = run_pipeline(defs, instance, test_sets, run_config)
    print(f"\nWhole graph materialized in {time.perf_counter() - start:.1f} s.\n")
    metadata = result.get_asset_materialization_events()[0].materialization.metadata
    print(metadata["summary"].value.split("![audit]")[0].rstrip())
    print(
        f"\nOpen the UI: influence-pipeline --home {home} ui"
        "\nRead the tables with pandas: see README.md, 'Reading results with pandas'."
    )
    return 0


def _open_store(store: str) -> Any:
    from .store import InfluenceStore

    try:
        return InfluenceStore(store, mode="r")
    except ValueError as error:
        raise CliError(f"{error} Run `influence-pipeline run` first.") from error


def cmd_status(args: argparse.Namespace) -> int:
    home, store = _paths(args)
    print(f"Dagster instance: {home}\nstore: {store}")
    for test_set, state in _open_store(store).status().items():
        print(
            f"  {test_set}: factors {'done' if state['factors'] else 'missing'}; "
            f"{len(state['complete'])} shards scored"
            + (f", missing: {', '.join(state['missing'])}" if state["missing"] else "")
            + (f", stale: {', '.join(state['stale'])}" if state.get("stale") else "")
        )
    if (home / "history").is_dir():  # an instance with runs (SQLite run storage)
        _quiet_dagster()
        import dagster as dg

        with dg.DagsterInstance.from_config(str(home)) as instance:
            runs = instance.get_runs(limit=5)
            if runs:
                print("Recent runs:")
            for run in runs:
                print(f"  {run.job_name:28s} {run.status.value:10s} {run.run_id[:8]}")
    return 0


def cmd_audit(args: argparse.Namespace) -> int:
    _, store = _paths(args)
    try:
        audit = _open_store(store).read_table("audit/latest")
    except (KeyError, ValueError, FileNotFoundError) as error:
        raise CliError(
            f"No audit in {store} yet ({error}). Run `influence-pipeline run`."
        ) from None
    if audit is None:
        raise CliError(f"No audit in {store} yet. Run `influence-pipeline run`.")
    from .analysis.audit import FLAGS

    flagged = audit[audit.flagged]
    print(f"Latest audit ({store}): {len(audit):,} training examples, {len(flagged)} flagged.")
    for flag in FLAGS:
        print(f"  {flag}: {int(audit[flag].sum())}")
    columns = [
        c for c in ("train_id", "train_shard", "label", "suspicion", "reasons") if c in audit
    ]
    if len(flagged):
        print(f"\nMost suspicious {min(args.rows, len(flagged))}:")
        print(flagged[columns].head(args.rows).to_string(index=False))
    return 0


def cmd_ui(args: argparse.Namespace) -> int:
    home, store = _paths(args)
    root = project_root()
    if root is None:
        raise CliError("`ui` needs the project checkout (its workspace.yaml); none found.")
    _ensure_home(home)
    os.environ["INFLUENCE_EXAMPLE"] = args.example  # read by influence_pipeline.definitions
    dagster = Path(sys.executable).with_name("dagster")
    command = [str(dagster), "dev", "-h", args.host, "-p", str(args.port)]
    command += ["-w", str(root / "workspace.yaml")]
    print(f"Dagster instance: {home}\nstore: {store}\nhttp://{args.host}:{args.port}", flush=True)
    os.chdir(root)
    os.execv(command[0], command)
    return 0  # pragma: no cover - execv does not return


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="influence-pipeline",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
        epilog="\n\n".join((__doc__ or "").split("\n\n")[1:]),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--home", help="Dagster instance folder (default: see below)")
    parser.add_argument("--store", help="store path or URL (default: see below)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    run = sub.add_parser("run", help="materialize the whole graph (the main job)")
    run.add_argument("--example", choices=EXAMPLES, default="digits", help="bundled workload")
    run.add_argument(
        "--test-set", action="append", metavar="NAME", help="only this test set (repeatable)"
    )
    run.add_argument("--method", help="influence method (default: the workload's)")
    run.add_argument("--regularization", type=float, help="λ ≥ 0 (default: the workload's)")
    run.set_defaults(handler=cmd_run)
    sub.add_parser("status", help="factors and scored shards per test set; recent runs")
    sub.choices["status"].set_defaults(handler=cmd_status)
    audit = sub.add_parser("audit", help="print the latest data audit")
    audit.add_argument("--rows", type=int, default=15, help="flagged examples to show")
    audit.set_defaults(handler=cmd_audit)
    ui = sub.add_parser("ui", help="open Dagster's UI on the project's instance")
    ui.add_argument("--example", choices=EXAMPLES, default="digits", help="bundled workload")
    ui.add_argument("--host", default="127.0.0.1")
    ui.add_argument("--port", type=int, default=3000)
    ui.set_defaults(handler=cmd_ui)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.handler(args))
    except CliError as error:
        print(f"influence-pipeline: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
