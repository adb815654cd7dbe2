"""Framework-agnostic influence models.

:class:`InfluenceFunctionModel` is the user-facing contract: ``fit`` on training data, then
``influence_factors`` (A⁻¹∇_θℓ(z_test), shape (N_test, P)), ``influences`` and
``influences_from_factors``. :class:`ComposableInfluence` implements it with a
:class:`~influence_pipeline.influence.types.BlockMapper`: one operator-gradient
composition per parameter block, results summed over blocks (block-diagonal curvature),
factors concatenated over blocks in block order.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Callable, Iterable
from functools import wraps
from typing import Any, Generic, TypeVar, cast

from .types import (
    BatchType,
    BlockMapper,
    DataLoaderType,
    InfluenceMode,
    NotFittedException,
    TensorType,
)

F = TypeVar("F", bound=Callable[..., Any])


def fit_required(method: F) -> F:
    """Decorator: raise :class:`NotFittedException` when the model is not fitted."""

    @wraps(method)
    def wrapper(self: InfluenceFunctionModel, *args: Any, **kwargs: Any) -> Any:
        if not self.is_fitted:
            raise NotFittedException(type(self))
        return method(self, *args, **kwargs)

    return cast(F, wrapper)


def _check_xy_pair(x: object, y: object) -> None:
    if x is None and y is not None:
        raise ValueError("Labels y were given without inputs x: pass both x and y, or neither.")
    if x is not None and y is None:
        raise ValueError("Inputs x were given without labels y: pass both x and y, or neither.")


class InfluenceFunctionModel(Generic[TensorType, DataLoaderType], ABC):
    """Fit once on training data, then compute influence factors and influences."""

    fit_required = staticmethod(fit_required)

    @property
    @abstractmethod
    def n_parameters(self) -> int:
        """Number of parameters the curvature is taken over (the factor width P)."""

    @property
    @abstractmethod
    def is_thread_safe(self) -> bool:
        """Whether two threads may query one fitted instance at the same time."""

    @property
    @abstractmethod
    def is_fitted(self) -> bool: ...

    @abstractmethod
    def fit(self, data: DataLoaderType) -> InfluenceFunctionModel:
        """Fit the curvature approximation on ``data``; returns ``self``."""

    @fit_required
    def influence_factors(self, x: TensorType, y: TensorType) -> TensorType:
        """A⁻¹∇_θℓ(xᵢ, yᵢ) for each sample: shape (N, P)."""
        return self._influence_factors(x, y)

    @abstractmethod
    def _influence_factors(self, x: TensorType, y: TensorType) -> TensorType: ...

    @fit_required
    def influences(
        self,
        x_test: TensorType,
        y_test: TensorType,
        x: TensorType | None = None,
        y: TensorType | None = None,
        mode: InfluenceMode = InfluenceMode.Up,
    ) -> TensorType:
        """I[i, j] = ⟨A⁻¹∇_θℓ(z_test_i), ∇_θℓ(z_j)⟩ (Up), shape (N_test, N);
        or ⟨A⁻¹∇_θℓ(z_test_i), ∇_x∇_θℓ(z_j)⟩ (Perturbation), shape (N_test, N, *x.shape[1:]).

        Without ``x`` and ``y`` the test batch is used on both sides (symmetric influences).
        A positive value means up-weighting z_j lowers the loss at z_test_i (it helps).
        """
        _check_xy_pair(x, y)
        return self._influences(x_test, y_test, x, y, mode)

    @abstractmethod
    def _influences(
        self,
        x_test: TensorType,
        y_test: TensorType,
        x: TensorType | None,
        y: TensorType | None,
        mode: InfluenceMode,
    ) -> TensorType: ...

    @abstractmethod
    def influences_from_factors(
        self,
        z_test_factors: TensorType,
        x: TensorType,
        y: TensorType,
        mode: InfluenceMode = InfluenceMode.Up,
    ) -> TensorType:
        """⟨z_test_factors_i, ∇_θℓ(z_j)⟩ (Up) or ⟨·, ∇_x∇_θℓ(z_j)⟩ (Perturbation)."""


BlockMapperType = TypeVar("BlockMapperType", bound=BlockMapper)


class ComposableInfluence(
    InfluenceFunctionModel[TensorType, DataLoaderType],
    Generic[TensorType, BatchType, DataLoaderType, BlockMapperType],
    ABC,
):
    """An influence model built from one operator-gradient composition per block."""

    block_mapper: BlockMapperType | None = None

    @property
    def is_fitted(self) -> bool:
        return self.block_mapper is not None

    def fit(self, data: DataLoaderType) -> ComposableInfluence:
        self.block_mapper = self._create_block_mapper(data)
        return self

    @property
    def _mapper(self) -> BlockMapperType:
        if self.block_mapper is None:
            raise NotFittedException(type(self))
        return self.block_mapper

    @abstractmethod
    def _create_block_mapper(self, data: DataLoaderType) -> BlockMapperType: ...

    @abstractmethod
    def _create_batch(self, x: TensorType, y: TensorType) -> BatchType: ...

    @abstractmethod
    def _concat(self, tensors: Iterable[TensorType], dim: int) -> TensorType: ...

    @abstractmethod
    def _flatten_trailing_dim(self, tensor: TensorType) -> TensorType: ...

    def _batches(
        self,
        x_test: TensorType,
        y_test: TensorType,
        x: TensorType | None,
        y: TensorType | None,
    ) -> tuple[BatchType, BatchType | None]:
        _check_xy_pair(x, y)
        left = self._create_batch(x_test, y_test)
        right = None if x is None else self._create_batch(x, cast(TensorType, y))
        return left, right

    @fit_required
    def influences_by_block(
        self,
        x_test: TensorType,
        y_test: TensorType,
        x: TensorType | None = None,
        y: TensorType | None = None,
        mode: InfluenceMode = InfluenceMode.Up,
    ) -> OrderedDict[str, TensorType]:
        """The influences of each block; their sum is :meth:`influences`."""
        left, right = self._batches(x_test, y_test, x, y)
        return self._mapper.interactions(left, right, mode)

    @fit_required
    def influence_factors_by_block(
        self, x: TensorType, y: TensorType
    ) -> OrderedDict[str, TensorType]:
        """The factors of each block, (N, P_block); concatenated they are the factors."""
        return self._mapper.transformed_grads(self._create_batch(x, y))

    @fit_required
    def influences_from_factors_by_block(
        self,
        z_test_factors: TensorType | OrderedDict[str, TensorType],
        x: TensorType,
        y: TensorType,
        mode: InfluenceMode = InfluenceMode.Up,
    ) -> OrderedDict[str, TensorType]:
        """Per-block influences from precomputed factors (flat (N, P) or a dict by block)."""
        return self._mapper.interactions_from_transformed_grads(
            z_test_factors, self._create_batch(x, y), mode
        )

    def _influence_factors(self, x: TensorType, y: TensorType) -> TensorType:
        per_block = self.influence_factors_by_block(x, y)
        return self._concat((self._flatten_trailing_dim(t) for t in per_block.values()), dim=-1)

    def _influences(
        self,
        x_test: TensorType,
        y_test: TensorType,
        x: TensorType | None,
        y: TensorType | None,
        mode: InfluenceMode,
    ) -> TensorType:
        left, right = self._batches(x_test, y_test, x, y)
        return _sum(self._mapper.generate_interactions(left, right, mode))

    @fit_required
    def influences_from_factors(
        self,
        z_test_factors: TensorType,
        x: TensorType,
        y: TensorType,
        mode: InfluenceMode = InfluenceMode.Up,
    ) -> TensorType:
        return _sum(
            self._mapper.generate_interactions_from_transformed_grads(
                z_test_factors, self._create_batch(x, y), mode
            )
        )


def _sum(tensors: Iterable[TensorType]) -> TensorType:
    iterator = iter(tensors)
    total: Any = next(iterator)
    for tensor in iterator:
        total = total + tensor
    return cast(TensorType, total)
