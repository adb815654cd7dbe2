"""DirectSolveOperator: (A + λI)⁻¹ for an explicit matrix A.

A + λI is factored once (Cholesky when it is positive definite, LU otherwise) and every
application is a triangular solve for all right-hand sides at once. The undamped A is kept,
so a new λ only refactors (``regularization`` setter), never recomputes A.
"""

from __future__ import annotations

import torch

from .finite import all_finite
from .regularization import check_regularization
from .tensor_operator import TensorOperator


class DirectSolveOperator(TensorOperator):
    """Rows v ↦ (A + λI)⁻¹ v for a symmetric matrix A (P, P).

    Args:
        matrix: the curvature A.
        regularization: λ ≥ 0 or None (no damping).
        in_place_regularization: accepted for pyDVL compatibility; A is never modified.
    """

    def __init__(
        self,
        matrix: torch.Tensor,
        regularization: float | None = None,
        in_place_regularization: bool = False,
    ) -> None:
        if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
            raise ValueError(f"Expected a square matrix, got shape {tuple(matrix.shape)}.")
        if not all_finite(matrix):
            raise ValueError("The curvature matrix contains NaN or inf.")
        self.matrix = matrix
        self._regularization = check_regularization(regularization)
        self._factorize()

    @property
    def regularization(self) -> float | None:
        return self._regularization

    @regularization.setter
    def regularization(self, value: float | None) -> None:
        self._regularization = check_regularization(value)
        self._factorize()

    def damped_matrix(self) -> torch.Tensor:
        if not self._regularization:
            return self.matrix
        eye = torch.eye(self.input_size, dtype=self.dtype, device=self.device)
        return self.matrix + self._regularization * eye

    def _factorize(self) -> None:
        damped = self.damped_matrix()
        chol, info = torch.linalg.cholesky_ex(damped)
        if int(info) == 0:
            self._cholesky: torch.Tensor | None = chol
            self._lu: tuple[torch.Tensor, torch.Tensor] | None = None
            return
        lu, pivots, info = torch.linalg.lu_factor_ex(damped)
        if int(info) != 0:
            raise ValueError(
                f"The damped curvature matrix ({self.input_size} x {self.input_size}, "
                f"regularization={self._regularization}) is singular: set a positive "
                "regularization."
            )
        self._cholesky = None
        self._lu = (lu, pivots)

    @property
    def input_size(self) -> int:
        return int(self.matrix.shape[0])

    @property
    def device(self) -> torch.device:
        return self.matrix.device

    @property
    def dtype(self) -> torch.dtype:
        return self.matrix.dtype

    def to(self, device: torch.device | str) -> DirectSolveOperator:
        self.matrix = self.matrix.to(device)
        self._factorize()
        return self

    def _apply_to_mat(self, mat: torch.Tensor) -> torch.Tensor:
        if self._cholesky is not None:
            result = torch.cholesky_solve(mat.T, self._cholesky).T
        else:
            assert self._lu is not None
            result = torch.linalg.lu_solve(self._lu[0], self._lu[1], mat.T).T
        if not all_finite(result):
            raise ValueError(
                "Solving with the damped curvature gave NaN/inf: the matrix is numerically "
                "singular; increase the regularization."
            )
        return result
