"""Low-rank approximations of a symmetric operator from batched products.

* :func:`operator_spectral_approximation` — the top-``rank`` eigenpairs (largest |λ|) by a
  thick-restarted block Krylov method (Lanczos, i.e. Arnoldi for a symmetric operator):
  the basis grows by one block of ⌈rank/4⌉ vectors per product, the Rayleigh quotient
  T = Vᵀ(AV) is formed from the stored products (no reliance on a three-term
  recurrence), Ritz pairs with residual ‖Au − θu‖ ≤ tol·max|θ| are accepted, and a thick
  restart keeps the best Ritz vectors. Every product is applied to a whole block of
  vectors, so a curvature operator streams the data once per block instead of once per
  vector. When the Krylov dimension reaches the operator size the decomposition is dense
  and exact.
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
    """A CPU generator: random draws are made on the CPU in float64 and then moved, so a
    seeded sketch is the same on every device and in every dtype (``device`` is ignored)."""
    del device
    gen = torch.Generator()
    if seed is None:
        seed = int(torch.randint(0, 2**62, (1,)).item())
    gen.manual_seed(int(seed))
    return gen


def _randn(
    shape: tuple[int, ...], gen: torch.Generator, device: torch.device, dtype: torch.dtype
) -> torch.Tensor:
    return torch.randn(shape, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)


def _orthonormal_rows(W: torch.Tensor, basis: torch.Tensor | None) -> torch.Tensor:
    """Rows of W (c, P) made orthonormal and orthogonal to the orthonormal rows of
    ``basis`` (n, P) by two passes of block Gram-Schmidt; directions that vanish (rank
    deficiency) are dropped.

    Rank deficiency is decided relative to the rows' own norms before the projection,
    never against an absolute threshold: the rows are scaled to unit norm first (zero
    rows are dropped), so a singular value σ of the projected block is the norm of the
    part of a unit combination of the original rows that lies outside ``span(basis)``
    and outside the other rows. A direction is numerically dependent when σ ≤ c·eps with
    c = 10·√(n + c_rows): two passes of classical Gram-Schmidt leave about 0.2·√n·eps of
    a vector that lies in the span (measured in float32 and float64 for P up to 1.2e5:
    the rounding of the inner products does not grow with P), and the SVD of c_rows unit
    rows is accurate to about √c_rows·eps; c keeps a margin of ten over both. (A threshold
    that grows with P, like numpy's matrix_rank rule, or an absolute one discards genuine
    Krylov directions of a float32 operator with many parameters and small products.)
    """
    norms = torch.linalg.vector_norm(W, dim=1)
    nonzero = norms > 0
    W = W / norms[:, None] if bool(nonzero.all()) else W[nonzero] / norms[nonzero, None]
    if W.shape[0] == 0:
        return W
    n_basis = 0 if basis is None else basis.shape[0]
    if basis is not None and n_basis > 0:
        for _ in range(2):
            W = W - (W @ basis.T) @ basis
    # SVD of the tall (P, c) transpose: already column-major for LAPACK, ~10x faster than
    # the SVD of the wide (c, P) matrix. Wᵀ = U S Zᵀ, so the rows of Uᵀ span W's rows.
    # (LAPACK returns U column-major, so Uᵀ is a row-major (c, P) matrix: keep it that way,
    # products with transposed (P, c) views are several times slower.)
    U, S, _ = torch.linalg.svd(W.T, full_matrices=False)
    threshold = 10.0 * math.sqrt(n_basis + W.shape[0]) * torch.finfo(W.dtype).eps
    independent = threshold < S
    Q = U.T.contiguous() if bool(independent.all()) else U.T[independent].contiguous()
    if basis is not None and n_basis > 0 and Q.shape[0] > 0:
        Q = Q - (Q @ basis.T) @ basis
        Q = _orthonormalising_transform(Q) @ Q
    return Q


def _orthonormalising_transform(rows: torch.Tensor) -> torch.Tensor:
    """L⁻¹ for the Cholesky factor L Lᵀ = rows·rowsᵀ, so that L⁻¹·rows has orthonormal
    rows (Cholesky QR; the same L⁻¹ carries their products along, A(L⁻¹V)ᵀ = (L⁻¹AV)ᵀ).
    Accurate for nearly orthonormal rows, the only use here (Ritz vectors, projected
    blocks). The explicit (c, c) inverse turns the application into one matrix product,
    several times faster than a triangular solve with a (c, P) right-hand side. Should
    the Gram matrix not be numerically positive definite (dependent rows, which the
    callers rule out), a shift of c·eps·trace keeps the factorisation defined."""
    gram = rows @ rows.T
    gram = 0.5 * (gram + gram.T)
    factor, info = torch.linalg.cholesky_ex(gram)
    if int(info) != 0:
        shift = gram.shape[0] * torch.finfo(gram.dtype).eps * float(gram.trace())
        eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
        factor = torch.linalg.cholesky(gram + shift * eye)
    eye = torch.eye(factor.shape[0], dtype=factor.dtype, device=factor.device)
    return torch.linalg.solve_triangular(factor, eye, upper=False)


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


def _block_size(k: int, m: int) -> tuple[int, int]:
    """(b, s): vectors per product and products per thick restart of the Krylov solver for
    ``k`` eigenpairs and basis size ``m``; a restart keeps m − s·b Ritz vectors.

    A product with b vectors costs a fixed part (a pass over the data, the gradient graph
    of every batch) plus b times a per-vector part; for MLPs on a CPU the fixed part is
    worth 3 to 10 vectors, on a GPU more. A restart costs dense work of order P·m². In a
    sweep of b from 1 to k and of the restart size over eight spectra (Hessians of MLPs,
    power laws, clustered and indefinite spectra; float32 and float64; k = 10 and 20),
    b = ⌈k/4⌉ with about half of the m − k free basis vectors renewed per restart
    (s = round((m − k)/(2b)) blocks, so keep ≈ k + (m − k)/2 and whole blocks only) was
    best or within a few products of the best everywhere: about half the products of
    b = 1 (one vector at a time, ARPACK's way) and a third to a quarter of the vectors
    of b = k. Keeping fewer Ritz vectors (keep close to k) slowed clustered spectra down
    two- to fivefold; renewing a single block per restart doubled the dense work.
    """
    b = max(1, min(math.ceil(k / 4), m - k))
    return b, max(1, min(round((m - k) / (2 * b)), (m - k) // b))


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

    Thick-restarted block Lanczos. The basis V (≤ m orthonormal vectors) grows from a
    random block of b vectors by one block per product (b = ⌈rank/4⌉, see
    :func:`_block_size`) until it holds m vectors. The products AV are stored, so the
    Rayleigh quotient T = Vᵀ(AV), the Ritz pairs (θ, u = Vy) and their residuals
    ‖Au − θu‖ = ‖(AV)y − θVy‖ are computed explicitly (no three-term recurrence, no
    residual estimate) and cost no product. Unless the top ``rank`` pairs have
    converged, the restart keeps the Ritz vectors of largest |θ| (about
    rank + (m − rank)/2 of them, with their products, re-orthonormalised) and adds the
    block of Ritz residuals (those of unconverged pairs first), from which the basis
    grows again to m: in exact arithmetic every residual lies in that one block, so the
    restart continues the block Krylov space without discarding the kept vectors.

    Args:
        operator: the symmetric operator A (P × P).
        rank: number of eigenpairs.
        krylov_dimension: basis size m (the basis never holds more vectors); default
            min(P, max(2·rank + 1, 20)). At P the decomposition is dense and exact.
        tol: accept the pairs when every one of the top ``rank`` has
            ‖Au − θu‖ ≤ tol · max|θ| (θ over all Ritz values), the residual computed
            explicitly from the stored products; tol is never below 1000 machine
            epsilons of the dtype (1.2e-4 in float32, where rounding in the streamed
            products stalls the residuals near there). The solver also stops, with a
            warning, when the largest of these residuals has not dropped by 10% for 5
            restarts (or for 10 products, when a restart makes fewer than two), and
            returns the best pairs it has.
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
    block, blocks_per_restart = _block_size(k, m)
    keep = m - block * blocks_per_restart
    max_restarts = 100 if max_iter is None else int(max_iter)
    patience = max(5, math.ceil(10 / blocks_per_restart))
    # Row storage: the basis V and its products AV are (m, P) buffers filled row by row,
    # so a product takes its rows without a copy and nothing is concatenated. T = V(AV)ᵀ
    # is kept up to date: each new block adds its rows V_new(AV)ᵀ (and, A being
    # symmetric, the same numbers as its columns); after a restart the kept block's part
    # is known in closed form.
    V = torch.empty(m, P, dtype=dtype, device=device)
    AV = torch.empty(m, P, dtype=dtype, device=device)
    T = torch.zeros(m, m, dtype=dtype, device=device)
    n = 0

    def append(rows: torch.Tensor) -> slice:
        nonlocal n
        added = slice(n, n + rows.shape[0])
        V[added] = rows
        AV[added] = operator.apply(rows)
        n += rows.shape[0]
        cross = V[added] @ AV[:n].T
        cross[:, added] = 0.5 * (cross[:, added] + cross[:, added].T)
        T[added, :n] = cross
        T[:n, added] = cross.T
        return added

    def random_block() -> torch.Tensor:
        start = _randn((block, P), gen, device, dtype)
        return _orthonormal_rows(start, V[:n])

    last = append(random_block())
    residual_norms = torch.full((k,), math.inf)
    theta = torch.zeros(0, dtype=dtype, device=device)
    ritz = V[:n]
    tol = max(float(tol), 1000 * torch.finfo(dtype).eps)
    best, stalled = math.inf, 0
    for restart in range(max_restarts + 1):
        while n < m:
            new = _orthonormal_rows(AV[last], V[:n])
            if new.shape[0] == 0:
                break  # invariant subspace: the Krylov space is exhausted
            last = append(new[: m - n])
        values, Y = torch.linalg.eigh(T[:n, :n])
        order = torch.argsort(values.abs(), descending=True)
        values, Y = values[order], Y[:, order]
        kk = min(k, n)
        # Ritz vectors and their products: the kept ones, the top pairs and the
        # residual candidates.
        rows = min(n, max(keep, kk + 2 * block))
        ritz = Y[:, :rows].T @ V[:n]
        ritz_products = Y[:, :rows].T @ AV[:n]
        candidates_rows = min(rows, max(kk, 2 * block))
        # The Rayleigh quotients of the computed Ritz vectors (unit rows): they minimise
        # the residual norms and are accurate to the square of the residuals.
        quotients = (ritz[:candidates_rows] * ritz_products[:candidates_rows]).sum(dim=1)
        residuals = ritz_products[:candidates_rows] - quotients[:, None] * ritz[:candidates_rows]
        theta = quotients[:kk]
        residual_norms = torch.linalg.vector_norm(residuals[:kk], dim=1)
        threshold = tol * max(float(values.abs().max()), torch.finfo(dtype).tiny)
        converged = residual_norms <= threshold
        if (bool(converged.all()) and kk == k) or n >= P:
            logger.debug("Krylov eigensolver converged after %d restarts", restart)
            return LowRankProductRepresentation(theta.contiguous(), ritz[:kk].T.contiguous())
        worst = float(residual_norms.max())
        if worst < 0.9 * best:
            best, stalled = worst, 0
        else:
            stalled += 1
        if restart == max_restarts or stalled >= patience:
            break
        # Thick restart: the `keep` Ritz vectors of largest |θ|, re-orthonormalised
        # (rounding erodes orthogonality over restarts, most visibly in float32), their
        # products following, then the block of Ritz residuals.
        n = min(n, keep)
        inverse = _orthonormalising_transform(ritz[:n])
        torch.matmul(inverse, ritz[:n], out=V[:n])
        torch.matmul(inverse, ritz_products[:n], out=AV[:n])
        T[:n, :n] = (inverse * values[:n]) @ inverse.T  # L⁻¹ diag(θ) L⁻ᵀ
        candidates = torch.cat(
            [
                torch.nonzero(~converged).flatten(),
                torch.nonzero(converged).flatten(),
                torch.arange(kk, candidates_rows, device=converged.device),
            ]
        )
        new = _orthonormal_rows(residuals[candidates[: 2 * block]], V[:n])[:block]
        last = append(new if new.shape[0] > 0 else random_block())
    warnings.warn(
        f"The Krylov eigensolver did not reach tol={tol:.3g} for rank={k} "
        f"({'stagnated' if stalled >= patience else f'{max_restarts} restarts'}, largest "
        f"relative residual "
        f"{float(residual_norms.max()) / max(float(theta.abs().max()), 1e-300):.3g}); "
        "returning the best approximation found. Increase max_iter or krylov_dimension.",
        stacklevel=2,
    )
    kk = min(k, ritz.shape[0])
    return LowRankProductRepresentation(theta[:kk].contiguous(), ritz[:kk].T.contiguous())


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
    omega = _randn((input_dim, r), gen, device, input_type)
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
