"""Preconditioners M⁻¹ ≈ (A + λI)⁻¹ for conjugate gradient.

``solve`` takes a vector (P,) or right-hand sides as rows (K, P), like every operator here.

* :class:`JacobiPreconditioner`: M = diag(A) + λI with diag(A) estimated by Hutchinson's
  estimator with Rademacher vectors, (1/m) Σ_k u_k ⊙ A u_k (exact for a diagonal A).
  Entries that the estimate makes non-positive are replaced by the mean of the positive
  ones, so M stays positive definite (a CG requirement).
* :class:`NystroemPreconditioner`: with a rank-r Nyström approximation A ≈ U Λ Uᵀ,
  M⁻¹ = (λ_r + λ) U (Λ + λI)⁻¹ Uᵀ + (I − U Uᵀ), λ_r the smallest kept eigenvalue.

Their fitted state is a few tensors (``state_tensors``) so a fitted CG can be persisted.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from .low_rank import LowRankProductRepresentation
from .regularization import check_regularization
from .spectral import _generator, operator_nystroem_approximation
from .tensor_operator import TensorOperator


class Preconditioner(ABC):
    """A fitted approximation of (A + λI)⁻¹ used inside CG."""

    _reg: float | None = None

    @property
    def regularization(self) -> float | None:
        return self._reg

    @regularization.setter
    def regularization(self, value: float | None) -> None:
        self._reg = check_regularization(value)

    @property
    def modify_regularization_requires_fit(self) -> bool:
        return False

    @property
    @abstractmethod
    def is_fitted(self) -> bool: ...

    def fit(self, operator: TensorOperator, regularization: float | None = None) -> Preconditioner:
        self._reg = check_regularization(regularization)
        self._fit(operator)
        return self

    @abstractmethod
    def _fit(self, operator: TensorOperator) -> None: ...

    def solve(self, rhs: torch.Tensor) -> torch.Tensor:
        if not self.is_fitted:
            raise ValueError(f"{type(self).__name__} must be fitted before solve().")
        if rhs.ndim == 1:
            return self._solve(rhs.unsqueeze(0)).squeeze(0)
        return self._solve(rhs)

    @abstractmethod
    def _solve(self, rhs: torch.Tensor) -> torch.Tensor: ...

    @abstractmethod
    def to(self, device: torch.device | str) -> Preconditioner: ...

    @abstractmethod
    def state_tensors(self) -> dict[str, torch.Tensor]:
        """The fitted tensors, for persistence."""

    @abstractmethod
    def load_state_tensors(
        self, tensors: dict[str, torch.Tensor], regularization: float | None
    ) -> None:
        """Restore a fitted state written by :meth:`state_tensors`."""

    def config(self) -> dict[str, object]:
        return {"type": type(self).__name__}


class JacobiPreconditioner(Preconditioner):
    """Diagonal preconditioner from a Hutchinson estimate of diag(A).

    Args:
        num_samples_estimator: number m of Rademacher probe vectors (one batched product).
        seed: seed of the probes (None: torch's global generator).
    """

    def __init__(self, num_samples_estimator: int = 1, seed: int | None = None) -> None:
        if num_samples_estimator < 1:
            raise ValueError(f"num_samples_estimator must be >= 1, got {num_samples_estimator}.")
        self.num_samples_estimator = int(num_samples_estimator)
        self.seed = seed
        self._diag: torch.Tensor | None = None

    @property
    def is_fitted(self) -> bool:
        return self._diag is not None

    def _fit(self, operator: TensorOperator) -> None:
        gen = _generator(operator.device, self.seed)
        probes = (
            torch.randint(
                0, 2, (self.num_samples_estimator, operator.input_size), generator=gen
            ).to(device=operator.device, dtype=operator.dtype)
            * 2
            - 1
        )
        estimate = (probes * operator.apply(probes)).mean(dim=0)
        positive = estimate > 0
        if not bool(positive.all()):
            fill = (
                estimate[positive].mean()
                if bool(positive.any())
                else torch.ones((), dtype=estimate.dtype, device=estimate.device)
            )
            estimate = torch.where(positive, estimate, fill)
        self._diag = estimate

    def _solve(self, rhs: torch.Tensor) -> torch.Tensor:
        assert self._diag is not None
        diag = self._diag if self._reg is None else self._diag + self._reg
        return rhs / diag

    def to(self, device: torch.device | str) -> JacobiPreconditioner:
        if self._diag is not None:
            self._diag = self._diag.to(device)
        return self

    def state_tensors(self) -> dict[str, torch.Tensor]:
        assert self._diag is not None
        return {"diag": self._diag}

    def load_state_tensors(
        self, tensors: dict[str, torch.Tensor], regularization: float | None
    ) -> None:
        self._diag = tensors["diag"]
        self._reg = check_regularization(regularization)

    def config(self) -> dict[str, object]:
        return {
            "type": "JacobiPreconditioner",
            "num_samples_estimator": self.num_samples_estimator,
            "seed": self.seed,
        }


class NystroemPreconditioner(Preconditioner):
    """Low-rank Nyström preconditioner of rank ``rank`` (see the module docstring)."""

    def __init__(self, rank: int, seed: int | None = None) -> None:
        if rank < 1:
            raise ValueError(f"rank must be a positive integer, got {rank}.")
        self._rank = int(rank)
        self.seed = seed
        self._low_rank_approx: LowRankProductRepresentation | None = None

    @property
    def rank(self) -> int:
        return self._rank

    @property
    def low_rank_approx(self) -> LowRankProductRepresentation | None:
        return self._low_rank_approx

    @property
    def is_fitted(self) -> bool:
        return self._low_rank_approx is not None

    def _fit(self, operator: TensorOperator) -> None:
        self._low_rank_approx = operator_nystroem_approximation(
            operator, self._rank, seed=self.seed
        )

    def _solve(self, rhs: torch.Tensor) -> torch.Tensor:
        assert self._low_rank_approx is not None
        U = self._low_rank_approx.projections
        sigma = self._low_rank_approx.eigen_vals
        smallest = sigma.min()
        if self._reg is not None:
            sigma = sigma + self._reg
            smallest = smallest + self._reg
        if bool((sigma <= 0).any()):
            raise ValueError(
                "The Nyström preconditioner has a zero eigenvalue: set a positive regularization."
            )
        coefficients = rhs @ U
        return (coefficients * (smallest / sigma)) @ U.T + rhs - coefficients @ U.T

    def to(self, device: torch.device | str) -> NystroemPreconditioner:
        if self._low_rank_approx is not None:
            self._low_rank_approx = self._low_rank_approx.to(device)
        return self

    def state_tensors(self) -> dict[str, torch.Tensor]:
        assert self._low_rank_approx is not None
        return {
            "eigen_vals": self._low_rank_approx.eigen_vals,
            "projections": self._low_rank_approx.projections,
        }

    def load_state_tensors(
        self, tensors: dict[str, torch.Tensor], regularization: float | None
    ) -> None:
        self._low_rank_approx = LowRankProductRepresentation(
            tensors["eigen_vals"], tensors["projections"]
        )
        self._reg = check_regularization(regularization)

    def config(self) -> dict[str, object]:
        return {"type": "NystroemPreconditioner", "rank": self._rank, "seed": self.seed}
