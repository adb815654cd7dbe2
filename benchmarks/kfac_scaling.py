"""EK-FAC scaling rows: GPT-style models from about 1M parameters to the GPT-2-small shape.

    .venv/bin/python benchmarks/kfac_scaling.py --threads 1                 # CPU, seq 256
    .venv/bin/python benchmarks/kfac_scaling.py --device cuda --seq 1024    # on a GPU

For each shape (one fresh process each): fit time per sequence (empirical Fisher, EK-FAC),
rank-r query-factor bytes against the dense (n_test, P) float32 factors, the time to score
training sequences against n_q = 4 and 32 queries (``--queries``), and the peak memory of
scoring above the loaded baseline (RSS on CPU, allocated memory on CUDA). The scoring time
is a + b·n_q per training sequence (forward/backward plus per-query contractions); the two
query counts give a and b, extrapolated to 1,000 queries and to 100,000 training
sequences. The tied output layer (50,257 wide for GPT-2) is left out of the factored layers,
as in Kronfluence's GPT-2 examples; embeddings and LayerNorms are never factored.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def _peak(device: str) -> int:
    import torch

    if device == "cuda":
        return int(torch.cuda.max_memory_allocated())
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def _reset(device: str) -> int:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return int(torch.cuda.memory_allocated())
    Path("/proc/self/clear_refs").write_text("5")
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def _sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def worker(shape: str, args: argparse.Namespace) -> dict[str, Any]:
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    sys.path.insert(0, str(HERE))
    import kfac_models

    from influence_pipeline.influence import EkfacInfluence

    torch.set_num_threads(args.threads)
    device = args.device
    model = kfac_models.scaling_model(shape, max_len=args.seq).to(device)
    vocab = kfac_models.SCALING_SHAPES[shape][3]
    gen = torch.Generator().manual_seed(0)
    n_fit, n_train = args.fit_sequences, args.train_sequences
    queries = [int(q) for q in args.queries.split(",")]
    tokens = torch.randint(0, vocab, (n_fit + n_train + max(queries), args.seq + 1), generator=gen)
    x, y = tokens[:, :-1].to(device), tokens[:, 1:].to(device)
    b = args.batch_size
    result: dict[str, Any] = {"shape": shape, "P": sum(p.numel() for p in model.parameters())}
    start = time.perf_counter()
    influence = EkfacInfluence(
        model, update_diagonal=True, hessian_regularization=1e-3, fisher="empirical", batch_size=b
    ).fit(DataLoader(TensorDataset(x[:n_fit], y[:n_fit]), batch_size=b))
    _sync(device)
    result["fit_s_per_sequence"] = (time.perf_counter() - start) / n_fit
    result["P_factored"] = influence.n_parameters
    train_x, train_y = x[n_fit : n_fit + n_train], y[n_fit : n_fit + n_train]
    queries_x, queries_y = x[n_fit + n_train :], y[n_fit + n_train :]
    for n_q in queries:
        factors = influence.compressed_factors(queries_x[:n_q], queries_y[:n_q], rank=args.rank)
        base = _reset(device)
        start = time.perf_counter()
        influence.influences_from_factors(factors, train_x, train_y)
        _sync(device)
        result[f"score_s_per_sequence_q{n_q}"] = (time.perf_counter() - start) / n_train
        result[f"score_peak_bytes_q{n_q}"] = _peak(device) - base
        result["factor_bytes_per_query"] = factors.nbytes / n_q
    q_low, q_high = queries[0], queries[-1]
    low = result[f"score_s_per_sequence_q{q_low}"]
    high = result[f"score_s_per_sequence_q{q_high}"]
    slope = max(0.0, (high - low) / (q_high - q_low))
    result["queries"] = queries
    result["per_query_s_per_sequence"] = slope
    result["score_s_per_1000_sequences_1000_queries"] = 1000 * (low + (1000 - q_low) * slope)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", default="1M,10M,124M")
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--queries", default="4,32", help="two query counts (slope)")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--fit-sequences", type=int, default=4)
    parser.add_argument("--train-sequences", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", default=None)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args)))
        return
    rows = []
    for shape in args.shapes.split(","):
        cmd = [sys.executable, str(Path(__file__).resolve()), *sys.argv[1:], "--worker", shape]
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        out = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if out.returncode != 0:
            print(f"{shape}: failed\n{out.stderr[-3000:]}")
            continue
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    mb = 1 / 2**20
    print(f"\nseq {args.seq}, rank {args.rank}, batch {args.batch_size}, {args.device}")
    print(
        "| shape | P | P factored | fit s/seq | score s/seq (few q) | (more q) | peak MB (more q) "
        "| factor MB/query (dense) | s per 1,000 seq × 1,000 q | days for 100,000 seq |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        dense = r["P_factored"] * 4
        lo, hi = r["queries"][0], r["queries"][-1]
        per_1000 = r["score_s_per_1000_sequences_1000_queries"]
        print(
            f"| {r['shape']} | {r['P'] / 1e6:.1f}M | {r['P_factored'] / 1e6:.1f}M "
            f"| {r['fit_s_per_sequence']:.2f} | {r[f'score_s_per_sequence_q{lo}']:.2f} ({lo}) "
            f"| {r[f'score_s_per_sequence_q{hi}']:.2f} ({hi}) "
            f"| {r[f'score_peak_bytes_q{hi}'] * mb:.0f} "
            f"| {r['factor_bytes_per_query'] * mb:.2f} ({dense * mb:.0f}) | {per_1000:.0f} "
            f"| {per_1000 * 100 / 86400:.1f} |"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
