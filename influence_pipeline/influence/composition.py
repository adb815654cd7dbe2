"""TorchOperatorGradientComposition (one block) and TorchBlockMapper (all blocks)."""

from __future__ import annotations

from collections import OrderedDict
from typing import Generic, TypeVar

import torch

from .batch import TorchBatch
from .finite import all_finite
from .gradient_provider import TorchGradientProvider
from .tensor_operator import TensorOperator
from .types import BlockMapper, InfluenceMode, OperatorGradientComposition

TorchOperatorType = TypeVar("TorchOperatorType", bound=TensorOperator)


class TorchOperatorGradientComposition(
    OperatorGradientComposition[torch.Tensor, TorchBatch, TorchOperatorType, TorchGradientProvider],
    Generic[TorchOperatorType],
):
    """An inverse-curvature operator of one block read through that block's gradients."""

    def __init__(self, op: TorchOperatorType, gp: TorchGradientProvider) -> None:
        if op.input_size != gp.n_parameters:
            raise ValueError(
                f"Operator input size {op.input_size} does not match the block's "
                f"{gp.n_parameters} parameters."
            )
        super().__init__(op, gp)

    def to(self, device: torch.device | str) -> TorchOperatorGradientComposition[TorchOperatorType]:
        self.gp = self.gp.to(device)
        self.op = self.op.to(device)  # type: ignore[assignment]
        return self

    def _tensor_inner_product(self, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
        return torch.einsum("ia,j...a->ij...", left, right)

    def _right_interaction_factors(
        self, left_factors: torch.Tensor, right_batch: TorchBatch, mode: InfluenceMode
    ) -> torch.Tensor:
        factors = _check_factors(left_factors, self.gp)
        if mode is InfluenceMode.Up:
            return factors @ self.gp.flat_grads(right_batch).T
        return self.gp.mixed_jacobian_prod(right_batch, factors).movedim(1, 0)


def _check_factors(factors: torch.Tensor, gp: TorchGradientProvider) -> torch.Tensor:
    if not isinstance(factors, torch.Tensor):
        raise TypeError(f"Influence factors must be a torch.Tensor, got {type(factors).__name__}.")
    if factors.ndim == 1:
        factors = factors.unsqueeze(0)
    if factors.ndim != 2 or factors.shape[1] != gp.n_parameters:
        raise ValueError(
            f"Influence factors must have shape (N, {gp.n_parameters}), got {tuple(factors.shape)}."
        )
    if not all_finite(factors):
        raise ValueError("Influence factors contain NaN or inf.")
    return factors.to(device=gp.device, dtype=gp.dtype)


class TorchBlockMapper(
    BlockMapper[torch.Tensor, TorchBatch, TorchOperatorGradientComposition[TensorOperator]]
):
    """Compositions by block name, in block order."""

    def __init__(
        self,
        composable_block_dict: OrderedDict[str, TorchOperatorGradientComposition[TensorOperator]],
    ) -> None:
        super().__init__(composable_block_dict)

    @property
    def block_sizes(self) -> OrderedDict[str, int]:
        return OrderedDict((k, c.op.input_size) for k, c in self.composable_block_dict.items())

    def _split_to_blocks(self, z: torch.Tensor, dim: int = -1) -> OrderedDict[str, torch.Tensor]:
        sizes = self.block_sizes
        total = sum(sizes.values())
        if z.shape[dim] != total:
            raise ValueError(
                f"Influence factors have width {z.shape[dim]} but the blocks "
                f"{dict(sizes)} need {total}."
            )
        return OrderedDict(zip(sizes, torch.split(z, list(sizes.values()), dim=dim), strict=True))

    def to(self, device: torch.device | str) -> TorchBlockMapper:
        self.composable_block_dict = OrderedDict(
            (k, c.to(device)) for k, c in self.composable_block_dict.items()
        )
        return self
