"""Engine benchmark: speed, memory, accuracy and compute bound of every influence method of
``influence_pipeline.influence``, side by side with pyDVL 0.10.

Run from the repository root::

    .venv/bin/python benchmarks/engine_benchmark.py              # full run (~15-20 min, CPU)
    .venv/bin/python benchmarks/engine_benchmark.py --quick      # smoke check (~1-2 min)
    .venv/bin/python benchmarks/engine_benchmark.py --methods cg,ekfac --skip-pydvl --json out.json

Cases (float32, cross-entropy, tanh MLPs trained a little, fixed seeds):

* ``small``: scikit-learn digits, MLP 64→64→10 (P = 4,810), 1,497 training points in
  batches of 499 (the batch size divides n_train: pyDVL's chunk-averaged Hessian is off
  for an uneven last batch), 300 test points. DirectInfluence is the reference: every
  method's (n_test, n_train) score matrix is compared with Direct's (Pearson correlation
  and relative Frobenius error).
* ``large``: synthetic 10-class Gaussian mixture in 784 dimensions, MLP 784→128→128→10
  (P = 118,282; a dense Hessian would take 56 GB), 1,000 training points in batches of
  250, 50 test points. The methods that scale; no reference solution (ours is only
  compared with pyDVL).

Every (library, method) measurement runs in a fresh process (``engine_side.py`` with this
interpreter, ``pydvl_side.py`` with pyDVL's) that loads the same tensors and state dict,
builds the same model and calls the same constructor with the same arguments; the timing
code is shared (``bench_common.py``). Our side also replays the products the engine
performed with plain torch.func (``compute_bound.py``): ratio = engine time / bound.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from bench_common import build_model

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
if str(ROOT) not in sys.path:  # run from a checkout where the package is not installed
    sys.path.append(str(ROOT))
DEFAULT_PYDVL = Path("/work/pydvl-venv/bin/python")
METHODS = ["direct", "cg", "cg_block", "lissa", "arnoldi", "nystroem", "ekfac", "ihm"]
CASES = ["small", "large", "mlp", "mlp_wide", "cnn", "cnn_rgb"]
PYDVL_CASES = "mlp,mlp_wide,cnn,cnn_rgb"

#: What agreement to expect between pyDVL 0.10 and us, per method.
EXPECTATION = {
    "direct": "agree (float32 round-off)",
    "cg": "agree if converged (x0 differs)",
    "cg_block": "agree if converged",
    "lissa": "differ: random batches, truncated",
    "arnoldi": "agree if both converge",
    "nystroem": "agree (same torch seed)",
    "ekfac": "differ: pyDVL's output factor",
    "ihm": "differ: pyDVL batch weights",
}

#: Notes printed when pyDVL was run.
NOTES_PYDVL = [
    "pyDVL 0.10's CG tolerance is rtol² (per-RHS: times a column norm of the right-hand "
    "sides) and per-RHS CG starts at x0 = b: with the same arguments it runs to maxiter, "
    "so it does more products than ours (see HVP work).",
    "pyDVL's EK-FAC sums the per-class pseudo-losses before one backward pass (a rank-one "
    "output factor per sample); ours is the true Fisher with one backward pass per class, "
    "so the EK-FAC scores differ by design.",
    "LiSSA draws different random batches in the two libraries (same seed, different "
    "samplers): agreement is up to the method's approximation. The Nyström sketch happens "
    "to be the same Gaussian draw on both sides (torch seed 0 on the CPU).",
    "pyDVL 0.10's PointAveraging (inverse harmonic mean, Gauss-Newton) weights each "
    "batch's result by the number of right-hand sides instead of the batch size and the "
    "first batch by 1, so its IHM differs from the formula whenever the loader has more "
    "than one batch (checked against an explicit float64 computation while writing this "
    "benchmark); ours matches the formula.",
    "pyDVL/bound = pyDVL's total time / our compute bound: where both libraries do the same "
    "products (same HVP work), the largest speedup over pyDVL any implementation could show.",
]
#: Notes printed with or without pyDVL.
NOTES_ALWAYS = [
    "residual = median over the test points of ‖(A + λI) f − g‖ / ‖g‖ for our factors f of "
    "the test gradients g (A: the Hessian of the mean training loss); Direct solves exactly, "
    "the other methods approximate, EK-FAC and IHM use other curvatures (not shown).",
    "HVP work = Σ over curvature products of (batch size × vectors) / n_train, i.e. "
    "Hessian-vector products over the full data; pyDVL's Direct (torch.func.hessian) is "
    "not counted.",
]


@dataclass
class MethodSpec:
    """One method run: constructor class and arguments shared by both libraries."""

    name: str
    cls: str
    kwargs: dict[str, Any]
    ours_kwargs: dict[str, Any] = field(default_factory=dict)  # extra to pyDVL (seed)
    n_test: int | None = None  # a documented subset of the test points, on both sides
    seed: int = 0


@dataclass
class CaseConfig:
    name: str
    title: str
    data: str  # "digits" or "synthetic"
    layer_sizes: list[int]
    n_train: int
    n_test: int
    batch_size: int
    train_steps: int
    learning_rate: float
    regularization: float
    methods: list[MethodSpec]
    reference: str | None  # method whose scores are the reference ("direct") or None
    cnn: dict[str, Any] | None = None  # build_cnn arguments; None: an MLP of layer_sizes

    @property
    def model_config(self) -> dict[str, Any]:
        return {"layer_sizes": self.layer_sizes, "cnn": self.cnn}


def _methods(
    lam: float,
    *,
    cg_maxiter: int,
    cg_subset: int | None,
    lissa_maxiter: int,
    arnoldi_rank: int,
    nystroem_rank: int,
    with_direct: bool,
    with_ekfac: bool = True,
) -> list[MethodSpec]:
    """The method runs of a case (same constructor arguments for both libraries; pyDVL's
    defaults for LiSSA's scale, dampen and rtol, CG's rtol)."""
    cg = {"regularization": lam, "rtol": 1e-4, "maxiter": cg_maxiter}
    cg["warn_on_max_iteration"] = False
    lissa = {"regularization": lam, "maxiter": lissa_maxiter, "scale": 10.0, "rtol": 1e-4}
    lissa["warn_on_max_iteration"] = False
    seed = {"seed": 0}  # our extra constructor argument; pyDVL uses torch's global seed
    specs = [
        MethodSpec("direct", "DirectInfluence", {"regularization": lam}),
        MethodSpec("cg", "CgInfluence", cg, n_test=cg_subset),
        MethodSpec("cg_block", "CgInfluence", {**cg, "solve_simultaneously": True}),
        MethodSpec("lissa", "LissaInfluence", lissa, ours_kwargs=seed),
        MethodSpec(
            "arnoldi",
            "ArnoldiInfluence",
            {"regularization": lam, "rank": arnoldi_rank},
            ours_kwargs=seed,
        ),
        MethodSpec(
            "nystroem",
            "NystroemSketchInfluence",
            {"regularization": lam, "rank": nystroem_rank},
            ours_kwargs=seed,
        ),
        MethodSpec(
            "ekfac", "EkfacInfluence", {"update_diagonal": True, "hessian_regularization": lam}
        ),
        MethodSpec("ihm", "InverseHarmonicMeanInfluence", {"regularization": lam}),
    ]
    return [
        s
        for s in specs
        if (with_direct or s.name != "direct") and (with_ekfac or s.name != "ekfac")
    ]


def small_case(quick: bool) -> CaseConfig:
    """Digits, P = 4,810 (quick: P = 2,410); DirectInfluence is the reference."""
    lam = 0.01
    if quick:
        methods = _methods(
            lam, cg_maxiter=30, cg_subset=10, lissa_maxiter=20, arnoldi_rank=10,
            nystroem_rank=50, with_direct=True,
        )  # fmt: skip
        return CaseConfig(
            name="small", title="digits MLP 64-32-10 (quick)", data="digits",
            layer_sizes=[64, 32, 10], n_train=300, n_test=30, batch_size=100, train_steps=300,
            learning_rate=0.01, regularization=lam, methods=methods, reference="direct",
        )  # fmt: skip
    methods = _methods(
        lam, cg_maxiter=100, cg_subset=40, lissa_maxiter=100, arnoldi_rank=20,
        nystroem_rank=100, with_direct=True,
    )  # fmt: skip
    return CaseConfig(
        name="small", title="digits MLP 64-64-10", data="digits", layer_sizes=[64, 64, 10],
        n_train=1497, n_test=300, batch_size=499, train_steps=300, learning_rate=0.01,
        regularization=lam, methods=methods, reference="direct",
    )  # fmt: skip


def large_case(quick: bool) -> CaseConfig:
    """Synthetic data, P = 118,282 (quick: P = 26,506); no reference."""
    lam = 0.01
    if quick:
        methods = _methods(
            lam, cg_maxiter=5, cg_subset=None, lissa_maxiter=10, arnoldi_rank=5,
            nystroem_rank=20, with_direct=False,
        )  # fmt: skip
        return CaseConfig(
            name="large", title="synthetic MLP 784-32-32-10 (quick)", data="synthetic",
            layer_sizes=[784, 32, 32, 10], n_train=200, n_test=10, batch_size=100,
            train_steps=20, learning_rate=1e-3, regularization=lam, methods=methods,
            reference=None,
        )  # fmt: skip
    methods = _methods(
        lam, cg_maxiter=10, cg_subset=20, lissa_maxiter=30, arnoldi_rank=10, nystroem_rank=50,
        with_direct=False,
    )  # fmt: skip
    return CaseConfig(
        name="large", title="synthetic MLP 784-128-128-10", data="synthetic",
        layer_sizes=[784, 128, 128, 10], n_train=1000, n_test=50, batch_size=250,
        train_steps=20, learning_rate=1e-3, regularization=lam, methods=methods, reference=None,
    )  # fmt: skip


def pydvl_default_cases(quick: bool) -> list[CaseConfig]:
    """Workloads of the kind pyDVL users run, with pyDVL's defaults (LiSSA maxiter 1,000,
    scale 10, rtol 1e-4; Arnoldi rank 10) where a case does not set them: two MLPs of a
    few thousand parameters and two CNNs of ten to twenty thousand, ~1,400 training and
    100 test points, batches of 100. CG stops at 100 iterations (MLPs) or 10 (CNNs) and
    the CNN cases cap LiSSA at 100 iterations (1,000 take several minutes per library on
    one core); per-RHS CG is timed on 10 test points."""
    lam = 0.01
    n_train, n_test, batch = (300, 20, 100) if quick else (1400, 100, 100)
    lissa_mlp, lissa_cnn = (50, 10) if quick else (1000, 100)
    cg_mlp, cg_cnn = (20, 3) if quick else (100, 10)

    def specs(lissa: int, cg: int, direct: bool, ekfac: bool, rank: int) -> list[MethodSpec]:
        return _methods(
            lam, cg_maxiter=cg, cg_subset=10, lissa_maxiter=lissa, arnoldi_rank=10,
            nystroem_rank=rank, with_direct=direct, with_ekfac=ekfac,
        )  # fmt: skip

    common: dict[str, Any] = {
        "n_train": n_train, "n_test": n_test, "batch_size": batch, "regularization": lam,
    }  # fmt: skip
    return [
        CaseConfig(
            name="mlp", title="digits MLP 64-32-32-10", data="digits",
            layer_sizes=[64, 32, 32, 10], train_steps=300, learning_rate=0.01,
            methods=specs(lissa_mlp, cg_mlp, True, True, 50), reference="direct", **common,
        ),
        CaseConfig(
            name="mlp_wide", title="synthetic MLP 32-128-10", data="synthetic",
            layer_sizes=[32, 128, 10], train_steps=200, learning_rate=0.01,
            methods=specs(lissa_mlp, cg_mlp, True, True, 50), reference="direct", **common,
        ),
        CaseConfig(
            name="cnn", title="digits CNN conv8-conv16-pool-64-10", data="digits_image",
            layer_sizes=[64, 10], train_steps=100, learning_rate=0.01,
            methods=specs(lissa_cnn, cg_cnn, False, False, 20), reference=None,
            cnn={"in_shape": [1, 8, 8], "channels": [8, 16], "hidden": 64, "classes": 10},
            **common,
        ),
        CaseConfig(
            name="cnn_rgb", title="synthetic 3x12x12 CNN conv8-pool-32-10",
            data="synthetic_image", layer_sizes=[432, 10], train_steps=100,
            learning_rate=0.01, methods=specs(lissa_cnn, cg_cnn, False, False, 20), reference=None,
            cnn={"in_shape": [3, 12, 12], "channels": [8], "hidden": 32, "classes": 10},
            **common,
        ),
    ]  # fmt: skip


# ---------------------------------------------------------------------- data and model
def _digits(cfg: CaseConfig) -> tuple[torch.Tensor, ...]:
    from influence_pipeline.examples.digits import load_digits_data

    data = load_digits_data(seed=0, n_test=150)  # 1,497 train; validation + holdout = 300
    x_test = torch.cat([torch.from_numpy(v[0]) for v in data.test_sets.values()])
    y_test = torch.cat([torch.from_numpy(v[1]) for v in data.test_sets.values()])
    x, y = torch.from_numpy(data.x_train), torch.from_numpy(data.y_train)
    return x[: cfg.n_train], y[: cfg.n_train], x_test[: cfg.n_test], y_test[: cfg.n_test]


def _synthetic(cfg: CaseConfig) -> tuple[torch.Tensor, ...]:
    """A 10-class Gaussian mixture with 10% label noise (so the loss stays sensible)."""
    g = torch.Generator().manual_seed(0)
    n, d = cfg.n_train + cfg.n_test, cfg.layer_sizes[0]
    means = torch.randn(10, d, generator=g) * 0.15
    y = torch.randint(0, 10, (n,), generator=g)
    x = means[y] + torch.randn(n, d, generator=g)
    noisy = torch.rand(n, generator=g) < 0.1
    y = torch.where(noisy, torch.randint(0, 10, (n,), generator=g), y)
    return x[: cfg.n_train], y[: cfg.n_train], x[cfg.n_train :], y[cfg.n_train :]


def prepare_case(cfg: CaseConfig, directory: Path) -> dict[str, float]:
    """Write data.pt, model.pt (trained full-batch with Adam) and case.json."""
    x, y, x_test, y_test = _digits(cfg) if cfg.data.startswith("digits") else _synthetic(cfg)
    if cfg.cnn:  # images: (N, C, H, W)
        shape = cfg.cnn["in_shape"]
        x, x_test = x.reshape(-1, *shape), x_test.reshape(-1, *shape)
    if cfg.reference == "direct" and cfg.n_train % cfg.batch_size:
        raise ValueError("The batch size must divide n_train (pyDVL's chunk averaging).")
    torch.manual_seed(0)
    model = build_model(cfg.model_config)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.learning_rate, weight_decay=1e-3)
    for _ in range(cfg.train_steps):
        optimizer.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        stats = {
            "train_loss": float(F.cross_entropy(model(x), y)),
            "test_accuracy": float((model(x_test).argmax(1) == y_test).float().mean()),
        }
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {"x_train": x, "y_train": y, "x_test": x_test, "y_test": y_test}
    torch.save({k: v.contiguous() for k, v in tensors.items()}, directory / "data.pt")
    torch.save(model.state_dict(), directory / "model.pt")
    case_json = {**cfg.model_config, "batch_size": cfg.batch_size}
    (directory / "case.json").write_text(json.dumps(case_json))
    return stats


# ---------------------------------------------------------------------- workers
def run_worker(
    library: str, python: str, case_dir: Path, spec: MethodSpec, args: argparse.Namespace
) -> tuple[dict[str, Any], torch.Tensor | None]:
    """Run one (library, method) measurement in a fresh process; returns its result."""
    run_dir = case_dir / f"{library}-{spec.name}"
    run_dir.mkdir(exist_ok=True)
    (run_dir / "method.json").write_text(json.dumps(asdict(spec)))
    script = HERE / ("engine_side.py" if library == "ours" else "pydvl_side.py")
    command = [python, str(script), "--case-dir", str(case_dir), "--run-dir", str(run_dir)]
    command += ["--device", args.device, "--threads", str(args.threads)]
    env = dict(os.environ)
    if library == "ours":  # the project importable even where it is not installed
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    else:  # the pyDVL interpreter must not see the project
        env.pop("PYTHONPATH", None)
    start = time.perf_counter()
    try:
        proc = subprocess.run(
            command, capture_output=True, text=True, timeout=args.timeout, env=env, check=False
        )
    except subprocess.TimeoutExpired:
        return {"error": f"timeout after {args.timeout} s"}, None
    wall = time.perf_counter() - start
    result_file = run_dir / "result.json"
    if not result_file.exists():
        tail = (proc.stderr or proc.stdout)[-2000:]
        return {"error": f"worker exited with {proc.returncode}: {tail}"}, None
    result = json.loads(result_file.read_text())
    result["process_wall_s"] = wall
    scores_file = run_dir / "scores.pt"
    scores = torch.load(scores_file, weights_only=True) if scores_file.exists() else None
    return result, scores


def agreement(scores: torch.Tensor, reference: torch.Tensor) -> dict[str, float]:
    """Pearson correlation and relative Frobenius error of two score matrices."""
    a = scores.double().flatten()
    b = reference[: scores.shape[0]].double().flatten()
    corr = torch.corrcoef(torch.stack([a, b]))[0, 1]
    return {
        "pearson": float(corr),
        "rel_frobenius": float(torch.linalg.norm(a - b) / torch.linalg.norm(b)),
    }


# ---------------------------------------------------------------------- printing
def _s(value: float | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.3f}" if value < 1 else f"{value:.2f}" if value < 100 else f"{value:.0f}"


def _g(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}g}"


def _c(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def table(title: str, headers: list[str], rows: list[list[str]]) -> str:
    widths = [
        max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)
    ]
    line = "  ".join("-" * w for w in widths)
    out = [title, line, "  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)), line]
    out += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    out.append(line)
    return "\n".join(out)


def _total(result: dict[str, Any]) -> float | None:
    times = result.get("times")
    return sum(times.values()) if times else None


def _hvp_work(result: dict[str, Any], n_train: int) -> str:
    sample_vectors = result.get("products", {}).get("sample_vectors", {})
    if not sample_vectors:
        return "-"
    return f"{sum(sample_vectors.values()) / n_train:.0f}"


def _solver_info(result: dict[str, Any]) -> str:
    parts = []
    if result.get("iterations"):
        parts.append("iters " + ",".join(str(v) for v in result["iterations"].values()))
    apps = result.get("products", {}).get("applications", {})
    ihm_apps = {k: v for k, v in apps.items() if k.endswith(":ihm")}
    if ihm_apps:
        parts.append("ihm apps " + ",".join(str(v) for v in ihm_apps.values()))
    return " ".join(parts) or "-"


def _ours_table(cfg: CaseConfig, report: dict[str, Any]) -> tuple[str, list[str]]:
    headers = ["method", "test", "fit", "factors", "score", "total", "peak_MB"]
    if cfg.reference:
        headers += ["corr_vs_direct", "relerr_vs_direct"]
    headers += ["HVP_work", "solver", "residual"]
    rows, errors = [], []
    for name, r in report["runs"].get("ours", {}).items():
        if r.get("error"):
            errors.append(f"ERROR ours {name}: {r['error']}")
            continue
        t, agr = r["times"], report["agreement"].get(name, {})
        row = [name, str(r["n_test"]), _s(t["fit"]), _s(t["factors"]), _s(t["score"])]
        row += [_s(_total(r)), _s(r["memory_mb"])]
        if cfg.reference:
            row += [_c(agr.get("pearson")), _g(agr.get("rel_frobenius"))]
        res = r.get("relative_residual", {}).get("median")
        rows.append([*row, _hvp_work(r, cfg.n_train), _solver_info(r), _g(res, 2)])
    title = "Ours (influence_pipeline.influence): seconds, peak memory in MB"
    return table(title, headers, rows), errors


def _bound_table(report: dict[str, Any]) -> tuple[str, list[str]]:
    headers = "method engine_total bound_fit bound_factors bound_score bound_total ratio"
    rows, errors = [], []
    for name, r in report["runs"].get("ours", {}).items():
        if r.get("bound_error"):
            errors.append(f"ERROR bound {name}: {r['bound_error']}")
        if r.get("error") or "bound" not in r:
            continue
        b = r["bound"]
        total, bound_total = _total(r) or 0.0, sum(b.values())
        ratio = f"{total / bound_total:.2f}" if bound_total > 0 else "-"
        rows.append([name, _s(total), _s(b["fit"]), _s(b["factors"]), _s(b["score"])])
        rows[-1] += [_s(bound_total), ratio, _g(r.get("bound_hvp_check"), 2)]
    title = "Compute bound: the same products replayed with plain torch.func (target ratio <= 1.3)"
    return table(title, [*headers.split(), "HVP_check"], rows), errors


def _pydvl_table(cfg: CaseConfig, report: dict[str, Any]) -> tuple[str, list[str]]:
    headers = "method test fit factors score total peak_MB HVP_work speedup pyDVL/bound"
    headers += " relerr_vs_ours"
    headers += " corr_vs_direct" if cfg.reference else ""
    rows, errors = [], []
    for name, r in report["runs"].get("pydvl", {}).items():
        if r.get("error"):
            errors.append(f"ERROR pyDVL {name}: {r['error']}")
            continue
        t, sp = r["times"], report["speedup"].get(name)
        row = [name, str(r["n_test"]), _s(t["fit"]), _s(t["factors"]), _s(t["score"])]
        row += [_s(_total(r)), _s(r["memory_mb"]), _hvp_work(r, cfg.n_train)]
        row += [f"{sp:.2f}x" if sp else "-"]
        bound = report["runs"].get("ours", {}).get(name, {}).get("bound")
        row += [f"{(_total(r) or 0.0) / sum(bound.values()):.2f}" if bound else "-"]
        row += [_g(report["pydvl_vs_ours"].get(name, {}).get("rel_frobenius"))]
        if cfg.reference:
            row += [_c(report["pydvl_agreement"].get(name, {}).get("pearson"))]
        rows.append([*row, EXPECTATION[name]])
    title = "pyDVL 0.10, same arguments, weights and data; speedup = pyDVL total / ours total"
    return table(title, [*headers.split(), "expected"], rows), errors


def print_case(cfg: CaseConfig, report: dict[str, Any], device: str) -> None:
    """Print the three tables of a case and the speedup summary."""
    print()
    print(
        f"=== {cfg.name}: {cfg.title}, P = {report['n_parameters']:,}, {cfg.n_train} train / "
        f"{cfg.n_test} test, batch {cfg.batch_size}, float32, lambda = {cfg.regularization}, "
        f"{device} ==="
    )
    model = report["model"]
    print(
        f"model after {cfg.train_steps} Adam steps: train loss {model['train_loss']:.3f}, "
        f"test accuracy {model['test_accuracy']:.3f}"
    )
    tables = [_ours_table(cfg, report), _bound_table(report)]
    if report["runs"].get("pydvl"):
        tables.append(_pydvl_table(cfg, report))
    for text, errors in tables:
        print(text)
        for line in errors:
            print(line[:400])
    for spec in cfg.methods:
        if spec.n_test is None or spec.name not in report["runs"].get("ours", {}):
            continue
        line = (
            f"note: {spec.name} is timed on the first {spec.n_test} of {cfg.n_test} test points "
            "on both sides (pyDVL's per-RHS CG solves one right-hand side at a time"
        )
        theirs = report["runs"].get("pydvl", {}).get(spec.name, {})
        if theirs.get("times"):
            estimate = theirs["times"]["factors"] * cfg.n_test / spec.n_test
            line += f"; all {cfg.n_test} would take pyDVL about {estimate:.0f} s"
        print(line + ")")
    if not cfg.reference:
        gigabytes = 4 * report["n_parameters"] ** 2 / 1e9
        print(
            f"note: no reference solution: a dense float32 Hessian would take {gigabytes:.0f} GB "
            "and a long-run CG does not fit the time budget; ours is compared with pyDVL only."
        )
    speedups = {k: v for k, v in report["speedup"].items() if v}
    if speedups:
        values = list(speedups.values())
        worst = min(speedups, key=lambda k: speedups[k])
        geo = math.exp(sum(math.log(v) for v in values) / len(values))
        print(
            f"speedup over {len(values)} methods: mean {sum(values) / len(values):.2f}x, "
            f"geometric mean {geo:.2f}x, min {speedups[worst]:.2f}x ({worst}) "
            "[target: mean >= 3x, none below 1x]"
        )


def summary_table(cases: dict[str, dict[str, Any]]) -> str:
    """One row per (case, method): pyDVL time / ours and ours / compute bound, with the
    geometric mean and the minimum of the speedups over every row."""
    rows, speedups = [], []
    for case, report in cases.items():
        for name, r in report["runs"].get("ours", {}).items():
            if r.get("error"):
                continue
            total = _total(r) or 0.0
            bound = sum(r["bound"].values()) if r.get("bound") else None
            speedup = report["speedup"].get(name)
            if speedup:
                speedups.append(speedup)
            rows.append(
                [
                    case,
                    name,
                    _s(total),
                    f"{speedup:.2f}x" if speedup else "-",
                    f"{total / bound:.2f}" if bound else "-",
                ]
            )
    text = table(
        "Summary: speedup = pyDVL time / ours; bound ratio = ours / compute bound",
        ["case", "method", "ours_s", "speedup", "bound_ratio"],
        rows,
    )
    if speedups:
        geo = math.exp(sum(math.log(v) for v in speedups) / len(speedups))
        text += (
            f"\nover {len(speedups)} (case, method) pairs: geometric mean {geo:.2f}x, "
            f"min {min(speedups):.2f}x [target: geometric mean >= 3x, none below 1x]"
        )
    return text


# ---------------------------------------------------------------------- main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small smoke configuration")
    parser.add_argument(
        "--methods",
        default=",".join(METHODS),
        help=f"comma-separated subset of {','.join(METHODS)}",
    )
    parser.add_argument("--skip-pydvl", action="store_true", help="do not run pyDVL")
    parser.add_argument(
        "--pydvl-python",
        default=None,
        help=f"pyDVL interpreter (default {DEFAULT_PYDVL} if it exists)",
    )
    parser.add_argument(
        "--large",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="run the large case (default: on, off with --quick)",
    )
    parser.add_argument(
        "--cases",
        default="small,large",
        help=f"comma-separated cases among {','.join(CASES)} (default: small,large; "
        "'pydvl-defaults' selects mlp,mlp_wide,cnn,cnn_rgb)",
    )
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    parser.add_argument(
        "--threads", type=int, default=0, help="torch threads in every worker (0: torch's default)"
    )
    parser.add_argument(
        "--timeout",
        type=int,
        default=None,
        help="seconds per worker process (default 1800, 300 with --quick)",
    )
    parser.add_argument("--json", type=Path, default=None, help="write raw numbers here")
    args = parser.parse_args(argv)
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    args.timeout = args.timeout or (300 if args.quick else 1800)
    selected = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(selected) - set(METHODS))
    if unknown:
        parser.error(f"unknown methods {unknown}; choose from {METHODS}")
    args.methods = selected
    cases = [c.strip() for c in args.cases.replace("pydvl-defaults", PYDVL_CASES).split(",")]
    unknown = sorted(set(cases) - set(CASES))
    if unknown:
        parser.error(f"unknown cases {unknown}; choose from {CASES}")
    if args.large is False:
        cases = [c for c in cases if c != "large"]
    elif args.large and "large" not in cases:
        cases.append("large")
    elif args.quick and args.large is None and args.cases == "small,large":
        cases = ["small"]
    args.cases = [c for c in CASES if c in cases]
    return args


def resolve_pydvl(args: argparse.Namespace) -> str | None:
    if args.skip_pydvl:
        return None
    path = Path(args.pydvl_python) if args.pydvl_python else DEFAULT_PYDVL
    if not path.exists():
        print(f"note: pyDVL interpreter {path} not found; skipping the pyDVL comparison")
        return None
    return str(path)


def run_case(
    cfg: CaseConfig, root: Path, args: argparse.Namespace, pydvl: str | None
) -> dict[str, Any]:
    case_dir = root / cfg.name
    stats = prepare_case(cfg, case_dir)
    n_params = sum(p.numel() for p in build_model(cfg.model_config).parameters())
    report: dict[str, Any] = {
        "config": asdict(cfg),
        "n_parameters": n_params,
        "model": stats,
        "runs": {},
        "agreement": {},
        "pydvl_vs_ours": {},
        "pydvl_agreement": {},
        "speedup": {},
    }
    specs = [s for s in cfg.methods if s.name in args.methods]
    scores: dict[str, dict[str, torch.Tensor]] = {"ours": {}, "pydvl": {}}
    libraries = [("ours", sys.executable)] + ([("pydvl", pydvl)] if pydvl else [])
    for spec in specs:
        for library, python in libraries:
            print(f"[{cfg.name}] {library:5s} {spec.name:9s} ...", end=" ", flush=True)
            result, s = run_worker(library, python, case_dir, spec, args)
            report["runs"].setdefault(library, {})[spec.name] = result
            status = result.get("error") or f"{_total(result):.2f} s"
            print(f"{status[:200]} (process {result.get('process_wall_s', 0):.1f} s)")
            if s is not None:
                scores[library][spec.name] = s
    ref = scores["ours"].get(cfg.reference) if cfg.reference else None
    for name, s in scores["ours"].items():
        if ref is not None:
            report["agreement"][name] = agreement(s, ref)
    for name, s in scores["pydvl"].items():
        if name in scores["ours"] and scores["ours"][name].shape == s.shape:
            report["pydvl_vs_ours"][name] = agreement(s, scores["ours"][name])
        if ref is not None:
            report["pydvl_agreement"][name] = agreement(s, ref)
        ours_total = _total(report["runs"]["ours"].get(name, {}))
        theirs_total = _total(report["runs"]["pydvl"][name])
        if ours_total and theirs_total:
            report["speedup"][name] = theirs_total / ours_total
    print_case(cfg, report, args.device)
    return report


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    pydvl = resolve_pydvl(args)
    every = [small_case(args.quick), large_case(args.quick), *pydvl_default_cases(args.quick)]
    cases = [c for c in every if c.name in args.cases]
    started = time.perf_counter()
    output: dict[str, Any] = {
        "arguments": {k: str(v) for k, v in vars(args).items()},
        "environment": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "cpu_count": os.cpu_count(),
            "platform": platform.platform(),
            "cuda": torch.cuda.get_device_name(0) if args.device.startswith("cuda") else None,
        },
        "cases": {},
    }
    threads = args.threads or torch.get_num_threads()
    print(
        f"engine benchmark: device {args.device}, {threads} torch thread(s) per worker, "
        f"pyDVL: {pydvl or 'skipped'}"
    )
    with tempfile.TemporaryDirectory(prefix="engine-bench-") as tmp:
        for cfg in cases:
            output["cases"][cfg.name] = run_case(cfg, Path(tmp), args, pydvl)
    print()
    print(summary_table(output["cases"]))
    print()
    for note in (NOTES_PYDVL if pydvl else []) + NOTES_ALWAYS:
        print(f"note: {note}")
    elapsed = time.perf_counter() - started
    output["elapsed_s"] = elapsed
    print(f"total benchmark time {elapsed:.0f} s")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(output, indent=1))
        print(f"raw numbers written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
