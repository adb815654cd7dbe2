"""Low-rank approximations of a symmetric operator from batched products.

* :func:`operator_spectral_approximation` — the top-``rank`` eigenpairs (largest |λ|) by a
  restarted block Krylov method (Lanczos, i.e. Arnoldi for a symmetric operator): the basis
  grows by one block per product, the Rayleigh quotient T = Vᵀ(AV) is formed from the
  stored products (no reliance on a three-term recurrence), Ritz pairs with residual
  ‖Au − θu‖ ≤ tol·max|θ| are accepted, and a thick restart keeps the best Ritz vectors.
  Every product is applied to a whole block of vectors, so a curvature operator streams
  the data once per block instead of once per vector. When the Krylov dimension reaches
  the operator size the decomposition is dense and exact.
* :func:`randomized_nystroem_approximation` — A ≈ (AΩ)(ΩᵀAΩ)⁺(AΩ)ᵀ = U Λ Uᵀ from a single
  product with an orthonormal Gaussian sketch Ω (P, r), stabilised with a small shift.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Callable

import torch

from .low_rank import LowRankProductRepresentation
from .tensor_operator import TensorOperator

logger = logging.getLogger(__name__)


def _generator(device: torch.device, seed: int | None) -> torch.Generator:
    gen = torch.Generator(device=device)
    if seed is None:
        seed = int(torch.randint(0, 2**62, (1,)).item())
    gen.manual_seed(int(seed))
    return gen


def _orthonormal_columns(W: torch.Tensor, basis: torch.Tensor | None) -> torch.Tensor:
    """Columns of W made orthonormal and orthogonal to ``basis`` (two Gram-Schmidt passes);
    directions that vanish (rank deficiency) are dropped."""
    for _ in range(2):
        if basis is not None and basis.shape[1] > 0:
            W = W - basis @ (basis.T @ W)
    if W.shape[1] == 0:
        return W
    U, S, _ = torch.linalg.svd(W, full_matrices=False)
    eps = torch.finfo(W.dtype).eps
    scale = max(float(S[0]) if S.numel() else 0.0, 1.0)
    keep = eps * scale * max(W.shape) * 10 < S
    Q = U[:, keep]
    if basis is not None and basis.shape[1] > 0 and Q.shape[1] > 0:
        Q = Q - basis @ (basis.T @ Q)
        Q, _ = torch.linalg.qr(Q)
    return Q


def _apply_columns(operator: TensorOperator, columns: torch.Tensor) -> torch.Tensor:
    """A @ columns for columns (P, b), via the row convention of TensorOperator."""
    return operator.apply(columns.T.contiguous()).T


def dense_operator_matrix(operator: TensorOperator) -> torch.Tensor:
    """The (P, P) matrix of an operator, symmetrised."""
    dense = getattr(operator, "dense", None)
    if callable(dense):
        matrix = dense()
    else:
        eye = torch.eye(operator.input_size, dtype=operator.dtype, device=operator.device)
        matrix = operator.apply(eye).T
    return 0.5 * (matrix + matrix.T)


def _top_by_magnitude(
    values: torch.Tensor, vectors: torch.Tensor, k: int
) -> LowRankProductRepresentation:
    order = torch.argsort(values.abs(), descending=True)[:k]
    return LowRankProductRepresentation(values[order].contiguous(), vectors[:, order].contiguous())


def operator_spectral_approximation(
    operator: TensorOperator,
    rank: int = 10,
    krylov_dimension: int | None = None,
    tol: float = 1e-6,
    max_iter: int | None = None,
    eigen_computation_on_gpu: bool = False,
    seed: int | None = None,
) -> LowRankProductRepresentation:
    """Top-``rank`` eigenpairs (largest |λ|) of a symmetric operator, as V diag(D) Vᵀ.

    Args:
        operator: the symmetric operator A (P × P).
        rank: number of eigenpairs.
        krylov_dimension: size of the Krylov basis before a restart; default
            min(P, max(2·rank + 1, 20)). At P the decomposition is dense and exact.
        tol: accept a Ritz pair when ‖Au − θu‖ ≤ tol · max|θ|; never below 1000 machine
            epsilons of the dtype (1.2e-4 in float32, where rounding in the streamed
            products stalls the residuals near there). The solver also stops, with a
            warning, when the largest residual stagnates for 5 restarts.
        max_iter: maximum number of restarts (default 100).
        eigen_computation_on_gpu: accepted for pyDVL compatibility; the computation always
            runs on the operator's device.
        seed: seed of the random start block (None: drawn from torch's global generator).
    """
    del eigen_computation_on_gpu
    P = operator.input_size
    if rank < 1:
        raise ValueError(f"rank must be a positive integer, got {rank}.")
    k = min(int(rank), P)
    m = krylov_dimension if krylov_dimension is not None else min(P, max(2 * k + 1, 20))
    if m <= k and m < P:
        raise ValueError(
            f"krylov_dimension={m} must exceed rank={k} (or reach the operator size {P})."
        )
    if m >= P:
        values, vectors = torch.linalg.eigh(dense_operator_matrix(operator))
        return _top_by_magnitude(values, vectors, k)

    device, dtype = operator.device, operator.dtype
    gen = _generator(device, seed)
    block = max(1, min(k, m // 2))
    max_restarts = 100 if max_iter is None else int(max_iter)

    start = torch.randn(P, block, generator=gen, device=device, dtype=dtype)
    basis = _orthonormal_columns(start, None)
    products = _apply_columns(operator, basis)
    last = slice(0, basis.shape[1])
    residual_norms = torch.full((k,), math.inf)
    theta = torch.zeros(0, dtype=dtype, device=device)
    ritz = basis
    tol = max(float(tol), 1000 * torch.finfo(dtype).eps)
    best, stalled = math.inf, 0
    for restart in range(max_restarts + 1):
        while basis.shape[1] < m:
            new = _orthonormal_columns(products[:, last], basis)
            if new.shape[1] == 0:
                break  # invariant subspace: the Krylov space is exhausted
            new = new[:, : m - basis.shape[1] + block]
            new_products = _apply_columns(operator, new)
            last = slice(basis.shape[1], basis.shape[1] + new.shape[1])
            basis = torch.cat([basis, new], dim=1)
            products = torch.cat([products, new_products], dim=1)
        T = basis.T @ products
        T = 0.5 * (T + T.T)
        values, Y = torch.linalg.eigh(T)
        order = torch.argsort(values.abs(), descending=True)
        values, Y = values[order], Y[:, order]
        ritz = basis @ Y
        ritz_products = products @ Y
        kk = min(k, ritz.shape[1])
        theta = values[:kk]
        residuals = ritz_products[:, :kk] - ritz[:, :kk] * theta
        residual_norms = torch.linalg.vector_norm(residuals, dim=0)
        threshold = tol * max(float(values.abs().max()), torch.finfo(dtype).tiny)
        converged = residual_norms <= threshold
        if (bool(converged.all()) and kk == k) or basis.shape[1] >= P:
            logger.debug("Krylov eigensolver converged after %d restarts", restart)
            return LowRankProductRepresentation(theta.contiguous(), ritz[:, :kk].contiguous())
        worst = float(residual_norms.max())
        if worst < 0.9 * best:
            best, stalled = worst, 0
        else:
            stalled += 1
        if restart == max_restarts or stalled >= 5:
            break
        keep = min(ritz.shape[1], max(k, m - 2 * block))
        # Re-orthonormalise the kept Ritz vectors (rounding erodes orthogonality over
        # restarts, most visibly in float32); their products follow: A(QR⁻¹)... = (AV)R⁻¹.
        basis, upper = torch.linalg.qr(ritz[:, :keep])
        products = torch.linalg.solve_triangular(
            upper, ritz_products[:, :keep], upper=True, left=False
        )
        pending = residuals[:, ~converged][:, :block]
        new = _orthonormal_columns(pending, basis)
        if new.shape[1] == 0:
            new = _orthonormal_columns(
                torch.randn(P, block, generator=gen, device=device, dtype=dtype), basis
            )
        products = torch.cat([products, _apply_columns(operator, new)], dim=1)
        last = slice(basis.shape[1], basis.shape[1] + new.shape[1])
        basis = torch.cat([basis, new], dim=1)
    warnings.warn(
        f"The Krylov eigensolver did not reach tol={tol:.3g} for rank={k} "
        f"({'stagnated' if stalled >= 5 else f'{max_restarts} restarts'}, largest relative "
        f"residual {float(residual_norms.max()) / max(float(theta.abs().max()), 1e-300):.3g}); "
        "returning the best approximation found. Increase max_iter or krylov_dimension.",
        stacklevel=2,
    )
    kk = min(k, ritz.shape[1])
    return LowRankProductRepresentation(theta[:kk].contiguous(), ritz[:, :kk].contiguous())


def randomized_nystroem_approximation(
    mat_mat_prod: torch.Tensor | Callable[[torch.Tensor], torch.Tensor],
    input_dim: int,
    rank: int,
    input_type: torch.dtype,
    shift_func: Callable[[torch.Tensor], torch.Tensor] | None = None,
    mat_vec_device: torch.device | str = "cpu",
    seed: int | None = None,
) -> LowRankProductRepresentation:
    """Randomized Nyström approximation A ≈ U diag(Λ) Uᵀ of a positive semi-definite A.

    Args:
        mat_mat_prod: A as a matrix, or a function X (P, r) ↦ A X.
        input_dim: P.
        rank: r, the sketch size (at most P).
        input_type: dtype of the sketch.
        shift_func: the stabilising shift ν from AΩ; default √P · eps · ‖AΩ‖_F.
        mat_vec_device: device of the sketch.
        seed: seed of the Gaussian sketch (None: torch's global generator).
    """
    if rank < 1:
        raise ValueError(f"rank must be a positive integer, got {rank}.")
    r = min(int(rank), int(input_dim))
    device = torch.device(mat_vec_device)
    product: Callable[[torch.Tensor], torch.Tensor]
    if isinstance(mat_mat_prod, torch.Tensor):
        matrix = mat_mat_prod

        def product(x: torch.Tensor) -> torch.Tensor:
            return matrix @ x

    else:
        product = mat_mat_prod
    gen = _generator(device, seed)
    omega = torch.randn(input_dim, r, generator=gen, device=device, dtype=input_type)
    omega, _ = torch.linalg.qr(omega)
    sketch = product(omega)
    if shift_func is None:
        shift = math.sqrt(input_dim) * torch.finfo(input_type).eps * torch.linalg.norm(sketch)
    else:
        shift = shift_func(sketch)
    sketch = sketch + shift * omega
    core = omega.T @ sketch
    core = 0.5 * (core + core.T)
    chol, info = torch.linalg.cholesky_ex(core)
    if int(info) != 0:
        logger.warning(
            "Nyström core matrix is not positive definite (the operator is indefinite); "
            "adding its smallest eigenvalue to the shift."
        )
        extra = torch.linalg.eigvalsh(core).min().abs() * (1 + 1e-6) + torch.finfo(input_type).eps
        shift = shift + extra
        sketch = sketch + extra * omega
        core = core + extra * torch.eye(r, device=device, dtype=input_type)
        chol = torch.linalg.cholesky(core)
    factor = torch.linalg.solve_triangular(chol.T, sketch, upper=True, left=False)
    U, S, _ = torch.linalg.svd(factor, full_matrices=False)
    eigen_vals = torch.clamp(S**2 - shift, min=0.0)
    return LowRankProductRepresentation(eigen_vals, U)


def operator_nystroem_approximation(
    operator: TensorOperator,
    rank: int,
    shift_func: Callable[[torch.Tensor], torch.Tensor] | None = None,
    seed: int | None = None,
) -> LowRankProductRepresentation:
    """Randomized Nyström approximation of an operator, one batched product of r vectors."""
    return randomized_nystroem_approximation(
        lambda x: _apply_columns(operator, x),
        operator.input_size,
        rank,
        operator.dtype,
        shift_func=shift_func,
        mat_vec_device=operator.device,
        seed=seed,
    )
