"""A run whose worker is SIGKILLed is marked failed by dead_run_sensor (a live one is left
alone), and the instance's settings retry it once and free its pool slots."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import dagster as dg

from influence_pipeline.defs.automation import build_dead_run_sensor

REPO = Path(__file__).resolve().parents[2]

WORKER = """
import sys, time, dagster as dg
flag = sys.argv[1]

@dg.asset
def slow():
    open(flag, "w").close()
    time.sleep(120)
    return dg.MaterializeResult()

defs = dg.Definitions(assets=[slow], jobs=[dg.define_asset_job("slow_job", selection=[slow])],
                      executor=dg.in_process_executor)
with dg.DagsterInstance.from_config(sys.argv[2]) as instance:
    defs.resolve_job_def("slow_job").execute_in_process(instance=instance)
"""


def test_a_killed_run_is_marked_failed_and_will_be_retried(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    shutil.copy(REPO / "dagster_home" / "dagster.yaml", home / "dagster.yaml")
    flag = tmp_path / "started"
    worker = subprocess.Popen([sys.executable, "-c", WORKER, str(flag), str(home)])
    try:
        deadline = time.time() + 120
        while not flag.exists():
            assert worker.poll() is None and time.time() < deadline, "the worker did not start"
            time.sleep(0.2)
        sensor = build_dead_run_sensor()
        with dg.DagsterInstance.from_config(str(home)) as instance:
            assert instance.run_retries_enabled and instance.run_retries_max_retries == 1
            assert not instance.run_retries_retry_on_asset_or_op_failure  # data errors: no
            assert instance.run_monitoring_settings["free_slots_after_run_end_seconds"] > 0
            (run,) = instance.get_runs()
            with dg.build_sensor_context(instance=instance) as context:
                sensor(context)  # the worker is alive: nothing happens
            assert instance.get_run_by_id(run.run_id).status == dg.DagsterRunStatus.STARTED
            os.kill(worker.pid, signal.SIGKILL)
            worker.wait(timeout=30)
            with dg.build_sensor_context(instance=instance) as context:
                sensor(context)
            assert instance.get_run_by_id(run.run_id).status == dg.DagsterRunStatus.FAILURE
            # not a step failure, so the instance's run retries apply to it
            failures = instance.get_records_for_run(
                run.run_id, of_type=dg.DagsterEventType.STEP_FAILURE
            ).records
            assert failures == []
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait()
