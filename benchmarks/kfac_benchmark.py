"""EK-FAC side by side with Kronfluence 1.0.1: a causal transformer and a Conv2d CNN.

Run from the repository root (Kronfluence lives in its own virtual environment, built on the
first run with torch pinned to the project's 2.13.0 so no CUDA build is pulled):

    .venv/bin/python benchmarks/kfac_benchmark.py --threads 1
    .venv/bin/python benchmarks/kfac_benchmark.py --cases cnn --n-train 300 --skip-kronfluence

Each side runs in a fresh process on the same saved model and data (float32, empirical
Fisher, EK-FAC, the same explicit damping λ = 0.1 × the mean corrected eigenvalue of our
fit): fit time, query-factor time, score time (all training examples against all queries),
peak RSS above the loaded baseline, bytes of query factors; then the agreement per query
(Pearson, Spearman) of our scores with Kronfluence's, and of our rank-r query factors
(r = 8/16/32/64) with our exact ones. Kronfluence has no separate factor stage: its pairwise
score call computes the preconditioned query gradients, so its "scores" time includes them.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
DEFAULT_KF = ROOT / ".kronfluence-venv"
KF_VERSION = "1.0.1"
TORCH_PIN = "torch==2.13.0"


# ----------------------------------------------------------------------------- helpers
def _reset_peak() -> None:
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def _peak_rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def _rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def _load(directory: Path) -> tuple[Any, ...]:
    import torch

    sys.path.insert(0, str(HERE))
    import kfac_models

    meta = json.loads((directory / "meta.json").read_text())
    data = torch.load(directory / "data.pt")
    model = kfac_models.architecture(meta["case"])
    model.load_state_dict(torch.load(directory / "model.pt"))
    return meta, model.eval(), data, kfac_models.loss_of(meta["case"])


# ----------------------------------------------------------------------------- workers
def worker_ours(directory: Path, threads: int) -> dict[str, Any]:
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    from influence_pipeline.influence import EkfacInfluence

    torch.set_num_threads(threads)
    meta, model, data, loss = _load(directory)
    x, y, xt, yt = data["x"], data["y"], data["x_test"], data["y_test"]
    batch = meta["batch_size"]
    result: dict[str, Any] = {}
    base = _rss()
    _reset_peak()
    start = time.perf_counter()
    influence = EkfacInfluence(
        model,
        update_diagonal=True,
        hessian_regularization=1e-12,  # replaced below by the explicit damping
        fisher="empirical",
        loss=loss,
        batch_size=batch,
    ).fit(DataLoader(TensorDataset(x, y), batch_size=batch))
    result["fit_s"] = time.perf_counter() - start
    result["fit_peak_bytes"] = _peak_rss() - base
    diags = [c.op.factors.diag for _, c in influence.block_mapper.items()]
    lam = 0.1 * float(torch.cat([d.flatten() for d in diags]).mean())
    influence.with_regularization(lam)
    result["damping"] = lam
    result["n_parameters"] = influence.n_parameters
    result["modules"] = influence.modules
    for rank in [None, *meta["ranks"]]:
        key = "exact" if rank is None else f"rank{rank}"
        _reset_peak()
        start = time.perf_counter()
        factors = influence.compressed_factors(xt, yt, rank=rank)
        factor_s = time.perf_counter() - start
        start = time.perf_counter()
        scores = influence.influences_from_factors(factors, x, y)
        score_s = time.perf_counter() - start
        result[key] = {
            "factors_s": factor_s,
            "scores_s": score_s,
            "peak_bytes": _peak_rss() - base,
            "factor_bytes": factors.nbytes,
        }
        torch.save(scores, directory / f"ours_{key}.pt")
    return result


def worker_kronfluence(directory: Path, threads: int, damping: float) -> dict[str, Any]:
    import torch
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments
    from kronfluence.task import Task
    from torch.utils.data import TensorDataset

    torch.set_num_threads(threads)
    meta, model, data, loss = _load(directory)
    x, y, xt, yt = data["x"], data["y"], data["x_test"], data["y_test"]
    batch = meta["batch_size"]

    class LossTask(Task):
        def compute_train_loss(self, batch: Any, model: Any, sample: bool = False) -> Any:
            inputs, labels = batch
            return loss(model(inputs), labels)

        def compute_measurement(self, batch: Any, model: Any) -> Any:
            inputs, labels = batch
            return loss(model(inputs), labels)

    task = LossTask()
    model = prepare_model(model, task)
    analyzer = Analyzer(
        analysis_name="bench",
        model=model,
        task=task,
        cpu=True,
        disable_tqdm=True,
        output_dir=str(directory / "kronfluence"),
    )
    factor_args = FactorArguments(
        strategy="ekfac",
        use_empirical_fisher=True,
        activation_covariance_dtype=torch.float32,
        gradient_covariance_dtype=torch.float32,
        lambda_dtype=torch.float32,
        covariance_max_examples=len(x),
        lambda_max_examples=len(x),
    )
    result: dict[str, Any] = {}
    base = _rss()
    _reset_peak()
    start = time.perf_counter()
    analyzer.fit_all_factors(
        factors_name="ekfac",
        dataset=TensorDataset(x, y),
        per_device_batch_size=batch,
        factor_args=factor_args,
        overwrite_output_dir=True,
    )
    result["fit_s"] = time.perf_counter() - start
    result["fit_peak_bytes"] = _peak_rss() - base
    for rank in [None, *meta["ranks"]]:
        key = "exact" if rank is None else f"rank{rank}"
        _reset_peak()
        start = time.perf_counter()
        analyzer.compute_pairwise_scores(
            scores_name=f"scores_{key}",
            factors_name="ekfac",
            query_dataset=TensorDataset(xt, yt),
            train_dataset=TensorDataset(x, y),
            per_device_query_batch_size=batch,
            per_device_train_batch_size=batch,
            score_args=ScoreArguments(damping_factor=damping, query_gradient_low_rank=rank),
            overwrite_output_dir=True,
        )
        scores = analyzer.load_pairwise_scores(f"scores_{key}")["all_modules"]
        result[key] = {
            "scores_s": time.perf_counter() - start,
            "peak_bytes": _peak_rss() - base,
        }
        torch.save(scores.to(torch.float32), directory / f"kf_{key}.pt")
    return result


# ----------------------------------------------------------------------------- driver
def ensure_kronfluence(path: Path) -> Path:
    python = path / "bin" / "python"
    if python.exists():
        return python
    print(f"building {path} (Kronfluence {KF_VERSION}, {TORCH_PIN}) ...", flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(path)], check=True)
    pins = path / "constraints.txt"
    pins.write_text(TORCH_PIN + "\n")
    subprocess.run(
        [
            str(python),
            "-m",
            "pip",
            "install",
            "-q",
            "-c",
            str(pins),
            TORCH_PIN,
            f"kronfluence=={KF_VERSION}",
        ],
        check=True,
    )
    return python


def prepare(case: str, n_train: int, n_test: int, ranks: list[int], root: Path) -> Path:
    import torch

    sys.path.insert(0, str(HERE))
    import kfac_models

    make = {"transformer": kfac_models.transformer_case, "cnn": kfac_models.cnn_case}[case]
    model, x, y, _ = make(n_train + n_test)
    directory = root / case
    directory.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), directory / "model.pt")
    torch.save(
        {"x": x[:n_train], "y": y[:n_train], "x_test": x[n_train:], "y_test": y[n_train:]},
        directory / "data.pt",
    )
    meta = {"case": case, "ranks": ranks, "batch_size": 32, "n_train": n_train, "n_test": n_test}
    (directory / "meta.json").write_text(json.dumps(meta))
    return directory


def run_worker(python: str, args: list[str], timeout: float) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run(
        [python, str(Path(__file__).resolve()), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )
    if out.returncode != 0:
        raise RuntimeError(f"worker {args} failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def agreement(a: Any, b: Any) -> dict[str, float]:
    import torch

    def ranks(t: Any) -> Any:
        return t.argsort(dim=1).argsort(dim=1).to(torch.float64)

    def pearson(u: Any, v: Any) -> Any:
        u = u.to(torch.float64) - u.to(torch.float64).mean(1, keepdim=True)
        v = v.to(torch.float64) - v.to(torch.float64).mean(1, keepdim=True)
        return (u * v).sum(1) / (u.norm(dim=1) * v.norm(dim=1))

    p, s = pearson(a, b), pearson(ranks(a), ranks(b))
    return {
        "pearson_mean": float(p.mean()),
        "pearson_min": float(p.min()),
        "spearman_mean": float(s.mean()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases", default="transformer,cnn")
    parser.add_argument("--n-train", type=int, default=500)
    parser.add_argument("--n-test", type=int, default=50)
    parser.add_argument("--ranks", default="8,16,32,64")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--kronfluence-venv", default=str(DEFAULT_KF))
    parser.add_argument("--skip-kronfluence", action="store_true")
    parser.add_argument("--timeout", type=float, default=1800)
    parser.add_argument("--json", default=None)
    parser.add_argument("--worker", choices=["ours", "kronfluence"], help=argparse.SUPPRESS)
    parser.add_argument("--dir", help=argparse.SUPPRESS)
    parser.add_argument("--damping", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker == "ours":
        print(json.dumps(worker_ours(Path(args.dir), args.threads)))
        return
    if args.worker == "kronfluence":
        print(json.dumps(worker_kronfluence(Path(args.dir), args.threads, args.damping)))
        return

    import torch

    ranks = [int(r) for r in args.ranks.split(",") if r]
    kf_python = None if args.skip_kronfluence else ensure_kronfluence(Path(args.kronfluence_venv))
    report: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for case in args.cases.split(","):
            directory = prepare(case, args.n_train, args.n_test, ranks, Path(tmp))
            common = ["--dir", str(directory), "--threads", str(args.threads)]
            ours = run_worker(sys.executable, ["--worker", "ours", *common], args.timeout)
            entry: dict[str, Any] = {"ours": ours}
            exact = torch.load(directory / "ours_exact.pt")
            entry["ours_rank_vs_exact"] = {
                f"rank{r}": agreement(torch.load(directory / f"ours_rank{r}.pt"), exact)
                for r in ranks
            }
            if kf_python is not None:
                theirs = run_worker(
                    str(kf_python),
                    ["--worker", "kronfluence", *common, "--damping", str(ours["damping"])],
                    args.timeout,
                )
                entry["kronfluence"] = theirs
                kf_exact = torch.load(directory / "kf_exact.pt")
                entry["ours_vs_kronfluence"] = agreement(exact, kf_exact)
                entry["kronfluence_rank_vs_exact"] = {
                    f"rank{r}": agreement(torch.load(directory / f"kf_rank{r}.pt"), kf_exact)
                    for r in ranks
                }
            report[case] = entry
            print_case(case, entry, ranks)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))


def print_case(case: str, entry: dict[str, Any], ranks: list[int]) -> None:
    ours, theirs = entry["ours"], entry.get("kronfluence")
    mb = 1 / 2**20
    print(
        f"\n## {case}: P = {ours['n_parameters']:,}, layers {len(ours['modules'])}, "
        f"λ = {ours['damping']:.3g}"
    )
    print("| | fit s | factors s | scores s | fit + factors + scores s | peak MB | factor MB |")
    print("|---|---|---|---|---|---|---|")
    for key in ["exact", *[f"rank{r}" for r in ranks]]:
        o = ours[key]
        total = ours["fit_s"] + o["factors_s"] + o["scores_s"]
        print(
            f"| ours {key} | {ours['fit_s']:.2f} | {o['factors_s']:.2f} | {o['scores_s']:.2f} "
            f"| {total:.2f} | {max(o['peak_bytes'], ours['fit_peak_bytes']) * mb:.0f} "
            f"| {o['factor_bytes'] * mb:.2f} |"
        )
        if theirs is not None:
            t = theirs[key]
            total = theirs["fit_s"] + t["scores_s"]
            print(
                f"| Kronfluence {key} | {theirs['fit_s']:.2f} | (in scores) | "
                f"{t['scores_s']:.2f} | {total:.2f} | "
                f"{max(t['peak_bytes'], theirs['fit_peak_bytes']) * mb:.0f} | |"
            )
    if "ours_vs_kronfluence" in entry:
        a = entry["ours_vs_kronfluence"]
        print(
            f"\nours vs Kronfluence (exact): 1 − Pearson mean {1 - a['pearson_mean']:.1e}, "
            f"max {1 - a['pearson_min']:.1e}; 1 − Spearman mean {1 - a['spearman_mean']:.1e}"
        )
    print("\n| rank | ours: Pearson mean / min vs exact | Spearman | Kronfluence: Pearson mean |")
    print("|---|---|---|---|")
    for r in ranks:
        o = entry["ours_rank_vs_exact"][f"rank{r}"]
        k = entry.get("kronfluence_rank_vs_exact", {}).get(f"rank{r}", {})
        kp = f"{k['pearson_mean']:.4f}" if k else "-"
        print(
            f"| {r} | {o['pearson_mean']:.4f} / {o['pearson_min']:.4f} | "
            f"{o['spearman_mean']:.4f} | {kp} |"
        )


if __name__ == "__main__":
    main()
