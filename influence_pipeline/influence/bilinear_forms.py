"""Bilinear forms ⟨Op(u), v⟩ read through a torch operator.

The operators here are (approximations of) symmetric matrices, so the operator is applied
to whichever side has fewer rows. Perturbation-mode products never build the
(N, *x.shape[1:], P) mixed-gradient tensor: the operator is applied to the left gradients
and the right side is differentiated along those K directions
(:meth:`TorchGradientProvider.mixed_jacobian_prod`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, cast

import torch

from .batch import TorchBatch
from .gradient_provider import TorchGradientProvider
from .types import BilinearForm

if TYPE_CHECKING:
    from .low_rank import LowRankOperator
    from .tensor_operator import TensorDictOperator, TensorOperator


def contract(left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """``ia, j...a -> ij...``."""
    if right.ndim == 2:
        return left @ right.T
    return torch.einsum("ia,j...a->ij...", left, right)


class OperatorBilinearForm(BilinearForm[torch.Tensor, TorchBatch, TorchGradientProvider]):
    """⟨Op(u), v⟩ for a :class:`TensorOperator` Op."""

    def __init__(self, operator: TensorOperator) -> None:
        self.operator = operator

    def inner_prod(self, left: torch.Tensor, right: torch.Tensor | None = None) -> torch.Tensor:
        if right is None:
            right = left
        right = right.to(device=self.operator.device, dtype=self.operator.dtype)
        left = left.to(device=self.operator.device, dtype=self.operator.dtype)
        if right.ndim == 2 and right.shape[0] < left.shape[0]:
            return contract(self.operator.apply(right), left).T
        return contract(self.operator.apply(left), right)

    def mixed_grads_inner_prod(
        self,
        left: TorchBatch,
        right: TorchBatch | None,
        gradient_provider: TorchGradientProvider,
    ) -> torch.Tensor:
        factors = self.operator.apply(gradient_provider.flat_grads(left))
        target = left if right is None else right
        return gradient_provider.mixed_jacobian_prod(target, factors).movedim(1, 0)


class DictBilinearForm(OperatorBilinearForm):
    """⟨Op(u), v⟩ for a :class:`TensorDictOperator`, on per-parameter gradient dicts."""

    def __init__(self, operator: TensorDictOperator) -> None:
        super().__init__(operator)

    def grads_inner_prod(
        self,
        left: TorchBatch,
        right: TorchBatch | None,
        gradient_provider: TorchGradientProvider,
    ) -> torch.Tensor:
        operator = cast("TensorDictOperator", self.operator)
        left_grads = gradient_provider.grads(left)
        right_grads = left_grads if right is None else gradient_provider.grads(right)
        n_left = next(iter(left_grads.values())).shape[0]
        n_right = next(iter(right_grads.values())).shape[0]
        if n_left <= n_right:
            transformed = operator.apply_to_dict(left_grads)
            return sum(
                (transformed[k] @ right_grads[k].T for k in transformed),
                start=torch.zeros((), dtype=operator.dtype, device=operator.device),
            )
        transformed = operator.apply_to_dict(right_grads)
        return sum(
            (left_grads[k] @ transformed[k].T for k in transformed),
            start=torch.zeros((), dtype=operator.dtype, device=operator.device),
        )

    def mixed_grads_inner_prod(
        self,
        left: TorchBatch,
        right: TorchBatch | None,
        gradient_provider: TorchGradientProvider,
    ) -> torch.Tensor:
        operator = cast("TensorDictOperator", self.operator)
        transformed = operator.apply_to_dict(gradient_provider.grads(left))
        factors = torch.cat([transformed[n] for n in gradient_provider.param_names], dim=1)
        target = left if right is None else right
        return gradient_provider.mixed_jacobian_prod(target, factors).movedim(1, 0)


class LowRankBilinearForm(OperatorBilinearForm):
    """⟨V diag(1/(D+λ)) Vᵀ u, v⟩ for a low-rank operator V D Vᵀ (V: (P, r)).

    Without the Woodbury correction, Up-mode products only need the r projections
    ⟨∇_θℓ(zᵢ), V_k⟩, computed by r forward-mode products per batch
    (:meth:`TorchGradientProvider.jacobian_prod`) without per-sample gradients.
    """

    def __init__(self, operator: LowRankOperator) -> None:
        super().__init__(operator)

    def grads_inner_prod(
        self,
        left: TorchBatch,
        right: TorchBatch | None,
        gradient_provider: TorchGradientProvider,
    ) -> torch.Tensor:
        op = cast("LowRankOperator", self.operator)
        if op.exact:
            return super().grads_inner_prod(left, right, gradient_provider)
        V = op.low_rank_representation.projections
        inv_d = op.inverse_eigenvalues()
        left_proj = gradient_provider.jacobian_prod(left, V.T)
        right_proj = left_proj if right is None else gradient_provider.jacobian_prod(right, V.T)
        return (left_proj * inv_d) @ right_proj.T
