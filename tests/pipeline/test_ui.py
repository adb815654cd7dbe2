"""The UI starts: ``dagster dev`` on a free loopback port answers /server_info, its GraphQL
lists every asset and check with no load error, and SIGINT stops it leaving no process.

``dagster dev`` is started in its own process session with default signal handlers
(started from a non-interactive shell it would ignore SIGINT) and stopped with SIGINT to
its whole process group."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DAGSTER = Path(sys.executable).with_name("dagster")

EXPECTED_ASSETS = {
    "training_shards",
    "block_mapper",
    "influence_factors",
    "influence_scores",
    "influence_table",
    "data_audit",
}
EXPECTED_CHECKS = {
    "factors_finite",
    "factors_match_block_mapper",
    "scores_finite",
    "scores_spot_check",
    "all_shards_present",
    "stored_scores_finite",
    "factors_provenance",
    "every_shard_scored",
}

QUERY = """
query {
  workspaceOrError {
    __typename
    ... on Workspace {
      locationEntries {
        name
        locationOrLoadError { __typename ... on PythonError { message } }
      }
    }
  }
  assetNodes {
    assetKey { path }
    assetChecksOrError { __typename ... on AssetChecks { checks { name } } }
  }
}
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def default_signals() -> None:
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_DFL)


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.slow
def test_dagster_dev_serves_the_graph_and_stops_cleanly(tmp_path: Path) -> None:
    assert DAGSTER.exists(), f"dagster CLI not found next to {sys.executable}"
    port = free_port()
    home = tmp_path / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text((REPO / "dagster_home" / "dagster.yaml").read_text())
    env = {
        **os.environ,
        "DAGSTER_HOME": str(home),
        "INFLUENCE_STORE": str(tmp_path / "store"),
        "INFLUENCE_PIPELINE_CACHE": str(tmp_path / "cache"),
    }
    log = open(tmp_path / "dagster-dev.log", "wb")  # noqa: SIM115 - closed in finally
    proc = subprocess.Popen(
        [
            str(DAGSTER),
            "dev",
            "-h",
            "127.0.0.1",
            "-p",
            str(port),
            "-w",
            str(REPO / "workspace.yaml"),
        ],
        cwd=REPO,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        preexec_fn=default_signals,
    )
    pgid = os.getpgid(proc.pid)
    try:
        deadline = time.time() + 180
        info = None
        while time.time() < deadline:
            assert proc.poll() is None, (tmp_path / "dagster-dev.log").read_text()[-3000:]
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/server_info", timeout=2) as r:
                    info = json.loads(r.read())
                    break
            except OSError:
                time.sleep(0.5)
        assert info is not None and "dagster_webserver_version" in info
        body = None
        while time.time() < deadline:  # the code location loads after the server answers
            request = urllib.request.Request(
                f"http://127.0.0.1:{port}/graphql",
                data=json.dumps({"query": QUERY}).encode(),
                headers={"Content-Type": "application/json"},
            )
            with urllib.request.urlopen(request, timeout=30) as r:
                body = json.loads(r.read())
            entries = body["data"]["workspaceOrError"]["locationEntries"]
            if (
                entries
                and all(e["locationOrLoadError"] for e in entries)
                and body["data"]["assetNodes"]
            ):
                break
            time.sleep(1)
        assert body is not None
        errors = [
            e
            for e in body["data"]["workspaceOrError"]["locationEntries"]
            if e["locationOrLoadError"]["__typename"] != "RepositoryLocation"
        ]
        assert not errors, errors
        nodes = body["data"]["assetNodes"]
        assets = {"/".join(n["assetKey"]["path"]) for n in nodes}
        assert assets >= EXPECTED_ASSETS
        checks = {c["name"] for n in nodes for c in (n["assetChecksOrError"].get("checks") or [])}
        assert checks >= EXPECTED_CHECKS
    finally:
        if group_alive(pgid):
            os.killpg(pgid, signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(pgid, signal.SIGKILL)
            proc.wait()
            pytest.fail("dagster dev did not stop on SIGINT within 60 s")
        log.close()
    for _ in range(100):  # children exit right after the parent
        if not group_alive(pgid):
            break
        time.sleep(0.1)
    assert not group_alive(pgid), "dagster dev left processes behind"
