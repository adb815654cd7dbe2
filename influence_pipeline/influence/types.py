"""Framework-agnostic bases of the composable influence model.

An influence method is decomposed into three parts (the pyDVL design):

* a :class:`GradientProvider` computes per-sample gradients ∇_θ ℓ(z) of a model's loss,
  mixed derivatives ∇_x∇_θ ℓ(z) and Jacobian-vector products, for one parameter block;
* an :class:`Operator` approximates the inverse curvature A⁻¹ of that block;
* a :class:`BilinearForm` reads the operator as ⟨Op(u), v⟩.

An :class:`OperatorGradientComposition` joins an operator with a gradient provider, and a
:class:`BlockMapper` holds one composition per parameter block (block-diagonal curvature:
the influence is the sum over blocks). Nothing here imports a tensor framework; the torch
implementation lives beside this module.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Collection, Generator, Iterable, Iterator
from dataclasses import dataclass
from enum import Enum
from typing import Generic, TypeVar


class InfluenceMode(str, Enum):  # noqa: UP042 - pyDVL's str mixin, same str()/format()
    """Which influence to compute.

    Up: ⟨A⁻¹∇_θℓ(z_test), ∇_θℓ(z)⟩, the effect of up-weighting a training point.
    Perturbation: ⟨A⁻¹∇_θℓ(z_test), ∇_x∇_θℓ(z)⟩, the effect of perturbing its input.
    """

    Up = "up"
    Perturbation = "perturbation"


class BlockMode(Enum):
    """How parameters are grouped into blocks of a block-diagonal curvature.

    FULL: one block of every trainable parameter.
    LAYER_WISE: one block per direct child module that has trainable parameters.
    PARAMETER_WISE: one block per trainable parameter.
    """

    LAYER_WISE = "layer_wise"
    PARAMETER_WISE = "parameter_wise"
    FULL = "full"


class SecondOrderMode(Enum):
    """Which curvature to invert.

    HESSIAN: ∇²_θ of the mean loss over the fit data.
    GAUSS_NEWTON: (1/N) Σᵢ gᵢgᵢᵀ with gᵢ the per-sample loss gradient.
    """

    HESSIAN = "hessian"
    GAUSS_NEWTON = "gauss_newton"


class NotFittedException(ValueError):
    """Raised when an influence model is queried before ``fit``."""

    def __init__(self, cls: type) -> None:
        super().__init__(
            f"{cls.__name__} is not fitted: call fit(data_loader) before computing "
            "influence factors or influences."
        )


class UnsupportedInfluenceModeException(ValueError):
    def __init__(self, mode: object) -> None:
        super().__init__(
            f"Unsupported influence mode {mode!r}; expected one of "
            f"{[m.value for m in InfluenceMode]}."
        )


TensorType = TypeVar("TensorType", bound=Collection)
DataLoaderType = TypeVar("DataLoaderType", bound=Iterable)


@dataclass(frozen=True)
class Batch(Generic[TensorType]):
    """Inputs ``x`` and targets ``y`` of a batch; the first dimension is the sample axis."""

    x: TensorType
    y: TensorType

    def __iter__(self) -> Iterator[TensorType]:
        return iter((self.x, self.y))


BatchType = TypeVar("BatchType", bound=Batch)


class GradientProvider(Generic[BatchType, TensorType], ABC):
    """Per-sample derivatives of ℓ(θ; x, y) = loss(model(x), y) for one parameter block.

    With P the size of the block and N the number of samples in the batch:
    ``flat_grads`` is (N, P), ``flat_mixed_grads`` is (N, *x.shape[1:], P) and
    ``jacobian_prod(batch, g)`` for g of shape (K, P) is (N, K).
    """

    @abstractmethod
    def jacobian_prod(self, batch: BatchType, g: TensorType) -> TensorType:
        """(N, K) matrix of ⟨∇_θℓ(zᵢ), g_k⟩."""

    @abstractmethod
    def flat_grads(self, batch: BatchType) -> TensorType:
        """(N, P) per-sample gradients."""

    @abstractmethod
    def flat_mixed_grads(self, batch: BatchType) -> TensorType:
        """(N, *x.shape[1:], P) per-sample mixed derivatives ∇_x∇_θℓ."""


GradientProviderType = TypeVar("GradientProviderType", bound=GradientProvider)


class BilinearForm(Generic[TensorType, BatchType, GradientProviderType], ABC):
    """A bilinear form ⟨u, v⟩_B; the inner product runs over the trailing dimension."""

    @abstractmethod
    def inner_prod(self, left: TensorType, right: TensorType | None) -> TensorType:
        """For left (N, D) and right (M, ..., D): the (N, M, ...) tensor of ⟨leftᵢ, rightⱼ⟩_B.

        With ``right=None`` the form is evaluated on ``left`` against itself.
        """

    def grads_inner_prod(
        self,
        left: BatchType,
        right: BatchType | None,
        gradient_provider: GradientProviderType,
    ) -> TensorType:
        """⟨∇_θℓ(left), ∇_θℓ(right)⟩_B sample-wise: (N_left, N_right)."""
        left_grads = gradient_provider.flat_grads(left)
        right_grads = left_grads if right is None else gradient_provider.flat_grads(right)
        return self.inner_prod(left_grads, right_grads)

    def mixed_grads_inner_prod(
        self,
        left: BatchType,
        right: BatchType | None,
        gradient_provider: GradientProviderType,
    ) -> TensorType:
        """⟨∇_θℓ(left), ∇_x∇_θℓ(right)⟩_B sample-wise: (N_left, N_right, *x.shape[1:])."""
        left_grads = gradient_provider.flat_grads(left)
        right_mixed = gradient_provider.flat_mixed_grads(left if right is None else right)
        return self.inner_prod(left_grads, right_mixed)


BilinearFormType = TypeVar("BilinearFormType", bound=BilinearForm)


class Operator(Generic[TensorType, BilinearFormType], ABC):
    """A linear operator on vectors of size ``input_size`` (a vector or rows of a matrix)."""

    @property
    @abstractmethod
    def input_size(self) -> int:
        """Size of the trailing dimension the operator accepts."""

    @abstractmethod
    def _validate_tensor_input(self, tensor: TensorType) -> None:
        """Raise ``ValueError`` when ``tensor`` cannot be given to the operator."""

    def apply(self, tensor: TensorType) -> TensorType:
        """Apply the operator to a vector (D,) or to each row of a matrix (K, D)."""
        self._validate_tensor_input(tensor)
        return self._apply(tensor)

    @abstractmethod
    def _apply(self, tensor: TensorType) -> TensorType: ...

    @abstractmethod
    def as_bilinear_form(self) -> BilinearFormType:
        """The form ⟨Op(u), v⟩."""


OperatorType = TypeVar("OperatorType", bound=Operator)


class OperatorGradientComposition(
    Generic[TensorType, BatchType, OperatorType, GradientProviderType]
):
    """An operator read through the gradients of one parameter block."""

    def __init__(self, op: OperatorType, gp: GradientProviderType) -> None:
        self.op = op
        self.gp = gp

    @abstractmethod
    def _tensor_inner_product(self, left: TensorType, right: TensorType) -> TensorType:
        """Contract the trailing dimension: ``ia, j...a -> ij...``."""

    @abstractmethod
    def _right_interaction_factors(
        self, left_factors: TensorType, right_batch: BatchType, mode: InfluenceMode
    ) -> TensorType:
        """⟨left_factors, derivative of ℓ(right_batch)⟩ for the given mode."""

    def interactions(
        self, left_batch: BatchType, right_batch: BatchType | None, mode: InfluenceMode
    ) -> TensorType:
        """⟨Op(∇_θℓ(left)), ∇_θℓ(right)⟩ (Up) or ⟨Op(∇_θℓ(left)), ∇_x∇_θℓ(right)⟩
        (Perturbation); ``right_batch=None`` means the left batch against itself."""
        form = self.op.as_bilinear_form()
        if mode is InfluenceMode.Up:
            return form.grads_inner_prod(left_batch, right_batch, self.gp)
        if mode is InfluenceMode.Perturbation:
            return form.mixed_grads_inner_prod(left_batch, right_batch, self.gp)
        raise UnsupportedInfluenceModeException(mode)

    def transformed_grads(self, batch: BatchType) -> TensorType:
        """Op(∇_θℓ(batch)): the influence factors of this block, (N, P)."""
        return self.op.apply(self.gp.flat_grads(batch))

    def interactions_from_transformed_grads(
        self, left_factors: TensorType, right_batch: BatchType, mode: InfluenceMode
    ) -> TensorType:
        """⟨left_factors, ∇_θℓ(right)⟩ (Up) or ⟨left_factors, ∇_x∇_θℓ(right)⟩ (Perturbation)."""
        if mode not in (InfluenceMode.Up, InfluenceMode.Perturbation):
            raise UnsupportedInfluenceModeException(mode)
        return self._right_interaction_factors(left_factors, right_batch, mode)


CompositionType = TypeVar("CompositionType", bound=OperatorGradientComposition)


class BlockMapper(Generic[TensorType, BatchType, CompositionType], ABC):
    """One composition per parameter block, in block order; results are per block."""

    def __init__(self, composable_block_dict: OrderedDict[str, CompositionType]) -> None:
        self.composable_block_dict = composable_block_dict

    def __getitem__(self, item: str) -> CompositionType:
        return self.composable_block_dict[item]

    def items(self) -> Iterable[tuple[str, CompositionType]]:
        return self.composable_block_dict.items()

    def keys(self) -> Iterable[str]:
        return self.composable_block_dict.keys()

    @abstractmethod
    def _split_to_blocks(self, z: TensorType, dim: int = -1) -> OrderedDict[str, TensorType]:
        """Split a tensor concatenated over blocks into one tensor per block."""

    def _to_ordered_dict(self, tensors: Iterable[TensorType]) -> OrderedDict[str, TensorType]:
        return OrderedDict(zip(self.composable_block_dict.keys(), tensors, strict=True))

    def transformed_grads(self, batch: BatchType) -> OrderedDict[str, TensorType]:
        return self._to_ordered_dict(self.generate_transformed_grads(batch))

    def interactions(
        self, left_batch: BatchType, right_batch: BatchType | None, mode: InfluenceMode
    ) -> OrderedDict[str, TensorType]:
        return self._to_ordered_dict(self.generate_interactions(left_batch, right_batch, mode))

    def interactions_from_transformed_grads(
        self,
        left_factors: TensorType | OrderedDict[str, TensorType],
        right_batch: BatchType,
        mode: InfluenceMode,
    ) -> OrderedDict[str, TensorType]:
        return self._to_ordered_dict(
            self.generate_interactions_from_transformed_grads(left_factors, right_batch, mode)
        )

    def generate_transformed_grads(self, batch: BatchType) -> Generator[TensorType, None, None]:
        for composition in self.composable_block_dict.values():
            yield composition.transformed_grads(batch)

    def generate_interactions(
        self, left_batch: BatchType, right_batch: BatchType | None, mode: InfluenceMode
    ) -> Generator[TensorType, None, None]:
        for composition in self.composable_block_dict.values():
            yield composition.interactions(left_batch, right_batch, mode)

    def generate_interactions_from_transformed_grads(
        self,
        left_factors: TensorType | OrderedDict[str, TensorType],
        right_batch: BatchType,
        mode: InfluenceMode,
    ) -> Generator[TensorType, None, None]:
        if isinstance(left_factors, dict):
            missing = [k for k in self.composable_block_dict if k not in left_factors]
            if missing:
                raise ValueError(
                    f"Influence factors are missing blocks {missing}; "
                    f"expected blocks {list(self.composable_block_dict)}."
                )
            factors = left_factors
        else:
            factors = self._split_to_blocks(left_factors)
        for name, composition in self.composable_block_dict.items():
            yield composition.interactions_from_transformed_grads(factors[name], right_batch, mode)
