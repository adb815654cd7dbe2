"""Results follow the model's dtype and device; CUDA is used whenever the model is there.

The GPU tests run the same code path as the CPU tests below them and compare the two;
they are skipped only where torch sees no CUDA device.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from influence_pipeline.influence import (
    ArnoldiInfluence,
    CgInfluence,
    DirectInfluence,
    EkfacInfluence,
    InfluenceMode,
    InverseHarmonicMeanInfluence,
    LissaInfluence,
    NystroemSketchInfluence,
)

from .closed_forms import rel_error

CUDA = torch.cuda.is_available()


def classification_problem(dtype, device="cpu"):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(48, 6, generator=gen)
    y = torch.randint(0, 3, (48,), generator=gen)
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    return net.to(device=device, dtype=dtype), x, y


def build(name, net):
    """λ = 0.5 makes the (indefinite) Hessian of this untrained network positive definite."""
    loss = torch.nn.functional.cross_entropy
    rtol = 1e-10 if next(net.parameters()).dtype == torch.float64 else 1e-5
    return {
        "direct": lambda: DirectInfluence(net, loss, 0.5),
        "cg": lambda: CgInfluence(net, loss, 0.5, rtol=rtol, atol=1e-12),
        "block_cg": lambda: CgInfluence(
            net, loss, 0.5, rtol=rtol, atol=1e-12, solve_simultaneously=True
        ),
        "lissa": lambda: LissaInfluence(
            net, loss, 0.5, scale=20.0, maxiter=50, seed=0, warn_on_max_iteration=False
        ),
        "arnoldi": lambda: ArnoldiInfluence(net, loss, 0.5, rank=6, seed=0),
        "nystroem": lambda: NystroemSketchInfluence(net, loss, 0.5, rank=6, seed=0),
        "ihm": lambda: InverseHarmonicMeanInfluence(net, loss, 0.5),
        "ekfac": lambda: EkfacInfluence(net, update_diagonal=True, hessian_regularization=0.5),
    }[name]()


METHODS = ["direct", "cg", "block_cg", "lissa", "arnoldi", "nystroem", "ihm", "ekfac"]


@pytest.mark.parametrize("name", METHODS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_results_keep_the_model_dtype(name, dtype):
    net, x, y = classification_problem(dtype)
    # float64 inputs for a float32 model (and the reverse) are cast to the model's dtype
    other = torch.float64 if dtype == torch.float32 else torch.float32
    loader = DataLoader(TensorDataset(x.to(other), y), batch_size=16)
    model = build(name, net).fit(loader)
    factors = model.influence_factors(x[:4].to(other), y[:4])
    scores = model.influences_from_factors(factors, x, y)
    pert = model.influences(x[:2], y[:2], x[:3], y[:3], mode=InfluenceMode.Perturbation)
    for t in (factors, scores, pert):
        assert t.dtype == dtype
        assert bool(torch.isfinite(t).all())
    assert scores.shape == (4, 48) and pert.shape == (2, 3, 6)


def run_on(device, name):
    net, x, y = classification_problem(torch.float64, device)
    loader = DataLoader(TensorDataset(x, y), batch_size=16)
    model = build(name, net).fit(loader)
    factors = model.influence_factors(x[:5], y[:5])
    scores = model.influences_from_factors(factors, x, y)
    return factors, scores


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("name", METHODS)
def test_cuda_matches_cpu(name):
    cpu_factors, cpu_scores = run_on("cpu", name)
    gpu_factors, gpu_scores = run_on("cuda", name)
    assert gpu_factors.device.type == "cuda" and gpu_scores.device.type == "cuda"
    # Random sketches and probes are drawn on the CPU from the seed, so every method sees the
    # same numbers on both devices; iterative stopping rules amplify rounding differences.
    tol = 1e-6 if name in ("arnoldi", "nystroem", "lissa") else 1e-9
    assert rel_error(gpu_scores.cpu(), cpu_scores) < tol
    assert rel_error(gpu_factors.cpu(), cpu_factors) < max(tol, 1e-9)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_fitted_model_moves_to_cuda():
    net, x, y = classification_problem(torch.float64)
    model = DirectInfluence(net, torch.nn.functional.cross_entropy, 0.5).fit(
        DataLoader(TensorDataset(x, y), batch_size=16)
    )
    cpu = model.influences(x[:3], y[:3], x, y)
    model.to("cuda")
    gpu = model.influences(x[:3], y[:3], x, y)
    assert gpu.device.type == "cuda"
    assert rel_error(gpu.cpu(), cpu) < 1e-10
