"""The store on S3: a local moto server (its server mode) on 127.0.0.1, reached with s3fs.

The fixture starts ``python -m moto.server`` on a free local port as a subprocess (no
network beyond 127.0.0.1, anonymous test credentials from the environment, the endpoint
through ``storage_options``) and stops it at the end. On object storage there is no lock
and no lease, so shard columns are allocated once by one process before the fan-out; the
writers then write disjoint chunk objects, and nothing a writer does rewrites an object
another writer owns.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator

import numpy as np
import pytest
import s3fs  # the dev install has it (and moto[server], which the fixture runs)

from influence_pipeline.store import InfluenceStore, StoreError

from . import workload as w

SERVER_START_S = 30.0
CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
}


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture(scope="module")
def s3_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A moto S3 server on 127.0.0.1 (a subprocess), the AWS test credentials in the
    environment; the server is stopped and the environment restored at the end. Its log
    (a line per request) goes to a file: a pipe nobody reads would fill and stall it."""
    saved = {name: os.environ.get(name) for name in CREDENTIALS}
    os.environ.update(CREDENTIALS)
    port = _free_port()
    log_path = tmp_path_factory.mktemp("moto") / "server.log"
    log = open(log_path, "wb")  # noqa: SIM115 - closed in the finally below
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + SERVER_START_S
        while True:
            if server.poll() is not None:
                raise RuntimeError(
                    f"moto's server exited with {server.returncode}: "
                    f"{log_path.read_text(errors='replace')[-2000:]}"
                )
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"moto's server did not listen on port {port} within 30 s")
            time.sleep(0.1)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(timeout=10)
        log.close()
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _options(endpoint: str) -> dict[str, str]:
    return {"endpoint_url": endpoint}


@pytest.fixture
def s3_root(s3_endpoint: str) -> str:
    """A fresh bucket on the server; the store's URL in it."""
    bucket = f"store-{uuid.uuid4().hex[:12]}"
    s3fs.S3FileSystem(**_options(s3_endpoint), skip_instance_cache=True).mkdir(bucket)
    return f"s3://{bucket}/influence"


def _score_on_s3(root: str, endpoint: str, shard: int, start_flag: str) -> None:
    """Worker (a fresh process): open the store on S3, load the block mapper from it and
    score one shard through the store's API."""
    while not os.path.exists(start_flag):  # start all workers together
        time.sleep(0.01)
    store = InfluenceStore(root, storage_options=_options(endpoint))
    influence = store.load_block_mapper(w.model())
    store.write_shard_scores("val", f"shard-{shard}", influence, w.shard_loader(shard))


def _prepare_on_s3(root: str, endpoint: str) -> tuple[InfluenceStore, object]:
    from torch.utils.data import DataLoader, TensorDataset

    from influence_pipeline.store import ShardSpec

    store = InfluenceStore(root, storage_options=_options(endpoint))
    influence = w.fitted()
    store.save_block_mapper(influence)
    _, _, xt, yt = w.data()
    store.write_factors("val", influence, DataLoader(TensorDataset(xt, yt), batch_size=7))
    store.allocate_shards(
        "val", [ShardSpec(f"shard-{i}", n) for i, n in enumerate(w.SHARD_ROWS)], shard_width=16
    )
    return store, influence


def test_eight_concurrent_writers_on_s3_lose_no_value(tmp_path, s3_endpoint, s3_root):
    """One allocation, then 8 processes score 8 distinct shards at once on S3: every
    shard is complete and every score equals the local-store run of the same shards.
    Factors read back equal; a shard not allocated before the fan-out is refused."""
    local, influence = w.prepare(str(tmp_path / "local"))
    for i in range(w.N_SHARDS):
        local.write_shard_scores("val", f"shard-{i}", influence, w.shard_loader(i))

    # prepare() allocates all shards in this process before the fan-out
    remote, _ = _prepare_on_s3(s3_root, s3_endpoint)
    assert remote.location.has_lock is False
    flag = str(tmp_path / "go")
    # spawn, not fork: a parent that already ran torch (OpenMP's thread pool) or fsspec's IO
    # thread can leave forked children hanging in the full suite
    ctx = mp.get_context("spawn")
    workers = [
        ctx.Process(target=_score_on_s3, args=(s3_root, s3_endpoint, i, flag))
        for i in range(w.N_SHARDS)
    ]
    for p in workers:
        p.start()
    open(flag, "w").close()
    deadline = time.monotonic() + 240
    for p in workers:
        p.join(timeout=max(0.0, deadline - time.monotonic()))
    for p in workers:
        if p.is_alive():
            p.kill()
    assert [p.exitcode for p in workers] == [0] * w.N_SHARDS

    reread = InfluenceStore(s3_root, mode="r", storage_options=_options(s3_endpoint))
    status = reread.status()["val"]
    assert sorted(status["complete"]) == sorted(f"shard-{i}" for i in range(w.N_SHARDS))
    assert status["missing"] == []
    a = reread.scores_array("val")[...]
    b = InfluenceStore(str(tmp_path / "local"), mode="r").scores_array("val")[...]
    assert a.shape == b.shape
    # NaN exactly where the local run has it (the unused tail of each column range)
    np.testing.assert_array_equal(np.isnan(a), np.isnan(b))
    for name, slot in reread.allocation("val")["shards"].items():
        used = a[:, slot["start"] : slot["start"] + slot["n_rows"]]
        assert not np.isnan(used).any(), f"values of {name} lost"
    # float32 scores; the workers may take another BLAS path than this process
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7, equal_nan=True)
    assert len(reread.top_k("val", k=3)) > 0

    # factors read back as written locally; a late shard is refused on object storage
    remote_factors, local_factors = reread.read_factors("val")[0], local.read_factors("val")[0]
    np.testing.assert_allclose(remote_factors, local_factors, rtol=1e-6)
    with pytest.raises(StoreError, match="allocate_shards"):
        remote.ensure_allocated("val", "late-shard", 12)
    assert remote.ensure_allocated("val", "shard-0", w.SHARD_ROWS[0])["n_rows"] == w.SHARD_ROWS[0]
