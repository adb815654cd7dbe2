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
from influence_pipeline.store.scoring import _RunningTopK


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


def _fsync_tree(top: str) -> None:
    for directory, _, files in os.walk(top):
        for name in files:
            with open(os.path.join(directory, name), "rb") as handle:
                os.fsync(handle.fileno())


def _median(values: list[float]) -> float:
    return float(np.median(values))


def run(
    n_test: int, n_params: int, n_train: int, n_shards: int, workdir: str, repeats: int
) -> None:
    rng = np.random.default_rng(0)
    gb = 1e9
    print(
        f"store benchmark in {workdir} (n_test={n_test}, P={n_params}, n_train={n_train}, "
        f"shards={n_shards}, {repeats} alternating repeats, medians)"
    )
    times: dict[str, list[float]] = {}

    def record(name: str, seconds: float) -> None:
        times.setdefault(name, []).append(seconds)

    factors = rng.standard_normal((n_test, n_params), dtype=np.float32)
    scores = rng.standard_normal((n_test, n_train), dtype=np.float32)
    base = n_train // n_shards
    shard_rows = [base + (1 if i < n_train % n_shards else 0) for i in range(n_shards)]
    specs = [ShardSpec(f"shard-{i}", n) for i, n in enumerate(shard_rows)]
    sizes = [min(256, n_test - s) for s in range(0, n_test, 256)]
    loader = [(torch.zeros(m, 1), torch.zeros(m)) for m in sizes]
    for rep in range(repeats):
        # ------------------------------------------------------------ factors
        store = InfluenceStore(os.path.join(workdir, f"store-{rep}"))
        t, _ = _timed(lambda s=store: s.write_factors("bench", _Factors(factors), loader))
        record("factors_write", t)
        t, (read, _) = _timed(lambda s=store: s.read_factors("bench"))
        record("factors_read", t)
        assert np.array_equal(read, factors)
        raw_f = os.path.join(workdir, f"factors-{rep}.npy")
        record("factors_raw", _raw_save(raw_f, factors, sync=True))
        record("factors_load", _timed(lambda f=raw_f: np.load(f))[0])

        # ------------------------------------------------------------ scores
        store.allocate_shards("bench", specs)
        record("scores_write", _write_scores(store, scores, shard_rows, block=512))
        allocation = store.allocation("bench")
        slots = list(allocation["shards"].values())
        width = allocation["shard_width"]

        # the summaries alone (no writes): what the writer adds on top of the array writes
        def summaries() -> None:
            column = 0
            for n in shard_rows:
                helpful, harmful = _RunningTopK(n_test, 10, True), _RunningTopK(n_test, 10, False)
                for offset in range(0, n, 512):
                    block = scores[:, column + offset : column + min(n, offset + 512)]
                    block.sum(axis=0, dtype=np.float64), block.min(axis=0), block.max(axis=0)
                    helpful.update(block, offset)
                    harmful.update(block, offset)
                column += n

        record("summaries", _timed(summaries)[0])

        # the array write path alone: the same layout, whole column blocks, crc32c, fsync
        bare = zarr.open_group(os.path.join(workdir, f"bare-{rep}"), mode="a").create_array(
            "scores",
            shape=(n_test, slots[-1]["stop"]),
            dtype="float32",
            chunks=store.scores_array("bench").chunks,
            fill_value=np.nan,
            compressors=[Crc32cCodec()],
        )
        padded = np.full(bare.shape, np.nan, dtype=np.float32)
        column = 0
        for a in slots:
            padded[:, a["start"] : a["start"] + a["n_rows"]] = scores[
                :, column : column + a["n_rows"]
            ]
            column += a["n_rows"]

        def bare_write(array=bare, padded=padded, rep=rep, width=width) -> None:
            for c in range(0, array.shape[1], width):
                array[:, c : c + width] = padded[:, c : c + width]
            _fsync_tree(os.path.join(workdir, f"bare-{rep}"))

        record("bare_write", _timed(bare_write)[0])

        # the floor of any chunked layout here: the same column blocks as plain files
        def plain_files(padded=padded, rep=rep, width=width) -> None:
            top = os.path.join(workdir, f"plain-{rep}")
            os.makedirs(top)
            block = np.empty((n_test, width), np.float32)
            for c in range(0, padded.shape[1], width):
                block[...] = padded[:, c : c + width]
                with open(os.path.join(top, str(c // width)), "wb") as handle:
                    handle.write(block.data)
                    handle.flush()
                    os.fsync(handle.fileno())

        record("plain_files", _timed(plain_files)[0])
        shutil.rmtree(os.path.join(workdir, f"plain-{rep}"))
        del padded

        def read_all(store=store, slots=slots) -> np.ndarray:
            # what a user does for the dense matrix: each shard's columns into one array
            array, out, column = store.scores_array("bench"), np.empty_like(scores), 0
            for a in slots:
                out[:, column : column + a["n_rows"]] = array[
                    :, a["start"] : a["start"] + a["n_rows"]
                ]
                column += a["n_rows"]
            return out

        t, back = _timed(read_all)
        record("scores_read", t)
        assert np.array_equal(back, scores)
        del back
        raw_s = os.path.join(workdir, f"scores-{rep}.npy")
        record("scores_raw", _raw_save(raw_s, scores, sync=True))
        record("scores_raw_nosync", _raw_save(raw_s + ".2", scores, sync=False))
        record("scores_load", _timed(lambda f=raw_s: np.load(f))[0])
        for path in (raw_f, raw_s, raw_s + ".2"):
            os.remove(path)
        shutil.rmtree(os.path.join(workdir, f"bare-{rep}"))
        shutil.rmtree(os.path.join(workdir, f"store-{rep}"))

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
    print(f"{'what':52s} {'seconds':>8s} {'range':>13s} {'GB/s':>6s} {'vs raw':>7s}")
    rows_out = [
        ("factors write (store, synced)", "factors_write", factors.nbytes, "factors_raw"),
        ("factors numpy.save + fsync", "factors_raw", factors.nbytes, "factors_raw"),
        ("factors read (store)", "factors_read", factors.nbytes, "factors_load"),
        ("factors numpy.load", "factors_load", factors.nbytes, "factors_load"),
        (
            f"scores write {mb:.0f} MB (ShardWriter, all included)",
            "scores_write",
            scores.nbytes,
            "scores_raw",
        ),
        (
            "  of which: array writes (chunks, crc32c, fsync)",
            "bare_write",
            scores.nbytes,
            "scores_raw",
        ),
        (
            "  of which: top-k + stats, no writes (one thread)",
            "summaries",
            scores.nbytes,
            "scores_raw",
        ),
        ("same blocks as plain files (no Zarr), fsync", "plain_files", scores.nbytes, "scores_raw"),
        ("scores numpy.save + fsync", "scores_raw", scores.nbytes, "scores_raw"),
        ("scores numpy.save (no fsync)", "scores_raw_nosync", scores.nbytes, "scores_raw"),
        ("scores read (store, dense matrix)", "scores_read", scores.nbytes, "scores_load"),
        ("scores numpy.load", "scores_load", scores.nbytes, "scores_load"),
    ]
    for label, key, nbytes, reference in rows_out:
        seconds = _median(times[key])
        spread = f"{min(times[key]):.2f}-{max(times[key]):.2f}"
        ratio = seconds / _median(times[reference])
        print(
            f"{label:52s} {seconds:8.2f} {spread:>13s} {nbytes / seconds / gb:6.2f} {ratio:6.2f}x"
        )
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
    parser.add_argument("--repeats", type=int, default=3, help="alternating repeats (medians)")
    args = parser.parse_args()
    n_test, n_params, n_train = (200, 2_000, 5_000) if args.quick else (2_000, 20_000, 50_000)
    workdir = args.dir or tempfile.mkdtemp(prefix="store-bench-", dir=os.getcwd())
    try:
        run(n_test, n_params, n_train, n_shards=10, workdir=workdir, repeats=args.repeats)
    finally:
        if args.dir is None:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
