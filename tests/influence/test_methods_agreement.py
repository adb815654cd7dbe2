"""Iterative and low-rank methods against DirectInfluence (and their own closed forms).

Tolerances (float64, relative Frobenius error of the factors): CG and block CG ≤ 1e-6;
Arnoldi and Nyström at full rank on a positive definite curvature ≤ 1e-8; LiSSA with a
full-batch loader converges to its damped fixed point (A + (λ + d·s)I)⁻¹ ≤ 1e-6; the
inverse harmonic mean equals its closed form ≤ 1e-10.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from influence_pipeline.influence import (
    ArnoldiInfluence,
    BlockMode,
    CgInfluence,
    DirectInfluence,
    InverseHarmonicMeanInfluence,
    JacobiPreconditioner,
    LissaInfluence,
    NystroemPreconditioner,
    NystroemSketchInfluence,
    SecondOrderMode,
    operator_spectral_approximation,
)
from influence_pipeline.influence.curvature import HessianOperator

from .closed_forms import make_problem, rel_error

LAMBDA = {"linear": 0.01, "logistic": 0.05}


def loader(problem, batch_size=8):
    return DataLoader(TensorDataset(problem.x, problem.y), batch_size=batch_size)


def direct_factors(problem, mode=SecondOrderMode.HESSIAN, lam=None, structure=BlockMode.FULL):
    lam = LAMBDA[problem.kind] if lam is None else lam
    model = DirectInfluence(
        problem.model,
        problem.loss,
        regularization=lam,
        second_order_mode=mode,
        block_structure=structure,
    ).fit(loader(problem))
    return model.influence_factors(problem.x, problem.y)


CASES = [
    (kind, mode, structure)
    for kind in ("linear", "logistic")
    for mode in SecondOrderMode
    for structure in (BlockMode.FULL, BlockMode.LAYER_WISE)
]


@pytest.mark.parametrize(("kind", "mode", "structure"), CASES)
@pytest.mark.parametrize(
    "preconditioner", [None, "jacobi", "nystroem"], ids=["plain", "jacobi", "nystroem"]
)
@pytest.mark.parametrize("block_cg", [False, True], ids=["per_rhs", "block"])
def test_cg_matches_direct(kind, mode, structure, preconditioner, block_cg):
    problem = make_problem(kind)
    pre = {
        None: None,
        "jacobi": JacobiPreconditioner(num_samples_estimator=4, seed=0),
        "nystroem": NystroemPreconditioner(rank=3, seed=0),
    }[preconditioner]
    cg = CgInfluence(
        problem.model,
        problem.loss,
        regularization=LAMBDA[kind],
        rtol=1e-12,
        atol=1e-14,
        preconditioner=pre,
        solve_simultaneously=block_cg,
        second_order_mode=mode,
        block_structure=structure,
    ).fit(loader(problem))
    # 40 right-hand sides for P = 6 (logistic) or 12 (linear) parameters: more RHS than P.
    factors = cg.influence_factors(problem.x, problem.y)
    assert rel_error(factors, direct_factors(problem, mode, structure=structure)) < 1e-6


@pytest.mark.parametrize("kind", ["linear", "logistic"])
@pytest.mark.parametrize("mode", list(SecondOrderMode))
@pytest.mark.parametrize("woodbury", [False, True])
def test_arnoldi_full_rank_matches_direct(kind, mode, woodbury):
    problem = make_problem(kind)
    P = problem.n_parameters
    arnoldi = ArnoldiInfluence(
        problem.model,
        problem.loss,
        regularization=LAMBDA[kind],
        rank=P,
        second_order_mode=mode,
        use_woodbury=woodbury,
    ).fit(loader(problem))
    factors = arnoldi.influence_factors(problem.x, problem.y)
    assert rel_error(factors, direct_factors(problem, mode)) < 1e-8


def test_krylov_eigenpairs_match_dense_eigh():
    """Below full rank, the restarted block Krylov solver finds the top eigenpairs."""
    problem = make_problem("logistic", n=80, d_a=14, d_b=13)  # P = 28, simple eigenvalues
    op = HessianOperator(problem.model, problem.loss, loader(problem, 16))
    dense = problem.hessian()
    values, vectors = torch.linalg.eigh(dense)
    order = torch.argsort(values.abs(), descending=True)[:5]
    assert float(torch.diff(values[order]).abs().min()) > 1e-3 * float(values.abs().max())
    approx = operator_spectral_approximation(op, rank=5, krylov_dimension=12, tol=1e-10, seed=0)
    assert torch.allclose(approx.eigen_vals, values[order], rtol=1e-8, atol=0)
    # eigenvectors up to sign: the projector onto their span is unique (distinct eigenvalues)
    V, U = approx.projections, vectors[:, order]
    assert rel_error(V @ V.T, U @ U.T) < 1e-6
    assert rel_error(V @ torch.diag(approx.eigen_vals) @ V.T, dense @ V @ V.T) < 1e-8


@pytest.mark.parametrize("kind", ["linear", "logistic"])
@pytest.mark.parametrize("mode", list(SecondOrderMode))
def test_nystroem_full_rank_matches_direct(kind, mode):
    problem = make_problem(kind)
    torch.manual_seed(0)
    nys = NystroemSketchInfluence(
        problem.model,
        problem.loss,
        regularization=LAMBDA[kind],
        rank=problem.n_parameters,
        second_order_mode=mode,
    ).fit(loader(problem))
    factors = nys.influence_factors(problem.x, problem.y)
    assert rel_error(factors, direct_factors(problem, mode)) < 1e-8


@pytest.mark.parametrize("kind", ["linear", "logistic"])
@pytest.mark.parametrize("mode", list(SecondOrderMode))
@pytest.mark.parametrize("dampen", [0.0, 0.01])
def test_lissa_full_batch_converges_to_damped_fixed_point(kind, mode, dampen):
    problem = make_problem(kind)
    scale = 5.0
    lam = LAMBDA[kind]
    lissa = LissaInfluence(
        problem.model,
        problem.loss,
        regularization=lam,
        maxiter=20000,
        dampen=dampen,
        scale=scale,
        rtol=1e-13,
        second_order_mode=mode,
        seed=0,
    ).fit(loader(problem, batch_size=40))
    factors = lissa.influence_factors(problem.x[:8], problem.y[:8])
    expected = direct_factors(problem, mode, lam=lam + dampen * scale)[:8]
    assert rel_error(factors, expected) < 1e-6


@pytest.mark.parametrize("kind", ["linear", "logistic"])
@pytest.mark.parametrize("structure", [BlockMode.FULL, BlockMode.PARAMETER_WISE])
def test_inverse_harmonic_mean_closed_form(kind, structure):
    problem = make_problem(kind)
    lam = 0.3
    ihm = InverseHarmonicMeanInfluence(
        problem.model, problem.loss, regularization=lam, block_structure=structure
    ).fit(loader(problem, 7))
    g = problem.grads(problem.x, problem.y)
    test_g = g[:5]
    parts, start = [], 0
    for size in ihm.block_sizes.values():
        gb = g[:, start : start + size]
        eye = torch.eye(size, dtype=torch.float64)
        inverse_mean = sum(torch.linalg.inv(torch.outer(gi, gi) + lam * eye) for gi in gb) / len(gb)
        parts.append(test_g[:, start : start + size] @ inverse_mean)
        start += size
    expected = torch.cat(parts, dim=1)
    assert rel_error(ihm.influence_factors(problem.x[:5], problem.y[:5]), expected) < 1e-10


def test_iterative_methods_stop_per_right_hand_side():
    """A right-hand side's solution does not depend on what else is solved with it."""
    problem = make_problem("logistic")
    for cls, kwargs in [
        (CgInfluence, {"rtol": 1e-9, "atol": 1e-12}),
        # stochastic batches: runs to maxiter, the batch sequence is the same for every call
        (
            LissaInfluence,
            {"scale": 5.0, "rtol": 1e-6, "maxiter": 300, "seed": 3, "warn_on_max_iteration": False},
        ),
    ]:
        model = cls(problem.model, problem.loss, regularization=0.05, **kwargs).fit(
            loader(problem, 10)
        )
        together = model.influence_factors(problem.x[:12], problem.y[:12])
        alone = torch.cat(
            [
                model.influence_factors(problem.x[i : i + 3], problem.y[i : i + 3])
                for i in range(0, 12, 3)
            ]
        )
        assert torch.equal(together, alone), cls.__name__
