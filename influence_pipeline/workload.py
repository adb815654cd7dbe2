"""What a user supplies to the pipeline: model, loss, training shards, test sets, method.

A :class:`Workload` is plain Python (callables, paths), handed to
``influence_pipeline.definitions.build_definitions(workload)``:

* ``model_factory`` builds the architecture; ``checkpoint`` is a state dict loaded with
  ``torch.load(..., weights_only=True)`` (no pickled objects are executed);
* ``loss(output, target)`` is the training loss (per sample: see the engine conventions);
* ``shards`` is a :class:`ShardSource`: named training shards that may appear over time
  (:class:`DirectoryShards`, one ``.pt`` file of tensors per shard, or
  :class:`InMemoryShards`); a sensor registers new names as Dagster partitions and reports
  each shard's fingerprint so a changed shard is re-scored;
* ``test_sets`` maps a test-set name to a callable returning its tensors;
* ``fit_shards`` names the shards the curvature is fitted on (default: the shards present
  when the definitions are built), so a new shard costs one shard of scoring, not a refit;
* ``method`` holds the defaults of the influence method; the Dagster Launchpad shows them
  as run config and can override them per run.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, TensorDataset

from .influence import (
    ArnoldiInfluence,
    BlockMode,
    CgInfluence,
    DirectInfluence,
    EkfacInfluence,
    InverseHarmonicMeanInfluence,
    LissaInfluence,
    NystroemSketchInfluence,
    SecondOrderMode,
)
from .influence.composable import TorchComposableInfluence
from .influence.gradient_provider import LossType


@dataclass(frozen=True)
class ShardData:
    """The tensors of one training shard or test set: inputs, targets, integer ids."""

    x: torch.Tensor
    y: torch.Tensor
    ids: torch.Tensor

    def __post_init__(self) -> None:
        n = self.x.shape[0]
        if self.y.shape[0] != n or self.ids.shape != (n,):
            raise ValueError(
                f"x, y and ids must have one row per example: x {tuple(self.x.shape)}, "
                f"y {tuple(self.y.shape)}, ids {tuple(self.ids.shape)}."
            )
        if self.ids.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"ids must be integers, got {self.ids.dtype}.")

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def loader(self, batch_size: int) -> DataLoader:
        """Batches of (x, y, ids) in order."""
        return DataLoader(TensorDataset(self.x, self.y, self.ids), batch_size=batch_size)

    def fit_loader(self, batch_size: int) -> DataLoader:
        """Batches of (x, y) in order (for fitting)."""
        return DataLoader(TensorDataset(self.x, self.y), batch_size=batch_size)


class ShardSource:
    """Named training shards that may appear (or change) over time."""

    def names(self) -> list[str]:
        raise NotImplementedError

    def fingerprint(self, name: str) -> str:
        """A cheap fingerprint that changes whenever the shard's data changes."""
        raise NotImplementedError

    def load(self, name: str) -> ShardData:
        raise NotImplementedError

    def size(self, name: str) -> int:
        """Number of examples of a shard."""
        return len(self.load(name))

    def describe(self) -> str:
        return type(self).__name__


class DirectoryShards(ShardSource):
    """One file per shard, ``<directory>/<name>.pt``: a dict of tensors ``x``, ``y`` and
    optionally ``ids`` (default: ``id_offset`` + row), saved with ``torch.save`` and read
    with ``weights_only=True``. The fingerprint is the file's size and modification time
    (cheap to poll every minute); rewriting a shard file changes it."""

    def __init__(self, directory: str | os.PathLike[str], pattern: str = "*.pt") -> None:
        self.directory = Path(directory)
        self.pattern = pattern

    def names(self) -> list[str]:
        if not self.directory.is_dir():
            return []
        return sorted(p.stem for p in self.directory.glob(self.pattern) if p.is_file())

    def path(self, name: str) -> Path:
        path = self.directory / f"{name}.pt"
        if not path.is_file():
            raise ValueError(f"Training shard {name!r} has no file {path}.")
        return path

    def fingerprint(self, name: str) -> str:
        stat = self.path(name).stat()
        return f"{stat.st_size}-{stat.st_mtime_ns}"

    def load(self, name: str) -> ShardData:
        return load_tensor_file(self.path(name))

    def size(self, name: str) -> int:
        content = torch.load(self.path(name), map_location="cpu", weights_only=True, mmap=True)
        return int(content["x"].shape[0])

    def describe(self) -> str:
        return f"DirectoryShards({str(self.directory)!r})"


class InMemoryShards(ShardSource):
    """Shards held in Python (a mapping name → ShardData, or a callable returning one,
    re-evaluated on every poll). The fingerprint hashes the tensors."""

    def __init__(
        self, shards: Mapping[str, ShardData] | Callable[[], Mapping[str, ShardData]]
    ) -> None:
        self._shards = shards

    def _mapping(self) -> Mapping[str, ShardData]:
        return self._shards() if callable(self._shards) else self._shards

    def names(self) -> list[str]:
        return sorted(self._mapping())

    def fingerprint(self, name: str) -> str:
        from .store.provenance import tensors_fingerprint

        data = self.load(name)
        return tensors_fingerprint([("x", data.x), ("y", data.y), ("ids", data.ids)])

    def load(self, name: str) -> ShardData:
        mapping = self._mapping()
        if name not in mapping:
            raise ValueError(f"Unknown training shard {name!r}; known: {sorted(mapping)}.")
        return mapping[name]


def load_tensor_file(path: str | os.PathLike[str], id_offset: int = 0) -> ShardData:
    """Read a ``{"x", "y"[, "ids"]}`` tensor file written by ``torch.save``."""
    content = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(content, Mapping) or "x" not in content or "y" not in content:
        raise ValueError(
            f"{path} must hold a dict with tensors 'x' and 'y' (and optionally 'ids')."
        )
    x, y = content["x"], content["y"]
    ids = content.get("ids")
    if ids is None:
        ids = torch.arange(id_offset, id_offset + x.shape[0])
    return ShardData(x, y, ids.to(torch.int64))


def save_tensor_file(path: str | os.PathLike[str], data: ShardData) -> None:
    """Write a shard or test set atomically (a reader never sees half a file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save({"x": data.x, "y": data.y, "ids": data.ids}, tmp)
    os.replace(tmp, path)


METHODS: dict[str, type[TorchComposableInfluence]] = {
    "direct": DirectInfluence,
    "cg": CgInfluence,
    "lissa": LissaInfluence,
    "arnoldi": ArnoldiInfluence,
    "ekfac": EkfacInfluence,
    "nystroem": NystroemSketchInfluence,
    "ihm": InverseHarmonicMeanInfluence,
}


@dataclass(frozen=True)
class MethodSpec:
    """An influence method and its arguments (the defaults of the Launchpad config).

    ``options`` holds further constructor arguments of the method (e.g. ``rtol`` and
    ``maxiter`` for CG, ``update_diagonal`` for EK-FAC, ``seed`` for the randomised ones).
    """

    method: str = "direct"
    regularization: float | None = 1e-2
    rank: int = 50
    block_structure: str = "full"
    second_order_mode: str = "hessian"
    options: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"Unknown method {self.method!r}; choose one of {sorted(METHODS)}.")
        BlockMode(self.block_structure)
        SecondOrderMode(self.second_order_mode)

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "options": dict(self.options)}

    def digest(self) -> str:
        text = json.dumps(self.to_json(), sort_keys=True, default=str)
        return hashlib.blake2b(text.encode(), digest_size=6).hexdigest()

    def build(self, model: torch.nn.Module, loss: LossType) -> TorchComposableInfluence:
        """The (unfitted) influence model this spec describes."""
        cls = METHODS[self.method]
        options = dict(self.options)
        if cls is EkfacInfluence:
            return EkfacInfluence(
                model,
                update_diagonal=bool(options.pop("update_diagonal", True)),
                hessian_regularization=float(self.regularization or 0.0),
                **options,
            )
        kwargs: dict[str, Any] = {"regularization": self.regularization, **options}
        if cls is not InverseHarmonicMeanInfluence:
            kwargs["second_order_mode"] = SecondOrderMode(self.second_order_mode)
        if cls in (ArnoldiInfluence, NystroemSketchInfluence):
            kwargs["rank"] = self.rank
        constructor: Any = cls  # each method has its own keyword arguments
        return constructor(model, loss, block_structure=BlockMode(self.block_structure), **kwargs)


@dataclass
class Workload:
    """Everything the pipeline needs to know about one model and its data."""

    name: str
    model_factory: Callable[[], torch.nn.Module]
    checkpoint: str | os.PathLike[str] | Callable[[], str | os.PathLike[str]]
    loss: LossType
    shards: ShardSource
    test_sets: Mapping[str, Callable[[], ShardData]]
    method: MethodSpec = field(default_factory=MethodSpec)
    fit_shards: Sequence[str] | None = None
    batch_size: int = 256
    store: str = "influence_store"
    #: Optional ground truth for the audit summary: ids of training examples known to be
    #: mislabeled (the bundled example flips some labels on purpose).
    known_mislabeled: Callable[[], Iterable[int]] | None = None
    description: str = ""

    def __post_init__(self) -> None:
        if not self.test_sets:
            raise ValueError("A workload needs at least one test set.")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {self.batch_size}.")

    def checkpoint_path(self) -> Path:
        value = self.checkpoint() if callable(self.checkpoint) else self.checkpoint
        path = Path(value)
        if not path.is_file():
            raise ValueError(f"The checkpoint {path} of workload {self.name!r} does not exist.")
        return path

    def load_model(self, device: str | torch.device = "cpu") -> torch.nn.Module:
        """The model with the checkpoint's weights, in eval mode, on ``device``."""
        path = self.checkpoint_path()
        model = self.model_factory()
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
            model.load_state_dict(state)
        except Exception as error:
            raise ValueError(
                f"Cannot load the checkpoint {path} into the model: {error}"
            ) from error
        return model.eval().to(device)

    def fit_shard_names(self) -> list[str]:
        names = list(self.fit_shards) if self.fit_shards is not None else self.shards.names()
        if not names:
            raise ValueError(f"Workload {self.name!r} has no training shards to fit on.")
        return names

    def fit_data(self) -> ShardData:
        parts = [self.shards.load(name) for name in self.fit_shard_names()]
        return ShardData(
            torch.cat([p.x for p in parts]),
            torch.cat([p.y for p in parts]),
            torch.cat([p.ids for p in parts]),
        )

    def test_set(self, name: str) -> ShardData:
        if name not in self.test_sets:
            raise ValueError(
                f"Unknown test set {name!r}; the workload has {sorted(self.test_sets)}."
            )
        return self.test_sets[name]()
