"""Store throughput against a plain ``numpy.save`` of the same bytes on the same disk.

Measures, for a (n_test × P) factor matrix and an (n_test × n_train) score matrix
(default 2,000 × 50,000 float32, 400 MB):

* factors: ``InfluenceStore.write_factors`` path (Zarr, crc32c, synced) and ``read_factors``;
* scores: every training shard written through :class:`ShardWriter` (whole Zarr shards,
  running top-k and per-example statistics, crc32c, fsync, completion marker), then the
  whole matrix read back through ``scores_array``;
* raw: ``numpy.save`` of the same array (with and without fsync) and ``numpy.load``;
* top-k merge (``InfluenceStore.top_k``) for two numbers of training examples with the
  same number of shards, to show that it does not grow with n_train.

Run: ``.venv/bin/python benchmarks/store_benchmark.py [--quick] [--dir PATH]``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time

import numpy as np
import torch
import zarr
from zarr.codecs import Crc32cCodec

from influence_pipeline.store import InfluenceStore, ShardSpec, ShardWriter


class _Factors:
    """A stand-in influence model whose factors are a given matrix (no engine cost)."""

    def __init__(self, values: np.ndarray) -> None:
        self.values = torch.from_numpy(values)
        self.n_parameters = values.shape[1]
        self.model = torch.nn.Linear(1, 1)
        self.parameter_names = ["weight", "bias"]
        self.parameter_blocks = {"": ["weight", "bias"]}
        self.loss = None
        self._row = 0

    def _config(self) -> dict:
        return {"synthetic": True}

    def influence_factors(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        block = self.values[self._row : self._row + len(x)]
        self._row += len(x)
        return block


def _timed(fn):
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def _raw_save(path: str, array: np.ndarray, sync: bool) -> float:
    start = time.perf_counter()
    with open(path, "wb") as handle:
        np.save(handle, array)
        if sync:
            handle.flush()
            os.fsync(handle.fileno())
    return time.perf_counter() - start


def _write_scores(
    store: InfluenceStore, scores: np.ndarray, shard_rows: list[int], block: int
) -> float:
    start = time.perf_counter()
    column = 0
    for i, n in enumerate(shard_rows):
        writer = ShardWriter(store, "bench", f"shard-{i}", top_k=10)
        for offset in range(0, n, block):
            stop = min(n, offset + block)
            writer.add(torch.from_numpy(scores[:, column + offset : column + stop]))
        writer.finish("synthetic")
        column += n
    return time.perf_counter() - start


def run(n_test: int, n_params: int, n_train: int, n_shards: int, workdir: str) -> None:
    rng = np.random.default_rng(0)
    gb = 1e9
    print(
        f"store benchmark in {workdir} (n_test={n_test}, P={n_params}, n_train={n_train}, "
        f"shards={n_shards})"
    )

    # ---------------------------------------------------------------- factors
    factors = rng.standard_normal((n_test, n_params), dtype=np.float32)
    store = InfluenceStore(os.path.join(workdir, "store"))
    fake = _Factors(factors)
    loader = [(torch.zeros(256, 1), torch.zeros(256)) for _ in range(0, n_test, 256)]
    loader[-1] = (
        torch.zeros(n_test - 256 * (len(loader) - 1), 1),
        torch.zeros(n_test - 256 * (len(loader) - 1)),
    )
    t_fw, _ = _timed(lambda: store.write_factors("bench", fake, loader))
    t_fr, (read, _) = _timed(lambda: store.read_factors("bench"))
    assert np.array_equal(read, factors)
    raw_f = os.path.join(workdir, "factors.npy")
    t_fraw = _raw_save(raw_f, factors, sync=True)
    t_fload, _ = _timed(lambda: np.load(raw_f))

    # ---------------------------------------------------------------- scores
    scores = rng.standard_normal((n_test, n_train), dtype=np.float32)
    base = n_train // n_shards
    shard_rows = [base + (1 if i < n_train % n_shards else 0) for i in range(n_shards)]
    store.allocate_shards("bench", [ShardSpec(f"shard-{i}", n) for i, n in enumerate(shard_rows)])
    t_sw = _write_scores(store, scores, shard_rows, block=512)
    allocation = store.allocation("bench")
    width = allocation["shard_width"]
    # the array write path alone: the same layout, whole column blocks, crc32c, fsync
    bare = zarr.open_group(os.path.join(workdir, "bare"), mode="a").create_array(
        "scores",
        shape=(n_test, allocation["shards"][f"shard-{n_shards - 1}"]["stop"]),
        dtype="float32",
        chunks=store.scores_array("bench").chunks,
        fill_value=np.nan,
        compressors=[Crc32cCodec()],
    )
    padded = np.full(bare.shape, np.nan, dtype=np.float32)
    for i, a in enumerate(allocation["shards"].values()):
        padded[:, a["start"] : a["start"] + a["n_rows"]] = scores[
            :, sum(shard_rows[:i]) : sum(shard_rows[: i + 1])
        ]

    def bare_write() -> None:
        for column in range(0, bare.shape[1], width):
            bare[:, column : column + width] = padded[:, column : column + width]
        for directory, _, files in os.walk(os.path.join(workdir, "bare")):
            for name in files:
                with open(os.path.join(directory, name), "rb") as handle:
                    os.fsync(handle.fileno())

    t_bare, _ = _timed(bare_write)

    def read_all() -> np.ndarray:
        array = store.scores_array("bench")[...]
        return np.concatenate(
            [
                array[:, a["start"] : a["start"] + a["n_rows"]]
                for a in allocation["shards"].values()
            ],
            axis=1,
        )

    t_sr, back = _timed(read_all)
    assert np.array_equal(back, scores)
    raw_s = os.path.join(workdir, "scores.npy")
    t_sraw = _raw_save(raw_s, scores, sync=True)
    t_sraw_nosync = _raw_save(raw_s, scores, sync=False)
    t_sload, _ = _timed(lambda: np.load(raw_s))

    # ---------------------------------------------------------------- top-k merge vs n_train
    merge = []
    for n in (n_train // 5, n_train):
        sub = InfluenceStore(os.path.join(workdir, f"merge-{n}"))
        sub_fake = _Factors(factors[:, :8])
        sub.write_factors("bench", sub_fake, [(torch.zeros(n_test, 1), torch.zeros(n_test))])
        rows = [n // n_shards] * n_shards
        sub.allocate_shards("bench", [ShardSpec(f"shard-{i}", r) for i, r in enumerate(rows)])
        _write_scores(sub, scores[:, : sum(rows)], rows, block=2048)
        sub.top_k("bench", 10)  # warm-up
        t_merge, table = _timed(lambda s=sub: s.top_k("bench", 10))
        merge.append((sum(rows), t_merge, len(table)))

    mb = scores.nbytes / 1e6
    print()
    print(f"{'what':50s} {'seconds':>8s} {'GB/s':>7s} {'vs raw':>7s}")
    rows_out = [
        ("factors write (store, synced)", t_fw, factors.nbytes, t_fraw),
        ("factors numpy.save + fsync", t_fraw, factors.nbytes, t_fraw),
        ("factors read (store)", t_fr, factors.nbytes, t_fload),
        ("factors numpy.load", t_fload, factors.nbytes, t_fload),
        (f"scores write {mb:.0f} MB (ShardWriter: +top-k, stats)", t_sw, scores.nbytes, t_sraw),
        ("scores array writes only (chunks, crc32c, fsync)", t_bare, scores.nbytes, t_sraw),
        ("scores numpy.save + fsync", t_sraw, scores.nbytes, t_sraw),
        ("scores numpy.save (no fsync)", t_sraw_nosync, scores.nbytes, t_sraw),
        ("scores read (store, whole matrix)", t_sr, scores.nbytes, t_sload),
        ("scores numpy.load", t_sload, scores.nbytes, t_sload),
    ]
    for name, seconds, nbytes, reference in rows_out:
        print(f"{name:50s} {seconds:8.2f} {nbytes / seconds / gb:7.2f} {seconds / reference:6.2f}x")
    print()
    print(
        f"{'top-k merge (k=10, helpful+harmful)':44s} {'n_train':>8s} {'seconds':>8s} {'rows':>8s}"
    )
    for n, seconds, rows in merge:
        print(f"{'':44s} {n:8d} {seconds:8.3f} {rows:8d}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--quick", action="store_true", help="200 x 5,000 scores instead of 2,000 x 50,000"
    )
    parser.add_argument("--dir", default=None, help="working directory (default: a temporary one)")
    args = parser.parse_args()
    n_test, n_params, n_train = (200, 2_000, 5_000) if args.quick else (2_000, 20_000, 50_000)
    workdir = args.dir or tempfile.mkdtemp(prefix="store-bench-", dir=os.getcwd())
    try:
        run(n_test, n_params, n_train, n_shards=10, workdir=workdir)
    finally:
        if args.dir is None:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
