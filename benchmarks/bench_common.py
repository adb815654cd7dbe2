"""Code shared by the two benchmark workers (``engine_side.py`` and ``pydvl_side.py``).

This module imports torch only, so it runs unchanged under the project's interpreter and
under the separate pyDVL interpreter. It defines what both sides measure, identically:

* the model (:func:`build_model`: an MLP of Linear/Tanh layers or a small CNN of
  Conv2d/ReLU/MaxPool layers with a Linear head, built the same way on both sides and
  loaded from the same state dict) and the data (tensors saved by the orchestrator);
* one measurement (:func:`measure`): construct the influence method with the given
  constructor arguments, then time ``fit(loader)``, ``influence_factors(x_test, y_test)``
  and ``influences_from_factors`` against every training point (in chunks of the loader's
  batch size), each phase synchronised on CUDA;
* peak memory of the measurement: peak RSS minus the RSS after imports, data load and
  warm-up (the high-water mark is reset there; on Linux the peak is read from VmHWM, see
  :func:`_peak_rss`); on CUDA, ``torch.cuda.max_memory_allocated`` minus the memory
  allocated at that point.

The orchestrator writes ``case.json`` (architecture, batch size, device settings),
``data.pt`` (tensors) and ``model.pt`` (state dict) into a case directory and a
``method.json`` (constructor arguments) per run; a worker writes ``result.json`` and
``scores.pt`` into its run directory.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import resource
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.func import functional_call, grad, jvp, vjp, vmap
from torch.utils.data import DataLoader, TensorDataset

#: Constructor arguments of the methods that take a loss function (all but EK-FAC).
LOSS_METHODS = {
    "DirectInfluence",
    "CgInfluence",
    "LissaInfluence",
    "ArnoldiInfluence",
    "NystroemSketchInfluence",
    "InverseHarmonicMeanInfluence",
}


def build_mlp(layer_sizes: list[int]) -> torch.nn.Sequential:
    """Linear layers of the given widths with tanh between them (logits out)."""
    modules: list[torch.nn.Module] = []
    for i, (fan_in, fan_out) in enumerate(itertools.pairwise(layer_sizes)):
        modules.append(torch.nn.Linear(fan_in, fan_out))
        if i < len(layer_sizes) - 2:
            modules.append(torch.nn.Tanh())
    return torch.nn.Sequential(*modules)


def build_cnn(
    in_shape: list[int], channels: list[int], hidden: int, classes: int
) -> torch.nn.Sequential:
    """3x3 same-padding convolutions (ReLU) of the given widths, a 2x2 max-pool after the
    last, then Linear(hidden) + ReLU + Linear(classes): the classifier CNN of the cases."""
    c, h, w = in_shape
    modules: list[torch.nn.Module] = []
    for width in channels:
        modules += [torch.nn.Conv2d(c, width, 3, padding=1), torch.nn.ReLU()]
        c = width
    modules += [torch.nn.MaxPool2d(2), torch.nn.Flatten()]
    modules += [torch.nn.Linear(c * (h // 2) * (w // 2), hidden), torch.nn.ReLU()]
    modules.append(torch.nn.Linear(hidden, classes))
    return torch.nn.Sequential(*modules)


def build_model(config: dict[str, Any]) -> torch.nn.Sequential:
    """The case's model: ``config["cnn"]`` (keyword arguments of :func:`build_cnn`) or an
    MLP of ``config["layer_sizes"]``."""
    if config.get("cnn"):
        return build_cnn(**config["cnn"])
    return build_mlp(config["layer_sizes"])


@dataclass
class Case:
    """A loaded benchmark case: model on the device, data on the CPU (both libraries move
    each batch to the model's device), test tensors on the device."""

    config: dict[str, Any]
    model: torch.nn.Sequential
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    loader: DataLoader
    device: torch.device

    @property
    def n_parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    def synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def load_case(case_dir: Path, device: str) -> Case:
    """Read the case written by the orchestrator (tensors loaded with weights_only=True)."""
    config = json.loads((case_dir / "case.json").read_text())
    data = torch.load(case_dir / "data.pt", weights_only=True)
    model = build_model(config)
    model.load_state_dict(torch.load(case_dir / "model.pt", weights_only=True))
    dev = torch.device(device)
    model = model.to(dev).eval()
    loader = DataLoader(
        TensorDataset(data["x_train"], data["y_train"]),
        batch_size=config["batch_size"],
        shuffle=False,
    )
    return Case(
        config=config,
        model=model,
        x_train=data["x_train"],
        y_train=data["y_train"],
        x_test=data["x_test"].to(dev),
        y_test=data["y_test"].to(dev),
        loader=loader,
        device=dev,
    )


def warm_up(case: Case) -> None:
    """Exercise torch.func once (per-sample gradients, reverse-over-reverse and
    forward-over-reverse Hessian-vector products on two samples) so that one-time
    initialisation (e.g. ~0.15 s for forward-mode AD) is not charged to a measured phase.
    Identical on both sides; it touches no influence library."""
    params = {k: v.detach() for k, v in case.model.named_parameters()}
    x, y = case.x_train[:2].to(case.device), case.y_train[:2].to(case.device)

    def sample_loss(p: dict[str, torch.Tensor], xi: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(functional_call(case.model, p, (xi[None],)), yi[None])

    vmap(grad(sample_loss), in_dims=(None, 0, 0))(params, x, y)

    def batch_loss(p: dict[str, torch.Tensor]) -> torch.Tensor:
        return F.cross_entropy(functional_call(case.model, p, (x,)), y)

    ones = {k: torch.ones_like(v) for k, v in params.items()}
    vjp_fn = vjp(grad(batch_loss), params)[1]
    vjp_fn(ones)
    jvp(grad(batch_loss), (params,), (ones,))  # forward-mode AD initialises on first use
    case.synchronize()


def _status_kb(field: str) -> float | None:
    """A ``kB`` field of /proc/self/status (Linux), in bytes; None elsewhere."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return float(line.split()[1]) * 1024.0
    except (OSError, ValueError, IndexError):
        pass
    return None


def _peak_rss() -> float:
    """Peak RSS of this process in bytes.

    On Linux this is ``VmHWM``, the high-water mark of this process's memory map. It is what
    ``ru_maxrss`` reports, except that ``ru_maxrss`` is also at least the RSS the process
    had before ``exec`` (a copy of the parent's RSS at fork): a worker started from a
    Python parent holding torch would otherwise report the parent's few hundred MB."""
    hwm = _status_kb("VmHWM")
    if hwm is not None:
        return hwm
    return float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024.0


def _reset_peak_rss() -> bool:
    """Reset the RSS high-water mark to the current RSS (Linux ≥ 4.0:
    ``echo 5 > /proc/self/clear_refs``), so that a transient peak during imports or data
    loading is not mistaken for the measurement's peak."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


class MemoryMeter:
    """Peak memory of the measured phases relative to a baseline taken at construction."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            self.kind = "cuda max_memory_allocated"
            self.baseline = float(torch.cuda.memory_allocated(device))
        else:
            gc.collect()
            reset = _reset_peak_rss()
            self.kind = "peak RSS (VmHWM) - RSS at baseline" if reset else "ru_maxrss - baseline"
            self.baseline = _peak_rss()

    def peak_mb(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            peak = float(torch.cuda.max_memory_allocated(self.device))
        else:
            peak = _peak_rss()
        return max(0.0, peak - self.baseline) / 2**20


def seed_everything(seed: int) -> None:
    """Seed torch (CPU and CUDA) and numpy, if numpy is importable."""
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed)
    except ImportError:  # pragma: no cover - both interpreters have numpy
        pass


def constructor_kwargs(spec: dict[str, Any], case: Case, extra: dict[str, Any]) -> dict[str, Any]:
    """The keyword arguments of the method's constructor: the spec's shared arguments, the
    cross-entropy loss for methods that take one, and library-specific ``extra``."""
    kwargs: dict[str, Any] = dict(spec["kwargs"])
    if spec["cls"] in LOSS_METHODS:
        kwargs["loss"] = F.cross_entropy
    kwargs.update(extra)
    return kwargs


def measure(
    case: Case,
    spec: dict[str, Any],
    build: Callable[[torch.nn.Module], Any],
    on_phase: Callable[[str], None] = lambda phase: None,
) -> tuple[dict[str, Any], torch.Tensor]:
    """Time fit, factors and scoring of one method; returns (result fields, scores).

    ``build(model)`` constructs the influence object; ``on_phase`` is told the name of the
    phase about to run ("fit", "factors", "score") so a caller can attribute the products
    it logs. The score matrix has shape (n_test used, n_train).
    """
    n_test = int(spec.get("n_test") or case.x_test.shape[0])
    x_test, y_test = case.x_test[:n_test], case.y_test[:n_test]
    chunk = int(case.config["batch_size"])
    meter = MemoryMeter(case.device)
    seed_everything(int(spec.get("seed", 0)))
    influence = build(case.model)
    times: dict[str, float] = {}

    on_phase("fit")
    case.synchronize()
    start = time.perf_counter()
    influence.fit(case.loader)
    case.synchronize()
    times["fit"] = time.perf_counter() - start

    on_phase("factors")
    start = time.perf_counter()
    factors = influence.influence_factors(x_test, y_test)
    case.synchronize()
    times["factors"] = time.perf_counter() - start

    on_phase("score")
    start = time.perf_counter()
    parts = []
    for lo in range(0, case.x_train.shape[0], chunk):
        x = case.x_train[lo : lo + chunk].to(case.device)
        y = case.y_train[lo : lo + chunk].to(case.device)
        parts.append(influence.influences_from_factors(factors, x, y))
    scores = torch.cat(parts, dim=1)
    case.synchronize()
    times["score"] = time.perf_counter() - start
    on_phase("done")

    result = {
        "n_test": n_test,
        "times": times,
        "memory_mb": meter.peak_mb(),
        "memory_kind": meter.kind,
        "influence": influence,
        "factors": factors,
    }
    return result, scores.detach().to("cpu", torch.float32)


def worker_arguments(description: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--case-dir", type=Path, required=True)
    parser.add_argument("--run-dir", type=Path, required=True)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    return parser.parse_args()


def run_worker(
    description: str,
    library: str,
    work: Callable[[Case, dict[str, Any]], tuple[dict[str, Any], torch.Tensor]],
) -> None:
    """Worker entry point: load the case, warm up, run ``work`` and write its result (or
    the error) to ``run_dir/result.json`` and the scores to ``run_dir/scores.pt``."""
    args = worker_arguments(description)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    spec = json.loads((args.run_dir / "method.json").read_text())
    out: dict[str, Any] = {"library": library, "method": spec["name"], "error": None}
    try:
        case = load_case(args.case_dir, args.device)
        warm_up(case)
        result, scores = work(case, spec)
        result.pop("influence", None)
        result.pop("factors", None)
        out.update(result)
        torch.save(scores, args.run_dir / "scores.pt")
    except Exception as exc:  # report, do not crash the whole benchmark
        out["error"] = f"{type(exc).__name__}: {exc}"
        out["traceback"] = traceback.format_exc()
    out["torch_version"] = torch.__version__
    out["threads"] = torch.get_num_threads()
    (args.run_dir / "result.json").write_text(json.dumps(out, indent=1))
    sys.exit(0 if out["error"] is None else 1)
