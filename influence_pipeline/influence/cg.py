"""CgOperator: (A + λI)⁻¹ by preconditioned conjugate gradient, all right-hand sides at once.

Per-RHS CG (default): every right-hand side keeps its own CG scalars (α, β), but the K
search directions of the unconverged right-hand sides are multiplied by A together, one
batched product per iteration. Each right-hand side stops at ‖r‖ ≤ max(rtol·‖b‖, atol)
and is then frozen, so a solution does not depend on which other right-hand sides were
solved alongside it.

Block CG (``use_block_cg=True``, pyDVL's ``solve_simultaneously``): O'Leary's block CG on
the span of all right-hand sides, with the search block re-orthonormalised every step and
rank-deficient directions dropped (breakdown-free variant of Ji & Li, 2017); converged
right-hand sides leave the block. More right-hand sides than parameters are fine.

Both start from x₀ = 0. CG is meant for a positive definite A + λI; negative curvature
pᵀ(A + λI)p < 0 (an indefinite Hessian) draws one warning per operator, since CG may then
stall; zero or non-finite curvature is a breakdown and raises an error.
"""

from __future__ import annotations

import logging
import math
import warnings

import torch

from .preconditioner import Preconditioner
from .regularization import check_regularization
from .tensor_operator import TensorOperator

logger = logging.getLogger(__name__)


class CgOperator(TensorOperator):
    """Rows b ↦ x with (A + λI) x = b by (block) conjugate gradient.

    Args:
        operator: the curvature A.
        regularization: λ ≥ 0 or None.
        rtol, atol: stop a right-hand side at ‖r‖ ≤ max(rtol·‖b‖, atol).
        maxiter: iteration limit (default 10·P).
        progress: log the number of active right-hand sides every iteration.
        preconditioner: a fitted :class:`Preconditioner` or None.
        use_block_cg: block CG instead of per-RHS CG.
        warn_on_max_iteration: warn (else log at debug level) when maxiter is reached.
    """

    def __init__(
        self,
        operator: TensorOperator,
        regularization: float | None = None,
        rtol: float = 1e-7,
        atol: float = 1e-7,
        maxiter: int | None = None,
        progress: bool = False,
        preconditioner: Preconditioner | None = None,
        use_block_cg: bool = False,
        warn_on_max_iteration: bool = True,
    ) -> None:
        if rtol < 0 or atol < 0:
            raise ValueError(f"rtol and atol must be non-negative, got rtol={rtol}, atol={atol}.")
        if maxiter is not None and maxiter < 1:
            raise ValueError(f"maxiter must be a positive integer or None, got {maxiter}.")
        self.operator = operator
        self._regularization = check_regularization(regularization)
        self.rtol = float(rtol)
        self.atol = float(atol)
        self.maxiter = maxiter
        self.progress = progress
        self.preconditioner = preconditioner
        self.use_block_cg = bool(use_block_cg)
        self.warn_on_max_iteration = warn_on_max_iteration
        self.last_iterations = 0
        self._warned_indefinite = False

    @property
    def regularization(self) -> float | None:
        return self._regularization

    @regularization.setter
    def regularization(self, value: float | None) -> None:
        self._regularization = check_regularization(value)
        if self.preconditioner is not None:
            self.preconditioner.regularization = self._regularization

    @property
    def input_size(self) -> int:
        return self.operator.input_size

    @property
    def device(self) -> torch.device:
        return self.operator.device

    @property
    def dtype(self) -> torch.dtype:
        return self.operator.dtype

    def to(self, device: torch.device | str) -> CgOperator:
        self.operator = self.operator.to(device)
        if self.preconditioner is not None:
            self.preconditioner = self.preconditioner.to(device)
        return self

    def _damped(self, mat: torch.Tensor) -> torch.Tensor:
        result = self.operator.apply(mat)
        if self._regularization:
            result = result + self._regularization * mat
        return result

    def _precondition(self, residual: torch.Tensor) -> torch.Tensor:
        return residual if self.preconditioner is None else self.preconditioner.solve(residual)

    def _check_curvature(self, curvature: torch.Tensor) -> None:
        if not bool(torch.isfinite(curvature).all()) or bool((curvature == 0).any()):
            raise ValueError(
                "CG broke down: the curvature along a search direction is zero or not finite; "
                "increase the regularization."
            )
        if bool((curvature < 0).any()) and not self._warned_indefinite:
            self._warned_indefinite = True
            warnings.warn(
                "CG met negative curvature pᵀ(A + λI)p < 0: the damped curvature is indefinite "
                "and CG may converge slowly or not at all. Use SecondOrderMode.GAUSS_NEWTON or a "
                "larger regularization.",
                stacklevel=5,
            )

    def _tolerances(self, rhs: torch.Tensor) -> torch.Tensor:
        return torch.clamp(self.rtol * torch.linalg.vector_norm(rhs, dim=1), min=self.atol)

    def _max_iterations(self) -> int:
        return self.maxiter if self.maxiter is not None else 10 * self.input_size

    def _report_unconverged(self, n_active: int, residual: float) -> None:
        message = (
            f"CG reached maxiter={self._max_iterations()} with {n_active} right-hand side(s) "
            f"above tolerance (largest residual {residual:.3g}); increase maxiter or the "
            "regularization, or use a preconditioner."
        )
        if self.warn_on_max_iteration:
            warnings.warn(message, stacklevel=4)
        else:
            logger.debug(message)

    def _apply_to_mat(self, mat: torch.Tensor) -> torch.Tensor:
        if self.use_block_cg:
            return self._solve_block(mat)
        return self._solve_per_rhs(mat)

    def _solve_per_rhs(self, rhs: torch.Tensor) -> torch.Tensor:
        tol = self._tolerances(rhs)
        x = torch.zeros_like(rhs)
        r = rhs.clone()
        z = self._precondition(r)
        p = z.clone()
        rz = (r * z).sum(dim=1)
        active = torch.nonzero(torch.linalg.vector_norm(r, dim=1) > tol).flatten()
        iterations = 0
        while active.numel() > 0 and iterations < self._max_iterations():
            iterations += 1
            p_a = p[active]
            ap = self._damped(p_a)
            curvature = (p_a * ap).sum(dim=1)
            self._check_curvature(curvature)
            alpha = rz[active] / curvature
            x[active] += alpha[:, None] * p_a
            r_a = r[active] - alpha[:, None] * ap
            r[active] = r_a
            z_a = self._precondition(r_a)
            rz_new = (r_a * z_a).sum(dim=1)
            beta = rz_new / rz[active]
            p[active] = z_a + beta[:, None] * p_a
            rz[active] = rz_new
            still = torch.linalg.vector_norm(r_a, dim=1) > tol[active]
            active = active[still]
            if self.progress:
                logger.info(
                    "CG iteration %d: %d right-hand sides active", iterations, active.numel()
                )
        self.last_iterations = iterations
        if active.numel() > 0:
            self._report_unconverged(
                int(active.numel()), float(torch.linalg.vector_norm(r[active], dim=1).max())
            )
        return x

    def _solve_block(self, rhs: torch.Tensor) -> torch.Tensor:
        # Column layout inside: B (P, K); the search block S (P, s) has orthonormal columns.
        tol = self._tolerances(rhs)
        X = torch.zeros_like(rhs)  # rows
        R = rhs.T.clone()  # (P, K)
        active = torch.nonzero(torch.linalg.vector_norm(R, dim=0) > tol).flatten()
        R = R[:, active]
        S = _orthonormal(self._precondition(R.T).T)
        iterations = 0
        while active.numel() > 0 and iterations < self._max_iterations():
            iterations += 1
            if S.shape[1] == 0:
                break
            AS = self._damped(S.T).T  # (P, s)
            StAS = S.T @ AS
            StAS = 0.5 * (StAS + StAS.T)
            self._check_curvature(torch.linalg.eigvalsh(StAS))
            alpha = torch.linalg.solve(StAS, S.T @ R)  # (s, K_active)
            X[active] += (S @ alpha).T
            R = R - AS @ alpha
            still = torch.linalg.vector_norm(R, dim=0) > tol[active]
            active = active[still]
            R = R[:, still]
            if active.numel() == 0:
                break
            Z = self._precondition(R.T).T
            beta = -torch.linalg.solve(StAS, AS.T @ Z)
            S = _orthonormal(Z + S @ beta)
            if self.progress:
                logger.info(
                    "Block CG iteration %d: %d right-hand sides active", iterations, active.numel()
                )
        self.last_iterations = iterations
        if active.numel() > 0:
            self._report_unconverged(
                int(active.numel()), float(torch.linalg.vector_norm(R, dim=0).max())
            )
        return X


def _orthonormal(W: torch.Tensor) -> torch.Tensor:
    """An orthonormal basis of the column span of W, dropping numerically dependent columns.

    Dependence is judged relative to each column's own norm (the columns are scaled to
    unit norm first, zero columns dropped): a direction is dropped when its singular
    value is at most 10·√s·eps for s columns, the accuracy of the SVD of s unit columns
    with a margin of ten. Judging it against the largest singular value times P·eps
    (numpy's matrix_rank rule) dropped the search directions of every right-hand side
    whose residual had become 1% of another's in float32 at P ≈ 10⁵, which left block CG
    with a single search direction.
    """
    norms = torch.linalg.vector_norm(W, dim=0)
    nonzero = norms > 0
    W = W / norms if bool(nonzero.all()) else W[:, nonzero] / norms[nonzero]
    if W.shape[1] == 0:
        return W
    U, S, _ = torch.linalg.svd(W, full_matrices=False)
    keep = 10.0 * math.sqrt(W.shape[1]) * torch.finfo(W.dtype).eps < S
    return U[:, keep]
