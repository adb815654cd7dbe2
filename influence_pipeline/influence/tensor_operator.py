"""Operators on torch tensors: the base of every inverse-curvature approximation.

A :class:`TensorOperator` maps a vector (D,) or each row of a matrix (K, D) to its image;
implementations work on the whole matrix at once (one batched product for all right-hand
sides). A :class:`TensorDictOperator` also acts on {parameter name: (K, d)} dictionaries,
which saves flattening per-sample gradients of many parameters.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import TYPE_CHECKING

import torch

from .types import Operator

if TYPE_CHECKING:
    from .bilinear_forms import DictBilinearForm, OperatorBilinearForm


class TensorOperator(Operator[torch.Tensor, "OperatorBilinearForm"], ABC):
    """A linear operator on (D,) vectors or (K, D) matrices of row vectors."""

    @property
    @abstractmethod
    def device(self) -> torch.device: ...

    @property
    @abstractmethod
    def dtype(self) -> torch.dtype: ...

    @abstractmethod
    def to(self, device: torch.device | str) -> TensorOperator: ...

    def _validate_tensor_input(self, tensor: torch.Tensor) -> None:
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"Expected a torch.Tensor, got {type(tensor).__name__}.")
        if tensor.ndim not in (1, 2):
            raise ValueError(
                f"{type(self).__name__} takes a vector (D,) or a matrix (K, D) with "
                f"D={self.input_size}; got a tensor of shape {tuple(tensor.shape)}."
            )
        if tensor.shape[-1] != self.input_size:
            raise ValueError(
                f"{type(self).__name__} expects a trailing dimension of {self.input_size}, "
                f"got shape {tuple(tensor.shape)}."
            )

    def _apply(self, tensor: torch.Tensor) -> torch.Tensor:
        tensor = tensor.to(device=self.device, dtype=self.dtype)
        if tensor.ndim == 1:
            return self._apply_to_vec(tensor)
        return self._apply_to_mat(tensor)

    def _apply_to_vec(self, vec: torch.Tensor) -> torch.Tensor:
        """The image of one vector; by default the matrix path on a single row."""
        return self._apply_to_mat(vec.unsqueeze(0)).squeeze(0)

    @abstractmethod
    def _apply_to_mat(self, mat: torch.Tensor) -> torch.Tensor:
        """The images of the K rows of ``mat`` (K, D), computed together."""

    def as_bilinear_form(self) -> OperatorBilinearForm:
        from .bilinear_forms import OperatorBilinearForm

        return OperatorBilinearForm(self)


class TensorDictOperator(TensorOperator, ABC):
    """An operator that also acts on {name: (K, d_name)} dictionaries."""

    @property
    @abstractmethod
    def input_dict_structure(self) -> dict[str, tuple[int, ...]]:
        """Shape of each entry without the leading batch axis."""

    def apply_to_dict(self, mat: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        structure = self.input_dict_structure
        if set(mat) != set(structure):
            raise ValueError(
                f"Expected a dictionary with keys {sorted(structure)}, got {sorted(mat)}."
            )
        for key, value in mat.items():
            if tuple(value.shape[1:]) != tuple(structure[key]):
                raise ValueError(
                    f"Entry {key!r} has shape {tuple(value.shape)}; expected (K, "
                    f"{', '.join(map(str, structure[key]))})."
                )
        moved = {k: v.to(device=self.device, dtype=self.dtype) for k, v in mat.items()}
        return self._apply_to_dict(moved)

    def _apply_to_dict(self, mat: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Default: flatten, apply, split back."""
        keys = list(self.input_dict_structure)
        sizes = [int(torch.Size(self.input_dict_structure[k]).numel()) for k in keys]
        lead = next(iter(mat.values())).shape[0]
        flat = torch.cat([mat[k].reshape(lead, -1) for k in keys], dim=1)
        out = self._apply_to_mat(flat)
        return {
            k: piece.reshape(lead, *self.input_dict_structure[k])
            for k, piece in zip(keys, torch.split(out, sizes, dim=1), strict=True)
        }

    def as_bilinear_form(self) -> DictBilinearForm:
        from .bilinear_forms import DictBilinearForm

        return DictBilinearForm(self)


class MatrixOperator(TensorOperator):
    """Multiplication by an explicit symmetric matrix M (D, D): rows v ↦ M v."""

    def __init__(self, matrix: torch.Tensor) -> None:
        if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
            raise ValueError(f"Expected a square matrix, got shape {tuple(matrix.shape)}.")
        self.matrix = matrix

    @property
    def input_size(self) -> int:
        return int(self.matrix.shape[0])

    @property
    def device(self) -> torch.device:
        return self.matrix.device

    @property
    def dtype(self) -> torch.dtype:
        return self.matrix.dtype

    def to(self, device: torch.device | str) -> MatrixOperator:
        self.matrix = self.matrix.to(device)
        return self

    def _apply_to_mat(self, mat: torch.Tensor) -> torch.Tensor:
        return mat @ self.matrix.T
