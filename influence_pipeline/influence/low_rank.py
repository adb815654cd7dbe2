"""Low-rank curvature: A ≈ V diag(D) Vᵀ with orthonormal V (P, r), and its damped inverse.

Without Woodbury (``exact=False``) the inverse acts on the span of V only:
    Op(b) = V diag(1/(D+λ)) Vᵀ b,
with Woodbury (``exact=True``) it is the inverse of V D Vᵀ + λI on the whole space:
    Op(b) = V diag(1/(D+λ)) Vᵀ b + (1/λ)(b − V Vᵀ b).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from .regularization import check_regularization

if TYPE_CHECKING:
    from .bilinear_forms import LowRankBilinearForm
from .tensor_operator import TensorOperator


@dataclass
class LowRankProductRepresentation:
    """A ≈ projections @ diag(eigen_vals) @ projections.T; projections (P, r), eigen_vals (r,)."""

    eigen_vals: torch.Tensor
    projections: torch.Tensor

    def __post_init__(self) -> None:
        # One memory layout whatever produced the tensors (LAPACK returns column-major
        # eigenvectors, a restore reads row-major ones): live and restored methods then take
        # the same matmul path.
        self.eigen_vals = self.eigen_vals.contiguous()
        self.projections = self.projections.contiguous()
        if self.projections.ndim != 2 or self.eigen_vals.ndim != 1:
            raise ValueError(
                "Expected projections (P, r) and eigen_vals (r,), got "
                f"{tuple(self.projections.shape)} and {tuple(self.eigen_vals.shape)}."
            )
        if self.projections.shape[1] != self.eigen_vals.shape[0]:
            raise ValueError(
                f"projections have {self.projections.shape[1]} columns but there are "
                f"{self.eigen_vals.shape[0]} eigenvalues."
            )

    @property
    def device(self) -> torch.device:
        return self.projections.device

    @property
    def dtype(self) -> torch.dtype:
        return self.projections.dtype

    @property
    def rank(self) -> int:
        return int(self.eigen_vals.shape[0])

    def to(self, device: torch.device | str) -> LowRankProductRepresentation:
        return LowRankProductRepresentation(self.eigen_vals.to(device), self.projections.to(device))


class LowRankOperator(TensorOperator):
    """The damped inverse of a low-rank representation (see the module docstring)."""

    def __init__(
        self,
        low_rank_representation: LowRankProductRepresentation,
        regularization: float | None = None,
        exact: bool = True,
    ) -> None:
        self._exact = bool(exact)
        self._regularization = check_regularization(regularization, positive=self._exact)
        self._low_rank_representation = low_rank_representation

    @property
    def exact(self) -> bool:
        return self._exact

    @property
    def regularization(self) -> float | None:
        return self._regularization

    @regularization.setter
    def regularization(self, value: float | None) -> None:
        self._regularization = check_regularization(value, positive=self._exact)

    @property
    def low_rank_representation(self) -> LowRankProductRepresentation:
        return self._low_rank_representation

    @property
    def input_size(self) -> int:
        return int(self._low_rank_representation.projections.shape[0])

    @property
    def device(self) -> torch.device:
        return self._low_rank_representation.device

    @property
    def dtype(self) -> torch.dtype:
        return self._low_rank_representation.dtype

    def to(self, device: torch.device | str) -> LowRankOperator:
        self._low_rank_representation = self._low_rank_representation.to(device)
        return self

    def inverse_eigenvalues(self) -> torch.Tensor:
        """1/(D + λ), (r,); zero damped eigenvalues are an error."""
        d = self._low_rank_representation.eigen_vals
        if self._regularization:
            d = d + self._regularization
        if bool((d == 0).any()):
            raise ValueError(
                "A damped eigenvalue of the low-rank curvature is zero: set a positive "
                "regularization."
            )
        return 1.0 / d

    def _apply_to_mat(self, mat: torch.Tensor) -> torch.Tensor:
        V = self._low_rank_representation.projections
        coefficients = mat @ V  # (K, r)
        result = (coefficients * self.inverse_eigenvalues()) @ V.T
        if self._exact:
            assert self._regularization is not None
            result = result + (mat - coefficients @ V.T) / self._regularization
        return result

    def as_bilinear_form(self) -> LowRankBilinearForm:
        from .bilinear_forms import LowRankBilinearForm

        return LowRankBilinearForm(self)
