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
* ``fit_shards`` names the shards the curvature is fitted on, so a new shard costs one
  shard of scoring, not a refit; they are the block mapper's upstream, so a change of one
  of them shows it stale and refits it. ``None`` fits on every shard: then any shard
  change (or a new shard) refits;
* ``checkpoints`` (optional) lists saved training checkpoints: the audit then ranks by each
  example's mean loss over them (``checkpoint_loss``), cached per shard;
* ``method`` holds the defaults of the influence method; the Dagster Launchpad shows them
  as run config and can override them per run.
"""

from __future__ import annotations

import enum
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


class Method(enum.Enum):
    """The influence methods by name (the Launchpad's and the CLI's choices; member names
    equal their values, since Dagster's config shows and parses enum members by name)."""

    direct = "direct"
    cg = "cg"
    lissa = "lissa"
    arnoldi = "arnoldi"
    ekfac = "ekfac"
    nystroem = "nystroem"
    ihm = "ihm"


class Fisher(enum.Enum):
    """EK-FAC's curvature: per-class passes, labels sampled from the model, or true labels."""

    exact = "exact"
    sampled = "sampled"
    empirical = "empirical"


#: MethodSpec fields that only EK-FAC takes, with their defaults.
_EKFAC_DEFAULTS: dict[str, Any] = {
    "fisher": "exact",
    "fisher_samples": 1,
    "query_rank": None,
    "modules": None,
}


@dataclass(frozen=True)
class MethodInfo:
    """One row of :data:`METHOD_TABLE`: the class and how the pipeline builds and restores it."""

    cls: type[TorchComposableInfluence]
    #: the operator streams the fit data whenever it is applied (restores need the loader)
    streams_fit_data: bool = False
    #: the constructor takes ``rank``
    ranked: bool = False
    #: the constructor takes ``second_order_mode``
    second_order_mode: bool = True


#: The one table of influence methods: name → class, construction and restore needs.
METHOD_TABLE: dict[Method, MethodInfo] = {
    Method.direct: MethodInfo(DirectInfluence),
    Method.cg: MethodInfo(CgInfluence, streams_fit_data=True),
    Method.lissa: MethodInfo(LissaInfluence, streams_fit_data=True),
    Method.arnoldi: MethodInfo(ArnoldiInfluence, ranked=True),
    Method.ekfac: MethodInfo(EkfacInfluence, second_order_mode=False),
    Method.nystroem: MethodInfo(NystroemSketchInfluence, ranked=True),
    Method.ihm: MethodInfo(
        InverseHarmonicMeanInfluence, streams_fit_data=True, second_order_mode=False
    ),
}

#: name → class (a view of :data:`METHOD_TABLE`).
METHODS: Mapping[str, type[TorchComposableInfluence]] = {
    method.value: info.cls for method, info in METHOD_TABLE.items()
}


def method_of_class(class_name: str) -> MethodInfo:
    """The table row of a method class name (as recorded in a fitted state's provenance)."""
    for info in METHOD_TABLE.values():
        if info.cls.__name__ == class_name:
            return info
    raise ValueError(
        f"Unknown influence method class {class_name!r}; known: "
        f"{sorted(i.cls.__name__ for i in METHOD_TABLE.values())}."
    )


def parse_choice(kind: type[enum.Enum], value: Any, argument: str) -> Any:
    """``value`` as a member of the enum ``kind`` (by member or value), or a one-line error
    naming ``argument``, the value and the choices."""
    if isinstance(value, kind):
        return value
    for member in kind:
        if value == member.value:
            return member
    raise ValueError(f"{argument}={value!r} is not one of {', '.join(str(m.value) for m in kind)}.")


@dataclass(frozen=True)
class MethodSpec:
    """An influence method and its arguments (the defaults of the Launchpad config).

    ``options`` holds further constructor arguments of the method (e.g. ``rtol`` and
    ``maxiter`` for CG, ``update_diagonal`` for EK-FAC, ``seed`` for the randomised ones).
    ``method``, ``block_structure`` and ``second_order_mode`` take the enum or its value;
    a bad value, a negative regularization or a rank below 1 is refused here.

    EK-FAC only: ``fisher`` (exact | sampled | empirical) with ``fisher_samples`` labels
    per example for ``sampled``; ``query_rank`` (None: dense (n_test, P) factors; an int
    >= 1: per-layer query factors of that rank in the store) and ``modules`` (layer names;
    None: every supported layer). Another method with a non-default one of these is refused.
    """

    method: str = "direct"
    regularization: float | None = 1e-2
    #: Arnoldi / Nyström rank: 200, from the LDS sweep on the bundled digits (README,
    #: "Attribution quality"): rank 50 cost 0.2-0.3 LDS there. Memory: rank × P numbers.
    rank: int = 200
    block_structure: str = "full"
    second_order_mode: str = "hessian"
    options: Mapping[str, Any] = field(default_factory=dict)
    fisher: str = "exact"
    fisher_samples: int = 1
    query_rank: int | None = None
    modules: Sequence[str] | None = None

    def __post_init__(self) -> None:
        # normalise enums to their values (the JSON form and the digest use plain strings)
        for name, kind in (
            ("method", Method),
            ("block_structure", BlockMode),
            ("second_order_mode", SecondOrderMode),
        ):
            object.__setattr__(self, name, parse_choice(kind, getattr(self, name), name).value)
        if self.regularization is not None and not self.regularization >= 0:
            raise ValueError(f"regularization must be >= 0 or None, got {self.regularization!r}.")
        if self.rank < 1:
            raise ValueError(f"rank must be >= 1, got {self.rank!r}.")
        object.__setattr__(self, "fisher", parse_choice(Fisher, self.fisher, "fisher").value)
        if (
            isinstance(self.fisher_samples, bool)
            or not isinstance(self.fisher_samples, int)
            or self.fisher_samples < 1
        ):
            raise ValueError(
                f"fisher_samples must be an integer >= 1, got {self.fisher_samples!r}."
            )
        if self.query_rank is not None and (
            isinstance(self.query_rank, bool)
            or not isinstance(self.query_rank, int)
            or self.query_rank < 1
        ):
            raise ValueError(
                f"query_rank must be None (dense factors) or an integer >= 1, got "
                f"{self.query_rank!r}."
            )
        if self.modules is not None:
            if isinstance(self.modules, str) or not all(isinstance(m, str) for m in self.modules):
                raise ValueError(
                    f"modules must be None or a list of layer names, got {self.modules!r}."
                )
            object.__setattr__(self, "modules", tuple(self.modules))
        if self.method != Method.ekfac.value:
            given = {
                name: getattr(self, name)
                for name, default in _EKFAC_DEFAULTS.items()
                if getattr(self, name) != default
            }
            if given:
                raise ValueError(
                    f"{', '.join(f'{k}={v!r}' for k, v in given.items())} only apply to "
                    f"method='ekfac', not method={self.method!r}."
                )
        clash = sorted(set(self.options) & {"fisher", "fisher_samples", "modules", "loss"})
        if clash:
            raise ValueError(
                f"options {clash} are MethodSpec fields (fisher=, fisher_samples=, modules=) "
                "or the workload's loss; set them there, not in options."
            )

    @property
    def info(self) -> MethodInfo:
        return METHOD_TABLE[Method(self.method)]

    def to_json(self) -> dict[str, Any]:
        modules = None if self.modules is None else list(self.modules)
        return {**asdict(self), "options": dict(self.options), "modules": modules}

    def digest(self) -> str:
        # EK-FAC fields at their defaults are left out: specs written before they existed
        # keep their digest (and their materializations stay current)
        data = {
            k: v
            for k, v in self.to_json().items()
            if not (k in _EKFAC_DEFAULTS and v == _EKFAC_DEFAULTS[k])
        }
        text = json.dumps(data, sort_keys=True, default=str)
        return hashlib.blake2b(text.encode(), digest_size=6).hexdigest()

    def build(self, model: torch.nn.Module, loss: LossType) -> TorchComposableInfluence:
        """The (unfitted) influence model this spec describes."""
        info = self.info
        options = dict(self.options)
        if info.cls is EkfacInfluence:
            return EkfacInfluence(
                model,
                update_diagonal=bool(options.pop("update_diagonal", True)),
                hessian_regularization=float(self.regularization or 0.0),
                fisher=self.fisher,
                fisher_samples=self.fisher_samples,
                modules=None if self.modules is None else list(self.modules),
                loss=loss,
                **options,
            )
        if info.cls is ArnoldiInfluence:
            # Woodbury by default in the pipeline (pyDVL's default is without): the inverse on
            # the whole space, not only the top-r span (LDS 0.42 -> 0.74 on the bundled digits)
            options.setdefault("use_woodbury", True)
        kwargs: dict[str, Any] = {"regularization": self.regularization, **options}
        if info.second_order_mode:
            kwargs["second_order_mode"] = SecondOrderMode(self.second_order_mode)
        if info.ranked:
            kwargs["rank"] = self.rank
        constructor: Any = info.cls  # each method has its own keyword arguments
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
    #: Optional: ``retrain(x, y, seed)`` trains a fresh model on a training subset the way the
    #: checkpoint was trained; with it the definitions gain the on-demand quality assets
    #: (LDS against retraining, mislabel metrics, the methods comparison).
    retrain: Callable[[torch.Tensor, torch.Tensor, int], torch.nn.Module] | None = None
    #: Optional: ``describe(top_k)`` renders a ``top_k`` table (test_id, kind, rank,
    #: train_id, score) as readable text (the GPT example: each query's most influential
    #: training sequences); influence_table shows it in its preview.
    describe: Callable[[Any], str] | None = None
    #: Optional: the saved training checkpoints (state-dict files, ``weights_only=True``),
    #: earliest first. With them the audit adds each training example's ``checkpoint_loss``
    #: (its mean loss over these checkpoints) and ranks ``suspicion`` by it.
    checkpoints: Callable[[], Sequence[str | os.PathLike[str]]] | None = None

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

    def checkpoint_paths(self) -> list[Path]:
        """The saved training checkpoints (empty without ``checkpoints``); each must exist."""
        if self.checkpoints is None:
            return []
        paths = [Path(p) for p in self.checkpoints()]
        if not paths:
            raise ValueError(f"Workload {self.name!r}: checkpoints() returned no paths.")
        missing = [str(p) for p in paths if not p.is_file()]
        if missing:
            raise ValueError(
                f"Workload {self.name!r}: training checkpoints {missing} do not exist."
            )
        return paths

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
