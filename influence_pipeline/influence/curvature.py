"""Curvature operators of one parameter block, streamed over a data loader.

For the N fit samples and block parameters θ_B:

* :class:`HessianOperator`: A v = ∇²_θB L v with L = (1/N) Σᵢ ℓ(zᵢ), the Hessian of the mean
  loss; every batch contributes its *sum* of per-sample Hessian products, divided by the
  total N once at the end, so batch sizes (an uneven last batch included) change nothing.
* :class:`GaussNewtonOperator`: A v = (1/N) Σᵢ gᵢ (gᵢᵀ v), gᵢ = ∇_θB ℓ(zᵢ).

Both apply to K vectors at once: one pass over the data per product, one vectorised
reverse-over-reverse product (Hessian) or two matrix products (Gauss-Newton) per batch.
``dense()`` materialises A (P × P) in a single pass over the data.

>>> torch.manual_seed(0)
>>> X, y = torch.randn(20, 3, dtype=torch.float64), torch.randn(20, 1, dtype=torch.float64)
>>> model = torch.nn.Linear(3, 1, bias=False).double()
>>> loader = [(X[:7], y[:7]), (X[7:], y[7:])]          # uneven batches
>>> H = HessianOperator(model, torch.nn.functional.mse_loss, loader).dense()
>>> torch.allclose(H, 2 * X.T @ X / 20)                # MSE on a linear model: 2 XᵀX / N
True
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch

from .batch import TorchBatch, iterate_batches
from .finite import all_finite
from .gradient_provider import MAX_SAMPLE_VECTORS, LossType, TorchGradientProvider
from .tensor_operator import TensorDictOperator
from .types import SecondOrderMode


class CurvatureOperator(TensorDictOperator):
    """Base of the streamed curvature operators (mean over all samples of the data)."""

    def __init__(
        self,
        model: torch.nn.Module,
        loss: LossType,
        data: Iterable[Any],
        restrict_to: Mapping[str, Any] | Sequence[str] | None = None,
    ) -> None:
        self.gradient_provider = TorchGradientProvider(model, loss, restrict_to)
        self.data = data
        self.n_samples: int | None = None

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

    def to(self, device: torch.device | str) -> CurvatureOperator:
        self.gradient_provider.to(device)
        return self

    @abstractmethod
    def batch_prod_sum(self, batch: TorchBatch, mat: torch.Tensor) -> torch.Tensor:
        """Σ over the batch's samples of the per-sample curvature times each row of ``mat``."""

    def _record_samples(self, n: int) -> int:
        if self.n_samples is not None and n != self.n_samples:
            raise ValueError(
                f"The data loader yielded {n} samples on this pass but {self.n_samples} "
                "before: the fit data must not change between passes."
            )
        self.n_samples = n
        return n

    def _apply_to_mat(self, mat: torch.Tensor) -> torch.Tensor:
        total = torch.zeros_like(mat)
        n = 0
        for index, batch in enumerate(iterate_batches(self.data)):
            product = self.batch_prod_sum(batch, mat)
            if not all_finite(product):
                raise ValueError(
                    f"Curvature products on batch {index} of the fit data are not finite: the "
                    "loss or its derivatives contain NaN/inf there."
                )
            total += product
            n += len(batch)
        return total / self._record_samples(n)

    def dense(self) -> torch.Tensor:
        """The (P, P) matrix A, in one pass over the data."""
        P = self.input_size
        total = torch.zeros((P, P), dtype=self.dtype, device=self.device)
        n = 0
        for batch in iterate_batches(self.data):
            self._add_dense_batch(batch, total)
            n += len(batch)
        result = total / self._record_samples(n)
        result = 0.5 * (result + result.T)
        if not all_finite(result):
            raise ValueError(
                "The curvature matrix is not finite: the loss or its derivatives on the fit "
                "data contain NaN/inf."
            )
        return result

    def _add_dense_batch(self, batch: TorchBatch, total: torch.Tensor) -> None:
        P = self.input_size
        chunk = max(1, min(P, MAX_SAMPLE_VECTORS // max(1, len(batch))))
        for start in range(0, P, chunk):
            stop = min(P, start + chunk)
            basis = torch.zeros((stop - start, P), dtype=self.dtype, device=self.device)
            basis[:, start:stop] = torch.eye(stop - start, dtype=self.dtype, device=self.device)
            total[start:stop] += self.batch_prod_sum(batch, basis)


class HessianOperator(CurvatureOperator):
    """A = ∇²_θB of the mean loss over the data (reverse-over-reverse products)."""

    def batch_prod_sum(self, batch: TorchBatch, mat: torch.Tensor) -> torch.Tensor:
        return self.gradient_provider.hessian_prod_sum(batch, mat)


class GaussNewtonOperator(CurvatureOperator):
    """A = (1/N) Σᵢ gᵢgᵢᵀ over the data, gᵢ the per-sample gradient of the block."""

    def batch_prod_sum(self, batch: TorchBatch, mat: torch.Tensor) -> torch.Tensor:
        return self.gradient_provider.gauss_newton_prod_sum(batch, mat)

    def _add_dense_batch(self, batch: TorchBatch, total: torch.Tensor) -> None:
        g = self.gradient_provider.flat_grads(batch)
        total += g.T @ g


def curvature_operator(
    mode: SecondOrderMode,
    model: torch.nn.Module,
    loss: LossType,
    data: Iterable[Any],
    restrict_to: Mapping[str, Any] | Sequence[str] | None = None,
) -> CurvatureOperator:
    """The curvature operator for ``mode`` (Hessian or Gauss-Newton)."""
    if mode is SecondOrderMode.HESSIAN:
        return HessianOperator(model, loss, data, restrict_to)
    if mode is SecondOrderMode.GAUSS_NEWTON:
        return GaussNewtonOperator(model, loss, data, restrict_to)
    raise ValueError(
        f"Unknown second order mode {mode!r}; expected one of {list(SecondOrderMode)}."
    )
