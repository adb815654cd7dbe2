"""Attribution quality on the bundled digits workloads: mislabel rankings, LDS per method,
the regularization (λ) sweep and the methods comparison.

Subcommands (each prints its tables and writes parquet + markdown (+ PNG) into ``--out``,
default ``bench_results/quality-<UTC stamp>/``):

* ``mislabel``: on the memorizing workload (10 % flips, no weight decay) and the bundled one
  (3 % flips), for each seed: the fraction of flips found in the top 1/5/10/20 % and the
  average precision of every ranking (loss, checkpoint loss, self-influence per method, mean
  rank combinations, random), and the audit flags' precision/recall;
* ``lds``: M subsets (fraction α) of the bundled workload's training set, the MLP retrained
  on each (and again with another seed: the ceiling), the LDS of each method;
* ``lambda``: LDS against λ for each method on the same retrained subsets (reused from disk);
* ``methods``: per method, fit/factor/score time, peak memory, agreement with Direct, LDS
  and mislabel AP.

Usage: ``OMP_NUM_THREADS=1 .venv/bin/python benchmarks/quality_benchmark.py mislabel``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from influence_pipeline.analysis.audit import audit_examples
from influence_pipeline.defs.quality import default_quality_methods
from influence_pipeline.examples.digits import (
    cached_checkpoint,
    load_digits_data,
    load_model,
    make_model,
)
from influence_pipeline.examples.digits_memorizing import (
    BUNDLED,
    flipped_mask,
    memorizing_checkpoints,
    memorizing_data,
    retrainer,
)
from influence_pipeline.quality import average_precision, flag_quality, spearman
from influence_pipeline.quality.lds import lds, predicted_losses, sample_subsets
from influence_pipeline.quality.mislabel import (
    mean_rank,
    mislabel_report,
    per_sample_losses,
    self_influences,
)
from influence_pipeline.workload import MethodSpec

LOSS = torch.nn.functional.cross_entropy

#: Each method as the quality assets measure it (λ = 1e-2, rank 50, seeded).
DEFAULT_SPECS: dict[str, MethodSpec] = default_quality_methods()
#: The methods whose self-influence is cheap enough to rank 1,297 training points.
RANKING_METHODS = ("direct", "arnoldi", "ekfac", "nystroem", "ihm")


def fit(spec: MethodSpec, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> Any:
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=256)
    return spec.build(model, LOSS).fit(loader)


def _model_from_state(state: Mapping[str, torch.Tensor]) -> torch.nn.Module:
    model = make_model()
    model.load_state_dict(state)
    return model.eval().double()


def show(row: Mapping[str, Any]) -> None:
    print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)


def write(frame: pd.DataFrame, out: Path, name: str, title: str) -> None:
    frame.to_parquet(out / f"{name}.parquet")
    text = f"## {title}\n\n" + frame.to_markdown(index=False, floatfmt=".4g") + "\n"
    (out / f"{name}.md").write_text(text)
    print(text, flush=True)


def mislabel_rankings(
    model: torch.nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    checkpoints: list[torch.nn.Module],
    methods: tuple[str, ...],
    seed: int,
) -> dict[str, np.ndarray]:
    rankings: dict[str, np.ndarray] = {"loss": per_sample_losses(model, LOSS, x, y)}
    if checkpoints:
        rankings["checkpoint_loss"] = np.mean(
            [per_sample_losses(m, LOSS, x, y) for m in checkpoints], axis=0
        )
    for name in methods:
        influence = fit(DEFAULT_SPECS[name], model, x, y)
        rankings[f"self_influence:{name}"] = self_influences(influence, x, y)
    si = rankings["self_influence:direct"]
    rankings["loo_loss"] = rankings["loss"] + si / len(y)
    rankings["mean_rank(self_influence, loss)"] = mean_rank(si, rankings["loss"])
    if checkpoints:
        rankings["mean_rank(self_influence, checkpoint_loss)"] = mean_rank(
            si, rankings["checkpoint_loss"]
        )
        per_checkpoint = [
            self_influences(fit(DEFAULT_SPECS["direct"], m, x, y), x, y) for m in checkpoints
        ]
        rankings["checkpoint_self_influence:direct"] = mean_rank(*per_checkpoint)
        rankings["checkpoint_loo_loss"] = np.mean(
            [
                per_sample_losses(m, LOSS, x, y) + s / len(y)
                for m, s in zip(checkpoints, per_checkpoint, strict=True)
            ],
            axis=0,
        )
        rankings["mean_rank(checkpoint_self_influence, checkpoint_loss)"] = mean_rank(
            rankings["checkpoint_self_influence:direct"], rankings["checkpoint_loss"]
        )
    rankings["random"] = np.random.default_rng(seed).permutation(len(y)).astype(np.float64)
    return rankings


def run_mislabel(args: argparse.Namespace, out: Path) -> None:
    rows, flag_rows = [], []
    for seed in args.seeds:
        # memorizing workload
        t = time.perf_counter()
        data = memorizing_data(seed)
        paths = memorizing_checkpoints(seed=seed)
        states = [torch.load(p, weights_only=True) for p in paths]
        model = _model_from_state(states[-1])
        checkpoints = [_model_from_state(s) for s in states]
        x = torch.from_numpy(data.x_train).double()
        y = torch.from_numpy(data.y_train)
        rankings = mislabel_rankings(model, x, y, checkpoints, RANKING_METHODS, seed)
        report = mislabel_report(rankings, flipped_mask(data))
        report.insert(0, "seed", seed)
        report.insert(0, "workload", "memorizing")
        rows.append(report)
        flag_rows.append(_flags(rankings, data, "memorizing", seed))
        print(f"memorizing seed {seed}: {time.perf_counter() - t:.1f} s", flush=True)
        # bundled workload (weight decay, 3 % flips; only seed 0's checkpoint is the bundled one)
        data = load_digits_data(seed=seed)
        model = load_model(cached_checkpoint(seed=seed)).double()
        x = torch.from_numpy(data.x_train).double()
        y = torch.from_numpy(data.y_train)
        rankings = mislabel_rankings(model, x, y, [], ("direct",), seed)
        report = mislabel_report(rankings, flipped_mask(data))
        report.insert(0, "seed", seed)
        report.insert(0, "workload", "bundled")
        rows.append(report)
        flag_rows.append(_flags(rankings, data, "bundled", seed))
    table = pd.concat(rows, ignore_index=True)
    write(table, out, "mislabel_rankings", "Mislabel detection per ranking and seed")
    summary = (
        table.drop(columns="seed")
        .groupby(["workload", "ranking"], sort=False)
        .agg(["mean", "std"])
        .reset_index()
    )
    summary.columns = [" ".join(c).strip() for c in summary.columns]
    write(summary, out, "mislabel_summary", f"Mean and std over seeds {args.seeds}")
    write(pd.DataFrame(flag_rows), out, "mislabel_flags", "Audit flags: precision and recall")


def run_flags(args: argparse.Namespace, out: Path) -> None:
    """The audit flags alone (Direct's self-influence and the loss at the final checkpoint)
    on both workloads for each seed."""
    rows = []
    for seed in args.seeds:
        for workload in ("bundled", "memorizing"):
            if workload == "bundled":
                data = load_digits_data(seed=seed)
                model = load_model(cached_checkpoint(seed=seed)).double()
            else:
                data = memorizing_data(seed)
                state = torch.load(memorizing_checkpoints(seed=seed)[-1], weights_only=True)
                model = _model_from_state(state)
            x = torch.from_numpy(data.x_train).double()
            y = torch.from_numpy(data.y_train)
            rankings = mislabel_rankings(model, x, y, [], ("direct",), seed)
            rows.append(_flags(rankings, data, workload, seed))
            show(rows[-1])
    write(pd.DataFrame(rows), out, "mislabel_flags", "Audit flags: precision and recall")


def _flags(rankings: dict[str, np.ndarray], data: Any, workload: str, seed: int) -> dict:
    examples = pd.DataFrame(
        {
            "train_id": data.train_ids,
            "self_influence": rankings["self_influence:direct"],
            "loss": rankings["loss"],
            "mean_influence": 0.0,
        }
    )
    audit = audit_examples(examples).sort_values("train_id")
    corrupted = np.isin(np.sort(data.train_ids), data.train_ids[data.flipped])
    row: dict[str, Any] = {"workload": workload, "seed": seed}
    for flag in ("likely_mislabeled", "high_self_influence", "high_loss"):
        q = flag_quality(audit[flag].to_numpy(), corrupted)
        row[f"{flag} n"] = q.flagged
        row[f"{flag} precision"] = q.precision
        row[f"{flag} recall"] = q.recall
    return row


# ---------------------------------------------------------------- LDS on the bundled workload


def retrained_losses(args: argparse.Namespace, cache: Path) -> dict[str, np.ndarray]:
    """Test losses of the MLP retrained on each subset (seed 0 and seed 1), cached on disk:
    ``masks`` (M, n_train), ``<test_set>/seed<k>`` (n_test, M)."""
    path = cache / f"retrained-M{args.subsets}-a{args.fraction}.npz"
    if path.exists():
        return dict(np.load(path))
    data = load_digits_data(seed=0)
    x = torch.from_numpy(data.x_train)
    y = torch.from_numpy(data.y_train)
    masks = sample_subsets(len(y), args.subsets, args.fraction, seed=0)
    retrain = retrainer(BUNDLED)
    result: dict[str, np.ndarray] = {"masks": masks}
    start = time.perf_counter()
    losses: dict[str, list[np.ndarray]] = {}
    for m, mask in enumerate(masks):
        keep = torch.from_numpy(mask)
        for seed in (0, 1):
            model = retrain(x[keep], y[keep], seed)
            for name, (xt, yt, _) in data.test_sets.items():
                losses.setdefault(f"{name}/seed{seed}", []).append(
                    per_sample_losses(model, LOSS, torch.from_numpy(xt), torch.from_numpy(yt))
                )
        if m % 10 == 9:
            print(
                f"retrained {m + 1}/{len(masks)} subsets × 2 seeds: "
                f"{time.perf_counter() - start:.0f} s",
                flush=True,
            )
    result.update({k: np.stack(v, axis=1) for k, v in losses.items()})
    cache.mkdir(parents=True, exist_ok=True)
    np.savez(path, **result)  # type: ignore[arg-type]
    return result


def bundled_setup() -> tuple[Any, torch.nn.Module, torch.Tensor, torch.Tensor]:
    data = load_digits_data(seed=0)
    model = load_model(cached_checkpoint()).double()
    return data, model, torch.from_numpy(data.x_train).double(), torch.from_numpy(data.y_train)


def test_scores(
    influence: Any, data: Any, x: torch.Tensor, y: torch.Tensor, name: str
) -> np.ndarray:
    xt, yt, _ = data.test_sets[name]
    scores = influence.influences(torch.from_numpy(xt).double(), torch.from_numpy(yt), x, y)
    return scores.detach().double().cpu().numpy()


def lds_row(scores: np.ndarray, retrained: dict[str, np.ndarray], name: str) -> dict[str, float]:
    result = lds(retrained[f"{name}/seed0"], predicted_losses(scores, retrained["masks"]))
    return {f"lds {name}": result.mean, f"low {name}": result.low, f"high {name}": result.high}


def ceiling_rows(retrained: dict[str, np.ndarray], data: Any) -> dict[str, float]:
    row: dict[str, float] = {}
    for name in data.test_sets:
        result = lds(retrained[f"{name}/seed0"], retrained[f"{name}/seed1"])
        row.update(
            {f"lds {name}": result.mean, f"low {name}": result.low, f"high {name}": result.high}
        )
    return row


def independent_direct_lds(
    model: torch.nn.Module,
    data: Any,
    x: torch.Tensor,
    y: torch.Tensor,
    retrained: dict[str, np.ndarray],
    lam: float,
) -> float:
    """Direct's LDS recomputed without the engine or this package's metrics: the dense
    Hessian by torch.func.hessian, a numpy solve, per-sample gradients by a loop of
    autograd calls and scipy's Spearman."""
    from scipy.stats import spearmanr
    from torch.func import functional_call, hessian

    names = [n for n, _ in model.named_parameters()]
    params = {n: p.detach() for n, p in model.named_parameters()}
    shapes = [params[n].shape for n in names]
    sizes = [params[n].numel() for n in names]

    def unflatten(flat: torch.Tensor) -> dict[str, torch.Tensor]:
        return {n: t.reshape(s) for n, t, s in zip(names, flat.split(sizes), shapes, strict=True)}

    flat0 = torch.cat([params[n].reshape(-1) for n in names])

    def mean_loss(flat: torch.Tensor) -> torch.Tensor:
        return LOSS(functional_call(model, unflatten(flat), (x,)), y)

    h = hessian(mean_loss)(flat0).numpy() + lam * np.eye(len(flat0))

    def gradients(xs: torch.Tensor, ys: torch.Tensor) -> np.ndarray:
        rows = []
        for xi, yi in zip(xs, ys, strict=True):
            flat = flat0.clone().requires_grad_(True)
            loss = LOSS(functional_call(model, unflatten(flat), (xi[None],)), yi[None])
            rows.append(torch.autograd.grad(loss, flat)[0].numpy())
        return np.stack(rows)

    xt, yt, _ = data.test_sets["validation"]
    g_test = gradients(torch.from_numpy(xt).double(), torch.from_numpy(yt))
    g_train = gradients(x, y)
    scores = np.linalg.solve(h, g_test.T).T @ g_train.T
    predicted = -(scores @ retrained["masks"].T.astype(np.float64))
    actual = retrained["validation/seed0"]
    rhos = [spearmanr(a, p).statistic for a, p in zip(actual, predicted, strict=True)]
    return float(np.nanmean(rhos))


def run_lds(args: argparse.Namespace, out: Path) -> None:
    retrained = retrained_losses(args, Path("bench_results") / "quality-cache")
    data, model, x, y = bundled_setup()
    rows = []
    for name, spec in DEFAULT_SPECS.items():
        start = time.perf_counter()
        influence = fit(spec, model, x, y)
        row: dict[str, Any] = {"method": name}
        for test_set in data.test_sets:
            row.update(lds_row(test_scores(influence, data, x, y, test_set), retrained, test_set))
        row["seconds"] = time.perf_counter() - start
        rows.append(row)
        print(row, flush=True)
    rows.append({"method": "retrain, another seed (ceiling)", **ceiling_rows(retrained, data)})
    start = time.perf_counter()
    independent = independent_direct_lds(model, data, x, y, retrained, 1e-2)
    rows.append(
        {
            "method": "direct, independent computation",
            "lds validation": independent,
            "seconds": time.perf_counter() - start,
        }
    )
    write(
        pd.DataFrame(rows),
        out,
        "lds",
        f"LDS per method (bundled digits, M = {args.subsets} subsets, α = {args.fraction}, "
        "retrained with seed 0; ceiling: seed 1 against seed 0; 95 % bootstrap over test points)",
    )


# ---------------------------------------------------------------- λ and rank sweeps

LAMBDAS = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)


def sweep_specs() -> dict[str, MethodSpec]:
    """The methods of the λ sweep at their default rank (CG and LiSSA converge to Direct's
    answer at every λ and cost far more, so Direct stands for them)."""
    return {
        "direct": MethodSpec("direct", 1e-2),
        "arnoldi r50": MethodSpec("arnoldi", 1e-2, rank=50, options={"seed": 0}),
        "arnoldi r50 woodbury": MethodSpec(
            "arnoldi", 1e-2, rank=50, options={"seed": 0, "use_woodbury": True}
        ),
        "nystroem r50": MethodSpec("nystroem", 1e-2, rank=50, options={"seed": 0}),
        "ekfac": MethodSpec("ekfac", 1e-2),
        "ihm": MethodSpec("ihm", 1e-2),
    }


def run_lambda(args: argparse.Namespace, out: Path) -> None:
    retrained = retrained_losses(args, Path("bench_results") / "quality-cache")
    data, model, x, y = bundled_setup()
    rows = []
    for name, spec in sweep_specs().items():
        if args.methods and name not in args.methods:
            continue
        influence = fit(spec, model, x, y)
        for lam in args.lambdas:
            influence.with_regularization(lam)
            row: dict[str, Any] = {"method": name, "lambda": lam}
            for test_set in data.test_sets:
                row.update(
                    lds_row(test_scores(influence, data, x, y, test_set), retrained, test_set)
                )
            rows.append(row)
            print(
                {k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()},
                flush=True,
            )
    for method in ("arnoldi", "nystroem") if args.ranks else ():
        for rank in (10, 25, 50, 100, 200, 400):
            for woodbury in (False, True) if method == "arnoldi" else (True,):
                options: dict[str, Any] = {"seed": 0}
                if method == "arnoldi":
                    options["use_woodbury"] = woodbury
                spec = MethodSpec(method, 1e-2, rank=rank, options=options)
                influence = fit(spec, model, x, y)
                label = f"{method} r{rank}" + (" woodbury" if woodbury else "")
                row = {"method": label, "lambda": 1e-2}
                for test_set in data.test_sets:
                    row.update(
                        lds_row(test_scores(influence, data, x, y, test_set), retrained, test_set)
                    )
                rows.append(row)
                print(
                    {k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()},
                    flush=True,
                )
    table = pd.DataFrame(rows)
    write(
        table,
        out,
        "lambda_sweep",
        f"LDS against λ and rank (bundled digits, M = {args.subsets}, α = {args.fraction})",
    )
    _plot_lambda(table[table.method.isin(sweep_specs())], out / "lambda_sweep.png")


def _plot_lambda(table: pd.DataFrame, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    table = table.drop_duplicates(["method", "lambda"]).sort_values("lambda")
    for name, group in table.groupby("method", sort=False):
        ax.plot(group["lambda"], group["lds holdout"], marker="o", label=str(name))
    ax.set_xscale("log")
    ax.set_xlabel("regularization λ")
    ax.set_ylabel("LDS (holdout)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ---------------------------------------------------------------- methods comparison


def run_methods(args: argparse.Namespace, out: Path) -> None:
    from benchmarks.bench_common import MemoryMeter

    retrained = retrained_losses(args, Path("bench_results") / "quality-cache")
    data, model, x, y = bundled_setup()
    xt, yt, _ = data.test_sets["validation"]
    x_test, y_test = torch.from_numpy(xt).double(), torch.from_numpy(yt)
    memorizing = memorizing_data(0)
    mem_model = _model_from_state(torch.load(memorizing_checkpoints(seed=0)[-1], weights_only=True))
    mx, my = torch.from_numpy(memorizing.x_train).double(), torch.from_numpy(memorizing.y_train)
    rows, reference = [], None
    for name, spec in DEFAULT_SPECS.items():
        if args.methods and name not in args.methods:
            continue
        meter = MemoryMeter(torch.device("cpu"))
        start = time.perf_counter()
        influence = fit(spec, model, x, y)
        fitted = time.perf_counter()
        factors = influence.influence_factors(x_test, y_test)
        factored = time.perf_counter()
        scores = influence.influences_from_factors(factors, x, y).detach().numpy()
        scored = time.perf_counter()
        peak = meter.peak_mb()
        if reference is None:
            reference = scores
        row: dict[str, Any] = {
            "method": name,
            "fit s": fitted - start,
            "factors s": factored - fitted,
            "scores s": scored - factored,
            "peak MB": peak,
            "pearson vs direct": float(np.corrcoef(scores.ravel(), reference.ravel())[0, 1]),
            "spearman vs direct": float(
                np.nanmean(spearman(scores, reference))  # per test point, over training points
            ),
            **lds_row(scores, retrained, "validation"),
        }
        if name in RANKING_METHODS:
            mem_influence = fit(spec, mem_model, mx, my)
            row["mislabel ap (memorizing)"] = average_precision(
                self_influences(mem_influence, mx, my), flipped_mask(memorizing)
            )
        rows.append(row)
        show(row)
    table = pd.DataFrame(rows)
    write(
        table,
        out,
        "methods",
        "Methods at their defaults (bundled digits, validation, float64, 1 thread; "
        "mislabel AP from self-influence on the memorizing workload, seed 0)",
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("what", choices=["flags", "mislabel", "lds", "lambda", "methods"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--subsets", type=int, default=100)
    parser.add_argument("--fraction", type=float, default=0.5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--lambdas", type=float, nargs="+", default=list(LAMBDAS))
    parser.add_argument("--no-ranks", dest="ranks", action="store_false", help="λ sweep only")
    parser.add_argument("--methods", nargs="*", default=None, help="methods comparison: only these")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    stamp = _dt.datetime.now(_dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    out = args.out or Path("bench_results") / f"quality-{stamp}"
    out.mkdir(parents=True, exist_ok=True)
    runs = {
        "flags": run_flags,
        "mislabel": run_mislabel,
        "lds": run_lds,
        "lambda": run_lambda,
        "methods": run_methods,
    }
    runs[args.what](args, out)


if __name__ == "__main__":
    main()
