"""The fitted state of an influence model as JSON attributes plus named tensors.

``fitted_state(influence)`` describes a fitted :class:`TorchComposableInfluence` without
pickle: the method's constructor configuration (JSON), and per block its parameter names,
operator attributes (JSON) and operator tensors (the dense curvature of Direct, the
low-rank factors of Arnoldi/Nyström, EK-FAC's eigenbases and eigenvalues, a CG
preconditioner's tensors). ``restore_influence(state, model, loss, data)`` rebuilds an
equivalent fitted model: same tensors, so the same influences bit for bit on the same
device. Methods that stream the fit data at query time (CG, LiSSA, inverse harmonic mean)
need that data loader again.
"""

from __future__ import annotations

import importlib
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from .types import BlockMode, SecondOrderMode

JSON = Any


@dataclass
class BlockState:
    name: str
    parameters: list[str]
    attrs: dict[str, JSON]
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class FittedState:
    method: str
    config: dict[str, JSON]
    loss: str | None
    blocks: list[BlockState]

    @property
    def block_structure(self) -> list[tuple[str, list[str]]]:
        return [(b.name, list(b.parameters)) for b in self.blocks]


def encode_block_structure(structure: object) -> JSON:
    if isinstance(structure, BlockMode):
        return structure.value
    assert isinstance(structure, Mapping)
    return [[str(k), list(v)] for k, v in structure.items()]


def decode_block_structure(value: JSON) -> BlockMode | OrderedDict[str, list[str]]:
    if isinstance(value, str):
        return BlockMode(value)
    return OrderedDict((str(k), list(v)) for k, v in value)


def encode_mode(mode: SecondOrderMode) -> str:
    return mode.value


def loss_name(loss: Callable[..., Any] | None) -> str | None:
    if loss is None:
        return None
    module = getattr(loss, "__module__", None) or type(loss).__module__
    name = getattr(loss, "__qualname__", None) or type(loss).__qualname__
    return f"{module}.{name}"


def resolve_loss(name: str | None) -> Callable[..., Any]:
    """A loss recorded by name, if it is a function of ``torch.nn.functional``."""
    if name and name.startswith("torch.nn.functional."):
        attr = name.rsplit(".", 1)[1]
        function = getattr(importlib.import_module("torch.nn.functional"), attr, None)
        if callable(function):
            return function
    raise ValueError(
        f"The fitted state was made with the loss {name!r}; pass that loss to restore it "
        "(only torch.nn.functional losses are resolved by name)."
    )


def fitted_state(influence: Any) -> FittedState:
    """The fitted state of ``influence`` (raises NotFittedException when not fitted)."""
    return influence._fitted_state()


def restore_influence(
    state: FittedState,
    model: torch.nn.Module,
    loss: Callable[..., Any] | None = None,
    data: Iterable[Any] | None = None,
) -> Any:
    """Rebuild a fitted influence model of ``state.method`` on ``model``."""
    from . import methods

    cls = getattr(methods, state.method, None)
    if cls is None or not hasattr(cls, "_from_fitted_state"):
        raise ValueError(f"Unknown influence method {state.method!r} in the fitted state.")
    return cls._from_fitted_state(state, model, loss, data)
