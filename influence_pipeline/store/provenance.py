"""Fingerprints and provenance records of stored artifacts.

A fingerprint is a BLAKE2b-128 digest over names, dtypes, shapes and raw bytes of tensors,
in a fixed order: the model fingerprint hashes the state dict (parameters and buffers);
a data fingerprint hashes the (x, y) tensors of every batch of a loader in order. Two
runs on the same weights and data give the same fingerprints on any machine with the same
byte order. :func:`state_digest` is the digest of a fitted influence model's state, the
identity of a block mapper. torch is imported only where a tensor is hashed, so reading a
store needs no torch.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import platform
import sys
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

import influence_pipeline

from .errors import ProvenanceMismatchError

if TYPE_CHECKING:
    import torch


def _is_tensor(value: Any) -> bool:
    """Whether ``value`` is a torch tensor (without importing torch: none can exist
    unless torch is imported)."""
    torch_module = sys.modules.get("torch")
    return torch_module is not None and isinstance(value, torch_module.Tensor)


def _update_with_tensor(h: Any, name: str, tensor: torch.Tensor | np.ndarray) -> None:
    if _is_tensor(tensor):
        import torch

        assert isinstance(tensor, torch.Tensor)
        t = tensor.detach().cpu().contiguous()
        dtype = str(t.dtype)
        if t.dtype == torch.bfloat16:
            t = t.view(torch.int16)
        array = t.numpy()
    else:
        array = np.ascontiguousarray(tensor)
        dtype = str(array.dtype)
    h.update(f"{name}|{dtype}|{tuple(array.shape)}|".encode())
    h.update(array.view(np.uint8).reshape(-1).data if array.size else b"")


def tensors_fingerprint(tensors: Iterable[tuple[str, torch.Tensor | np.ndarray]]) -> str:
    h = hashlib.blake2b(digest_size=16)
    for name, tensor in tensors:
        _update_with_tensor(h, name, tensor)
    return h.hexdigest()


def model_fingerprint(model: torch.nn.Module) -> str:
    """Digest of the model's state dict (names, dtypes, shapes, values)."""
    return tensors_fingerprint(sorted(model.state_dict().items()))


class DataHasher:
    """Incremental fingerprint of (x, y) rows, independent of how they are batched: the
    raw bytes of x and of y are hashed as two streams, then combined with their dtypes,
    per-row shapes and the number of rows."""

    def __init__(self) -> None:
        self._x = hashlib.blake2b(digest_size=16)
        self._y = hashlib.blake2b(digest_size=16)
        self._layout: tuple[str, ...] | None = None
        self.n_rows = 0

    @staticmethod
    def _bytes(tensor: torch.Tensor) -> tuple[str, memoryview]:
        import torch

        t = tensor.detach().cpu().contiguous()
        dtype = str(t.dtype)
        if t.dtype == torch.bfloat16:
            t = t.view(torch.int16)
        array = t.numpy()
        return dtype, array.view(np.uint8).reshape(-1).data

    def update(self, x: torch.Tensor, y: torch.Tensor) -> None:
        x_dtype, x_bytes = self._bytes(x)
        y_dtype, y_bytes = self._bytes(y)
        layout = (x_dtype, str(tuple(x.shape[1:])), y_dtype, str(tuple(y.shape[1:])))
        if self._layout is not None and layout != self._layout:
            raise ValueError(
                f"Batches disagree on dtype or row shape: {layout} after {self._layout}."
            )
        self._layout = layout
        self._x.update(x_bytes)
        self._y.update(y_bytes)
        self.n_rows += int(x.shape[0])

    def hexdigest(self) -> str:
        h = hashlib.blake2b(digest_size=16)
        h.update(f"{self._layout}|{self.n_rows}|".encode())
        h.update(self._x.digest())
        h.update(self._y.digest())
        return h.hexdigest()


def data_fingerprint(batches: Iterable[Any]) -> str:
    """Digest of the (x, y) tensors of every batch, in order."""
    from ..influence.batch import as_batch

    hasher = DataHasher()
    for item in batches:
        batch = as_batch(item)
        hasher.update(batch.x, batch.y)
    return hasher.hexdigest()


def library_versions() -> dict[str, str]:
    import torch
    import zarr

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "zarr": zarr.__version__,
    }


@dataclass
class Provenance:
    """What produced an artifact."""

    model_fingerprint: str
    parameters: list[list[Any]]  # [[name, shape], ...] of the curvature's parameters, factor order
    method: str
    method_config: dict[str, Any]
    block_structure: list[list[Any]]  # [[block, [parameter names]], ...]
    loss: str | None
    data_fingerprints: dict[str, str] = field(default_factory=dict)
    code_version: str = influence_pipeline.__version__
    library_versions: dict[str, str] = field(default_factory=library_versions)
    created_at: str = field(
        default_factory=lambda: _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")
    )

    @classmethod
    def of(cls, influence: Any, **data_fingerprints: str) -> Provenance:
        """The provenance of artifacts computed with a fitted influence model."""
        from ..influence.state import loss_name

        params = dict(influence.model.named_parameters())
        return cls(
            model_fingerprint=model_fingerprint(influence.model),
            parameters=[[n, list(params[n].shape)] for n in influence.parameter_names],
            method=type(influence).__name__,
            method_config=influence._config(),
            block_structure=[[b, list(p)] for b, p in influence.parameter_blocks.items()],
            loss=loss_name(influence.loss),
            data_fingerprints=dict(data_fingerprints),
        )

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, value: Mapping[str, Any]) -> Provenance:
        return cls(**dict(value))

    #: Fields that must agree for artifacts to be combined.
    IDENTITY = ("model_fingerprint", "parameters", "method", "method_config", "block_structure")

    def check_matches(self, other: Provenance, what: str, fields: Iterable[str] = IDENTITY) -> None:
        """Raise :class:`ProvenanceMismatchError` naming every identity field that differs."""
        differences = [
            f"{name}: stored {getattr(self, name)!r}, given {getattr(other, name)!r}"
            for name in fields
            if _normalise(getattr(self, name)) != _normalise(getattr(other, name))
        ]
        if differences:
            raise ProvenanceMismatchError(
                f"{what} was produced by another model, method or block structure:\n  "
                + "\n  ".join(differences)
            )


def _normalise(value: Any) -> Any:
    """JSON round-trip normal form (tuples → lists, int/float keys → str)."""
    import json

    return json.loads(json.dumps(value, sort_keys=True, default=str))


def state_meta(state: Any) -> tuple[dict[str, Any], str]:
    """(JSON description, digest) of a fitted state: the digest covers the description
    and every tensor's bytes."""
    meta = {
        "method": state.method,
        "config": state.config,
        "loss": state.loss,
        "blocks": [
            {
                "name": b.name,
                "parameters": b.parameters,
                "attrs": b.attrs,
                "tensors": sorted(b.tensors),
            }
            for b in state.blocks
        ],
    }
    tensor_digest = tensors_fingerprint(
        (f"{i}/{k}", b.tensors[k]) for i, b in enumerate(state.blocks) for k in sorted(b.tensors)
    )
    digest = hashlib.blake2b(
        (json.dumps(meta, sort_keys=True, default=str) + tensor_digest).encode(), digest_size=16
    ).hexdigest()
    return meta, digest


def _config_key(influence: Any) -> str:
    return json.dumps(influence._config(), sort_keys=True, default=str)


def state_digest(influence: Any) -> str | None:
    """Digest of a fitted influence model's state (as :meth:`InfluenceStore.save_block_mapper`
    records it), or None for an object without one (a stand-in that only computes
    factors). Cached on the object for its current configuration, so a method loaded from
    the store or saved to it is not hashed again."""
    if not hasattr(influence, "_fitted_state") or not hasattr(influence, "_config"):
        return None
    key = _config_key(influence)
    cached = getattr(influence, "_store_state_digest", None)
    if cached is not None and cached[0] == key:
        return str(cached[1])
    from ..influence.state import fitted_state

    _, digest = state_meta(fitted_state(influence))
    remember_digest(influence, digest)
    return digest


def remember_digest(influence: Any, digest: str) -> None:
    # an object without a __dict__ is simply hashed again next time
    with contextlib.suppress(AttributeError):
        influence._store_state_digest = (_config_key(influence), digest)


def loss_name(loss: Any) -> str | None:
    if loss is None:
        return None
    module = getattr(loss, "__module__", None) or type(loss).__module__
    name = getattr(loss, "__qualname__", None) or type(loss).__qualname__
    return f"{module}.{name}"
