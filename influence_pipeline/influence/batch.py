"""TorchBatch and the streaming of (x, y) batches from a data loader."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from .types import Batch


@dataclass(frozen=True)
class TorchBatch(Batch[torch.Tensor]):
    """Inputs ``x`` (N, ...) and targets ``y`` (N, ...) with a common first dimension."""

    x: torch.Tensor
    y: torch.Tensor

    def __post_init__(self) -> None:
        for name, value in (("x", self.x), ("y", self.y)):
            if not isinstance(value, torch.Tensor):
                raise TypeError(
                    f"TorchBatch.{name} must be a torch.Tensor, got {type(value).__name__}."
                )
            if value.ndim == 0:
                raise ValueError(
                    f"TorchBatch.{name} must have a batch dimension, got a 0-d tensor."
                )
        if self.x.shape[0] != self.y.shape[0]:
            raise ValueError(
                "x and y must have the same first (batch) dimension, got "
                f"x.shape={tuple(self.x.shape)} and y.shape={tuple(self.y.shape)}."
            )

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def to(self, device: torch.device | str) -> TorchBatch:
        return TorchBatch(self.x.to(device), self.y.to(device))


def as_batch(item: Any) -> TorchBatch:
    """Read one element of a data loader as a batch: a TorchBatch or an (x, y, ...) sequence."""
    if isinstance(item, TorchBatch):
        return item
    if isinstance(item, (tuple, list)) and len(item) >= 2:
        return TorchBatch(item[0], item[1])
    raise TypeError(
        "A data loader must yield (x, y) pairs of tensors (or TorchBatch), got "
        f"{type(item).__name__}."
    )


def iterate_batches(data: Iterable[Any]) -> Iterator[TorchBatch]:
    """Yield the batches of ``data``; raise ``ValueError`` if it yields none.

    A torch ``DataLoader`` can be iterated many times; a one-shot iterator cannot, which
    methods that stream the data at query time (CG, LiSSA, IHM) would otherwise miss.
    """
    n = 0
    for item in data:
        n += 1
        yield as_batch(item)
    if n == 0:
        raise ValueError(
            "The data loader yielded no batches. Pass a non-empty, re-iterable loader "
            "(a torch DataLoader); a one-shot iterator is empty on its second pass."
        )
