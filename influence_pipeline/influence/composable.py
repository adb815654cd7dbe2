"""TorchComposableInfluence: the torch base of every influence method.

A method only says how to build the inverse-curvature operator of one block
(``_create_block``); this base builds the parameter blocks, validates regularization,
fits every block, and answers queries. Total influences are sums over blocks, so
``influences_from_factors`` contracts the concatenated factors with the concatenated
per-sample gradients of all blocks in one product, and ``influence_factors`` applies each
block's operator to its slice of the same per-sample gradients (one forward and backward
pass per batch for all blocks, not one per block); ``self_influences`` gives ⟨A⁻¹gᵢ, gᵢ⟩
without the N × N matrix.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch

from .batch import TorchBatch
from .blocks import BlockStructure, build_parameter_blocks
from .composition import TorchBlockMapper, TorchOperatorGradientComposition, _check_factors
from .gradient_provider import LossType, TorchGradientProvider
from .influence_model import ComposableInfluence, fit_required
from .regularization import check_regularization
from .state import (
    JSON,
    BlockState,
    FittedState,
    decode_block_structure,
    encode_block_structure,
    loss_name,
    resolve_loss,
)
from .tensor_operator import TensorOperator
from .types import BlockMode, InfluenceMode, SecondOrderMode, UnsupportedInfluenceModeException

RegularizationType = float | Mapping[str, float | None] | None


class TorchComposableInfluence(
    ComposableInfluence[torch.Tensor, TorchBatch, Iterable[Any], TorchBlockMapper], ABC
):
    """Block-wise influence on a torch model.

    Args:
        model: the model (its device and dtype are used for every result).
        block_structure: a :class:`BlockMode` or a mapping block name → parameter names.
        regularization: λ ≥ 0 for every block, or a mapping block → λ | None (blocks not in
            the mapping get none); None means no regularization.
    """

    loss: LossType
    #: Regularization must be positive (methods that cannot invert without damping).
    _requires_positive_regularization = False

    def __init__(
        self,
        model: torch.nn.Module,
        block_structure: BlockStructure = BlockMode.FULL,
        regularization: RegularizationType = None,
    ) -> None:
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}.")
        self.model = model
        self.block_structure = block_structure
        self.parameter_blocks: OrderedDict[str, list[str]] = build_parameter_blocks(
            model, block_structure
        )
        self._regularization_dict = self._build_regularization_dict(regularization)
        self.block_mapper = None

    # ------------------------------------------------------------------ structure
    @property
    def parameter_dict(self) -> OrderedDict[str, dict[str, torch.nn.Parameter]]:
        """Block name → {parameter name: parameter} (pyDVL's attribute)."""
        params = dict(self.model.named_parameters())
        return OrderedDict(
            (block, {n: params[n] for n in names}) for block, names in self.parameter_blocks.items()
        )

    @property
    def block_names(self) -> list[str]:
        return list(self.parameter_blocks)

    @property
    def parameter_names(self) -> list[str]:
        """All parameter names in factor order (blocks in order, parameters within)."""
        return [n for names in self.parameter_blocks.values() for n in names]

    @property
    def block_sizes(self) -> OrderedDict[str, int]:
        params = dict(self.model.named_parameters())
        return OrderedDict(
            (b, sum(params[n].numel() for n in names)) for b, names in self.parameter_blocks.items()
        )

    @property
    def n_parameters(self) -> int:
        return sum(self.block_sizes.values())

    @property
    def model_device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def model_dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def regularization(self) -> dict[str, float | None]:
        return dict(self._regularization_dict)

    # ------------------------------------------------------------------ regularization
    def _validate_regularization(self, block_name: str, value: object) -> float | None:
        return check_regularization(
            value, block=block_name, positive=self._requires_positive_regularization
        )

    def _build_regularization_dict(
        self, regularization: RegularizationType
    ) -> dict[str, float | None]:
        if isinstance(regularization, Mapping):
            unknown = [k for k in regularization if k not in self.parameter_blocks]
            if unknown:
                raise ValueError(
                    f"Regularization given for unknown blocks {unknown}; the blocks are "
                    f"{self.block_names}."
                )
            return {
                b: self._validate_regularization(b, regularization.get(b)) for b in self.block_names
            }
        return {b: self._validate_regularization(b, regularization) for b in self.block_names}

    def with_regularization(self, regularization: RegularizationType) -> TorchComposableInfluence:
        """Set a new λ (float or per-block mapping) without refitting the curvature."""
        new = self._build_regularization_dict(regularization)
        if self.block_mapper is not None:
            for block, value in new.items():
                self.block_mapper[block].op.regularization = value  # type: ignore[attr-defined]
        self._regularization_dict = new
        return self

    # ------------------------------------------------------------------ fitting
    @abstractmethod
    def _create_block(
        self, block_params: list[str], data: Iterable[Any], regularization: float | None
    ) -> TorchOperatorGradientComposition[Any]:
        """The composition of one block fitted on ``data``."""

    def _gradient_provider(self, names: Sequence[str]) -> TorchGradientProvider:
        return TorchGradientProvider(self.model, self.loss, restrict_to=list(names))

    def _create_block_mapper(self, data: Iterable[Any]) -> TorchBlockMapper:
        if data is None or not hasattr(data, "__iter__"):
            raise TypeError(
                f"fit() needs an iterable data loader of (x, y) batches, got {type(data).__name__}."
            )
        blocks: OrderedDict[str, TorchOperatorGradientComposition[TensorOperator]] = OrderedDict()
        for block, names in self.parameter_blocks.items():
            blocks[block] = self._create_block(names, data, self._regularization_dict[block])
        return TorchBlockMapper(blocks)

    def fit(self, data: Iterable[Any]) -> TorchComposableInfluence:
        """Fit the curvature of every block on ``data`` (streamed batch by batch)."""
        self.block_mapper = self._create_block_mapper(data)
        return self

    # ------------------------------------------------------------------ queries
    def _create_batch(self, x: torch.Tensor, y: torch.Tensor) -> TorchBatch:
        return TorchBatch(x, y)

    def _concat(self, tensors: Iterable[torch.Tensor], dim: int) -> torch.Tensor:
        return torch.cat(list(tensors), dim=dim)

    def _flatten_trailing_dim(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.reshape(tensor.shape[0], -1)

    def full_gradient_provider(self) -> TorchGradientProvider:
        """Per-sample gradients of all blocks' parameters, in factor order."""
        return self._gradient_provider(self.parameter_names)

    @fit_required
    def influences_from_factors(
        self,
        z_test_factors: torch.Tensor,
        x: torch.Tensor,
        y: torch.Tensor,
        mode: InfluenceMode = InfluenceMode.Up,
    ) -> torch.Tensor:
        """⟨z_test_factors_i, ∇_θℓ(z_j)⟩ summed over blocks: (N_test, N) in Up mode,
        (N_test, N, *x.shape[1:]) in Perturbation mode."""
        gp = self.full_gradient_provider()
        factors = _check_factors(z_test_factors, gp)
        batch = self._create_batch(x, y)
        if mode is InfluenceMode.Up:
            return factors @ gp.flat_grads(batch).T
        if mode is InfluenceMode.Perturbation:
            return gp.mixed_jacobian_prod(batch, factors).movedim(1, 0)
        raise UnsupportedInfluenceModeException(mode)

    def _block_grads(self, x: torch.Tensor, y: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        """Per-sample gradients of every block, {block: (N, P_block)}, from one forward and
        backward pass over the batch (not one per block)."""
        grads = self.full_gradient_provider().flat_grads(self._create_batch(x, y))
        return self._mapper._split_to_blocks(grads)

    def _apply_blocks(
        self, block_grads: OrderedDict[str, torch.Tensor]
    ) -> OrderedDict[str, torch.Tensor]:
        return OrderedDict(
            (name, composition.op.apply(block_grads[name]))
            for name, composition in self._mapper.items()
        )

    @fit_required
    def influence_factors_by_block(
        self, x: torch.Tensor, y: torch.Tensor
    ) -> OrderedDict[str, torch.Tensor]:
        """The factors of each block, (N, P_block): every block's inverse curvature applied
        to its part of the per-sample gradients, computed in one pass for all blocks."""
        return self._apply_blocks(self._block_grads(x, y))

    @fit_required
    def self_influences(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """⟨A⁻¹∇_θℓ(zᵢ), ∇_θℓ(zᵢ)⟩ for each sample: the diagonal of the symmetric
        influences, shape (N,), without forming the N × N matrix."""
        grads = self._block_grads(x, y)
        factors = self._apply_blocks(grads)
        parts = [(factors[name] * grads[name]).sum(dim=1) for name in grads]
        return torch.stack(parts).sum(dim=0)

    def to(self, device: torch.device | str) -> TorchComposableInfluence:
        self.model = self.model.to(device)
        if self.block_mapper is not None:
            self.block_mapper = self.block_mapper.to(device)
        return self

    # ------------------------------------------------------------------ fitted state
    #: Methods whose operators stream the fit data at query time (CG, LiSSA, IHM).
    _needs_fit_data_at_query = False

    def _config(self) -> dict[str, JSON]:
        """Constructor arguments as JSON (decoded by :meth:`_from_config`)."""
        config: dict[str, JSON] = {
            "regularization": dict(self._regularization_dict),
            "block_structure": encode_block_structure(self.block_structure),
        }
        mode = getattr(self, "second_order_mode", None)
        if isinstance(mode, SecondOrderMode):
            config["second_order_mode"] = mode.value
        return config

    @classmethod
    def _from_config(
        cls, model: torch.nn.Module, loss: LossType, config: Mapping[str, JSON]
    ) -> TorchComposableInfluence:
        kwargs = dict(config)
        if "block_structure" in kwargs:
            kwargs["block_structure"] = decode_block_structure(kwargs["block_structure"])
        if "second_order_mode" in kwargs:
            kwargs["second_order_mode"] = SecondOrderMode(kwargs["second_order_mode"])
        constructor: Any = cls  # each method's own signature: (model, loss, **config)
        return constructor(model, loss, **kwargs)

    def _block_state(
        self, composition: TorchOperatorGradientComposition[Any]
    ) -> tuple[dict[str, JSON], dict[str, torch.Tensor]]:
        """(attributes, tensors) of one fitted block."""
        raise NotImplementedError

    def _restore_block(
        self, block: BlockState, data: Iterable[Any] | None
    ) -> TorchOperatorGradientComposition[Any]:
        raise NotImplementedError

    @fit_required
    def _fitted_state(self) -> FittedState:
        blocks = []
        for name, composition in self._mapper.items():
            attrs, tensors = self._block_state(composition)
            attrs = {"regularization": self._regularization_dict[name], **attrs}
            blocks.append(BlockState(name, list(self.parameter_blocks[name]), attrs, tensors))
        return FittedState(type(self).__name__, self._config(), loss_name(self.loss), blocks)

    @classmethod
    def _from_fitted_state(
        cls,
        state: FittedState,
        model: torch.nn.Module,
        loss: LossType | None,
        data: Iterable[Any] | None,
    ) -> TorchComposableInfluence:
        if loss is None:
            loss = resolve_loss(state.loss)
        instance = cls._from_config(model, loss, state.config)
        if instance.parameter_blocks != OrderedDict(state.block_structure):
            raise ValueError(
                f"The fitted state has blocks {state.block_structure} but the model gives "
                f"{list(instance.parameter_blocks.items())}: it was fitted for another model "
                "or block structure."
            )
        if cls._needs_fit_data_at_query and data is None:
            raise ValueError(
                f"{cls.__name__} streams the fit data at query time: pass the training data "
                "loader to restore it."
            )
        blocks: OrderedDict[str, TorchOperatorGradientComposition[TensorOperator]] = OrderedDict()
        device = instance.model_device
        for block in state.blocks:
            moved = BlockState(
                block.name,
                block.parameters,
                block.attrs,
                {k: t.to(device) for k, t in block.tensors.items()},
            )
            blocks[block.name] = instance._restore_block(moved, data)
        instance._regularization_dict = {
            b.name: b.attrs.get("regularization") for b in state.blocks
        }
        instance.block_mapper = TorchBlockMapper(blocks)
        return instance
