"""Store throughput on S3 (a local moto server) against plain s3fs reads/writes of the same bytes.

Starts ``python -m moto.server`` on a free 127.0.0.1 port (or uses ``--endpoint``), then
for a (n_test × P) factor matrix and an (n_test × n_train) score matrix (float32; default
64 × 131,072 and 256 × 32,768, 32 MB each):

* factors: ``InfluenceStore.write_factors`` (a stand-in model whose factors are the given
  matrix, so no engine cost) and ``read_factors``;
* scores: every shard written through :class:`ShardWriter` (after one ``allocate_shards``;
  top-k, per-example statistics, crc32c, claim checks, completion marker), then read back
  with ``read_scores`` (every chunk checked);
* plain s3fs: the same bytes cut into the store's chunk sizes, written with one
  ``pipe({key: bytes})`` call and read with one ``cat([keys])`` (s3fs runs the requests
  concurrently), and the same bytes as one object (``pipe_file``/``cat_file``).

The ratio column is store time over plain-chunk time for the same bytes (1.0 = as fast as
plain s3fs). moto serves from memory in one Python process, so absolute MB/s are those of
this server, not of AWS S3; the ratio is what carries over.

Run: ``.venv/bin/python -m benchmarks.s3_benchmark [--quick] [--repeats 3]``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch

from benchmarks.store_benchmark import _Factors, _write_scores
from influence_pipeline.store import InfluenceStore, ShardSpec

CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
}


@contextlib.contextmanager
def moto_server() -> Iterator[str]:
    """A moto S3 server on a free 127.0.0.1 port; its log goes to a temporary file."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = int(probe.getsockname()[1])
    with tempfile.TemporaryFile() as log:
        server = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            deadline = time.monotonic() + 30
            while True:
                if server.poll() is not None:
                    raise RuntimeError(f"moto's server exited with {server.returncode}")
                with (
                    contextlib.suppress(OSError),
                    socket.create_connection(("127.0.0.1", port), 0.2),
                ):
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"moto's server did not listen on port {port}")
                time.sleep(0.1)
            yield f"http://127.0.0.1:{port}"
        finally:
            server.terminate()
            server.wait(timeout=10)


def _timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def _chunked(array: np.ndarray, chunks: tuple[int, ...]) -> list[bytes]:
    """The array cut into the given chunk shape (edge chunks padded, like Zarr's)."""
    rows, cols = chunks
    out = []
    for r in range(0, array.shape[0], rows):
        for c in range(0, array.shape[1], cols):
            block = np.full((rows, cols), np.nan, np.float32)
            part = array[r : r + rows, c : c + cols]
            block[: part.shape[0], : part.shape[1]] = part
            out.append(block.tobytes())
    return out


def run(
    endpoint: str, n_test: int, n_params: int, n_score_test: int, n_train: int, repeats: int
) -> None:
    import s3fs

    options = {"endpoint_url": endpoint}
    fs = s3fs.S3FileSystem(**options, skip_instance_cache=True)
    bucket = f"bench-{uuid.uuid4().hex[:8]}"
    fs.mkdir(bucket)
    rng = np.random.default_rng(0)
    factors = rng.standard_normal((n_test, n_params), dtype=np.float32)
    scores = rng.standard_normal((n_score_test, n_train), dtype=np.float32)
    n_shards = 8
    shard_rows = [n_train // n_shards] * n_shards
    loader = [(torch.zeros(m, 1), torch.zeros(m)) for m in [16] * (n_test // 16)]
    times: dict[str, list[float]] = {}

    def record(name: str, seconds: float) -> None:
        times.setdefault(name, []).append(seconds)

    print(
        f"S3 store benchmark on {endpoint} (moto): factors {n_test}x{n_params} "
        f"({factors.nbytes / 1e6:.0f} MB), scores {n_score_test}x{n_train} "
        f"({scores.nbytes / 1e6:.0f} MB), {n_shards} shards, {repeats} repeats, medians"
    )
    for rep in range(repeats):
        root = f"s3://{bucket}/store-{rep}"
        store = InfluenceStore(root, storage_options=options)
        assert n_test % 16 == 0
        t, _ = _timed(lambda s=store: s.write_factors("f", _Factors(factors), loader))
        record("factors_write", t)
        t, (back, _) = _timed(lambda s=store: s.read_factors("f"))
        record("factors_read", t)
        assert np.array_equal(back, factors)
        record_ = store.factors_record("f")
        f_chunks = tuple(store._array(f"{record_['path']}/values").chunks)

        # scores: a tiny test set of n_score_test rows (factors unused by ShardWriter)
        small = _Factors(np.zeros((n_score_test, 8), np.float32))
        batch = (torch.zeros(n_score_test, 1), torch.zeros(n_score_test))
        store.write_factors("bench", small, [batch])
        specs = [ShardSpec(f"shard-{i}", n) for i, n in enumerate(shard_rows)]
        store.allocate_shards("bench", specs)
        record("scores_write", _write_scores(store, scores, shard_rows, block=1024))
        allocation = store.allocation("bench")["shards"]
        columns = np.concatenate(
            [np.arange(a["start"], a["start"] + a["n_rows"]) for a in allocation.values()]
        )
        t, back = _timed(lambda s=store, c=columns: s.read_scores("bench", slice(None), c))
        record("scores_read", t)
        assert np.array_equal(back, scores)
        s_chunks = tuple(store.scores_array("bench").chunks)

        # plain s3fs: the same bytes in the store's chunk sizes, and as one object
        for name, array, chunks in (("factors", factors, f_chunks), ("scores", scores, s_chunks)):
            pieces = _chunked(array, chunks)
            keys = [f"{bucket}/plain-{rep}/{name}/{i}" for i in range(len(pieces))]
            mapping = dict(zip(keys, pieces, strict=True))
            record(f"{name}_plain_write", _timed(lambda m=mapping: fs.pipe(m))[0])
            t, got = _timed(lambda k=keys: fs.cat(k))
            record(f"{name}_plain_read", t)
            assert sum(len(v) for v in got.values()) == sum(len(p) for p in pieces)
            one = array.tobytes()
            key = f"{bucket}/plain-{rep}/{name}.bin"
            record(f"{name}_one_write", _timed(lambda k=key, b=one: fs.pipe_file(k, b))[0])
            record(f"{name}_one_read", _timed(lambda k=key: fs.cat_file(k))[0])
        fs.rm(f"{bucket}/plain-{rep}", recursive=True)
        fs.rm(f"{bucket}/store-{rep}", recursive=True)

    print(f"\n{'what':48s} {'seconds':>8s} {'MB/s':>8s} {'store/plain':>12s}")
    for name, nbytes in (("factors", factors.nbytes), ("scores", scores.nbytes)):
        for op in ("write", "read"):
            store_s = float(np.median(times[f"{name}_{op}"]))
            plain_s = float(np.median(times[f"{name}_plain_{op}"]))
            one_s = float(np.median(times[f"{name}_one_{op}"]))
            what = "ShardWriter" if (name, op) == ("scores", "write") else "store"
            call = "pipe" if op == "write" else "cat"
            rows = (
                (f"{name} {op} ({what})", store_s, f"{store_s / plain_s:11.2f}x"),
                (f"  plain s3fs, same chunks, one {call} call", plain_s, ""),
                ("  plain s3fs, one object", one_s, ""),
            )
            for label, seconds, ratio in rows:
                print(f"{label:48s} {seconds:8.2f} {nbytes / seconds / 1e6:8.1f} {ratio:>12s}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="4 MB arrays instead of 32 MB")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--endpoint", default=None, help="an S3 endpoint (default: start moto)")
    args = parser.parse_args()
    for name, value in CREDENTIALS.items():
        os.environ.setdefault(name, value)
    sizes = (32, 32_768, 64, 16_384) if args.quick else (64, 131_072, 256, 32_768)
    if args.endpoint:
        run(args.endpoint, *sizes, repeats=args.repeats)
    else:
        with moto_server() as endpoint:
            run(endpoint, *sizes, repeats=args.repeats)


if __name__ == "__main__":
    main()
