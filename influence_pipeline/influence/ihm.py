"""InverseHarmonicMeanOperator: the inverse harmonic mean of damped rank-one curvatures.

Instead of inverting the mean of gᵢgᵢᵀ + λI, invert each rank-one term and average:

    Op(v) = (1/N) Σᵢ (gᵢgᵢᵀ + λI)⁻¹ v = (1/λ) (v − (1/N) Σᵢ gᵢ (gᵢᵀv) / (λ + ‖gᵢ‖²)),

by Sherman–Morrison, with gᵢ the per-sample gradient of the block over the N fit samples.
One application streams the data once (per-sample gradients of one batch in memory) for
all right-hand sides together; batches are weighted by their size.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch

from .batch import iterate_batches
from .gradient_provider import LossType, TorchGradientProvider
from .regularization import check_regularization
from .tensor_operator import TensorDictOperator


class InverseHarmonicMeanOperator(TensorDictOperator):
    """(1/N) Σᵢ (gᵢgᵢᵀ + λI)⁻¹ over the data (λ > 0)."""

    def __init__(
        self,
        model: torch.nn.Module,
        loss: LossType,
        data: Iterable[Any],
        regularization: float,
        restrict_to: Mapping[str, Any] | Sequence[str] | None = None,
    ) -> None:
        self.gradient_provider = TorchGradientProvider(model, loss, restrict_to)
        self.data = data
        self._regularization = check_regularization(regularization, positive=True)
        self.n_samples: int | None = None

    @property
    def regularization(self) -> float:
        assert self._regularization is not None
        return self._regularization

    @regularization.setter
    def regularization(self, value: float) -> None:
        self._regularization = check_regularization(value, positive=True)

    @property
    def input_size(self) -> int:
        return self.gradient_provider.n_parameters

    @property
    def input_dict_structure(self) -> dict[str, tuple[int, ...]]:
        return self.gradient_provider.input_dict_structure

    @property
    def device(self) -> torch.device:
        return self.gradient_provider.device

    @property
    def dtype(self) -> torch.dtype:
        return self.gradient_provider.dtype

    def to(self, device: torch.device | str) -> InverseHarmonicMeanOperator:
        self.gradient_provider.to(device)
        return self

    def _apply_to_mat(self, mat: torch.Tensor) -> torch.Tensor:
        lam = self.regularization
        total = torch.zeros_like(mat)
        n = 0
        for batch in iterate_batches(self.data):
            g = self.gradient_provider.flat_grads(batch)
            weights = 1.0 / (lam + (g * g).sum(dim=1))
            total += ((mat @ g.T) * weights) @ g
            n += len(batch)
        if self.n_samples is not None and n != self.n_samples:
            raise ValueError(
                f"The data loader yielded {n} samples on this pass but {self.n_samples} before."
            )
        self.n_samples = n
        return (mat - total / n) / lam
