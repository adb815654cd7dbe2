"""InfluenceStore: the Zarr layout of the package docstring, its writers and guards."""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import zarr
from zarr.codecs import Crc32cCodec

from ..influence.batch import TorchBatch
from ..influence.state import BlockState, FittedState, fitted_state, restore_influence
from ..influence.types import InfluenceMode
from .errors import (
    IncompleteArtifactError,
    ProvenanceMismatchError,
    StoreCorruptionError,
    StoreError,
)
from .location import StoreLocation
from .provenance import DataHasher, Provenance, model_fingerprint, tensors_fingerprint

#: Target size of one chunk of factors and fitted tensors.
CHUNK_BYTES = 4 << 20
#: Target size of one chunk of scores; a column block (the unit a training shard owns) is
#: one chunk wide, and a shard writer buffers one column block (n_test × width float32).
SCORE_CHUNK_BYTES = 8 << 20

_NAME = re.compile(r"^[A-Za-z0-9_.=-][A-Za-z0-9_.=@+-]*$")


def _check_name(kind: str, name: str) -> str:
    if not isinstance(name, str) or not _NAME.match(name) or name in (".", ".."):
        raise StoreError(
            f"Invalid {kind} name {name!r}: use letters, digits and . _ - = @ + (no '/')."
        )
    return name


def _checksum_codecs() -> list[Any]:
    return [Crc32cCodec()]


@dataclass(frozen=True)
class ShardSpec:
    """A training shard to allocate in a scores array: its name and number of rows."""

    name: str
    n_rows: int


@dataclass(frozen=True)
class ShardResult:
    test_set: str
    shard: str
    n_rows: int
    columns: tuple[int, int]
    data_fingerprint: str
    seconds: float
    score_min: float
    score_max: float


def _split_item(item: Any) -> tuple[torch.Tensor, torch.Tensor, Any]:
    """(x, y, ids or None) of a loader element."""
    if isinstance(item, TorchBatch):
        return item.x, item.y, None
    if isinstance(item, (tuple, list)) and len(item) in (2, 3):
        TorchBatch(item[0], item[1])  # validates types and lengths
        return item[0], item[1], item[2] if len(item) == 3 else None
    raise TypeError(
        "A loader for the store must yield (x, y) or (x, y, ids) tuples, got "
        f"{type(item).__name__}."
    )


def _as_ids(ids: Any, n: int, what: str) -> np.ndarray:
    array = np.asarray(ids.cpu() if isinstance(ids, torch.Tensor) else ids)
    if array.shape != (n,) or not np.issubdtype(array.dtype, np.integer):
        raise StoreError(
            f"{what} must be {n} integer ids, got an array of shape {array.shape} and dtype "
            f"{array.dtype}."
        )
    return array.astype(np.int64)


class InfluenceStore:
    """One store per workload (see the package docstring for the layout and the rules).

    Args:
        root: a local path or an fsspec URL.
        mode: ``"r"`` (the store must exist), ``"a"`` (create if missing).
        storage_options: passed to fsspec (credentials of an object store, ...).
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        mode: str = "a",
        storage_options: dict[str, Any] | None = None,
    ) -> None:
        if mode not in ("r", "a"):
            raise StoreError(f"mode must be 'r' or 'a', got {mode!r}.")
        self.location = StoreLocation(root, storage_options)
        self.mode = mode
        if mode == "r" and not self.location.exists():
            raise StoreError(f"No influence store at {self.location.url!r}.")
        self.root = self.location.open_group("r" if mode == "r" else "a")
        if mode == "a" and "layout" not in self.root.attrs:
            self.root.attrs.update({"layout": "influence_pipeline/1"})

    def __repr__(self) -> str:
        return f"InfluenceStore({self.location.url!r}, mode={self.mode!r})"

    @property
    def url(self) -> str:
        return self.location.url

    def _writable(self) -> None:
        if self.mode == "r":
            raise StoreError(f"{self!r} is read-only.")

    def _array(self, path: str) -> zarr.Array:
        try:
            node = zarr.open_array(
                self.location.zarr_store(read_only=self.mode == "r"),
                path=path,
                mode="r" if self.mode == "r" else "r+",
            )
        except (FileNotFoundError, KeyError, zarr.errors.ArrayNotFoundError) as error:
            raise StoreError(f"No array {path!r} in {self!r}.") from error
        return node

    def _exists(self, path: str) -> bool:
        try:
            zarr.open_array(self.location.zarr_store(read_only=True), path=path, mode="r")
            return True
        except Exception:
            return False

    # ================================================================== block mapper
    def save_block_mapper(self, influence: Any, *, fit_data_fingerprint: str | None = None) -> str:
        """Persist a fitted influence model; returns the digest of its fitted state.

        A new version is written beside the old one and becomes current only once
        complete, so a failed save loses nothing.
        """
        self._writable()
        state = fitted_state(influence)
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
            (f"{i}/{k}", b.tensors[k])
            for i, b in enumerate(state.blocks)
            for k in sorted(b.tensors)
        )
        digest = hashlib.blake2b(
            (json.dumps(meta, sort_keys=True, default=str) + tensor_digest).encode(), digest_size=16
        ).hexdigest()
        provenance = Provenance.of(
            influence, **({"fit": fit_data_fingerprint} if fit_data_fingerprint else {})
        )
        group = self.root.require_group("block_mapper")
        version = f"v-{digest}"
        existing = group.get(version)
        if existing is None or not existing.attrs.get("complete", False):
            vgroup = group.create_group(
                version, overwrite=True, attributes={"state": meta, "complete": False}
            )
            for i, block in enumerate(state.blocks):
                for name, tensor in block.tensors.items():
                    data = tensor.detach().cpu().contiguous().numpy()
                    vgroup.create_array(
                        f"b{i}/{name}",
                        data=data,
                        chunks=_row_chunks(data.shape, data.dtype.itemsize),
                        compressors=_checksum_codecs(),
                        dimension_names=tuple(f"dim_{d}" for d in range(data.ndim)),
                    )
            self.location.sync_tree(f"block_mapper/{version}")
            vgroup.attrs["complete"] = True
        group.attrs.update(
            {"current": version, "digest": digest, "provenance": provenance.to_json()}
        )
        return digest

    def block_mapper_info(self) -> dict[str, Any] | None:
        """Digest and provenance of the current block mapper, or None."""
        group = self.root.get("block_mapper")
        if group is None or "current" not in group.attrs:
            return None
        return _attrs(group)

    def load_block_mapper(
        self, model: torch.nn.Module, loss: Any = None, data: Iterable[Any] | None = None
    ) -> Any:
        """The stored fitted influence model, restored onto ``model``.

        Raises :class:`ProvenanceMismatchError` when ``model`` has other parameter names,
        shapes or weights than the model it was fitted for.
        """
        info = self.block_mapper_info()
        if info is None:
            raise StoreError(f"{self!r} holds no fitted block mapper.")
        provenance = Provenance.from_json(info["provenance"])
        params = dict(model.named_parameters())
        stored = {name: shape for name, shape in provenance.parameters}
        given = {name: list(params[name].shape) for name in stored if name in params}
        if set(stored) - set(params):
            raise ProvenanceMismatchError(
                f"The block mapper was fitted for parameters {sorted(stored)}; the model lacks "
                f"{sorted(set(stored) - set(params))}."
            )
        if given != stored:
            raise ProvenanceMismatchError(
                f"The block mapper was fitted for parameter shapes {stored}, the model has {given}."
            )
        fingerprint = model_fingerprint(model)
        if fingerprint != provenance.model_fingerprint:
            raise ProvenanceMismatchError(
                "The block mapper was fitted for a model with other weights (fingerprint "
                f"{provenance.model_fingerprint}, this model {fingerprint})."
            )
        meta: dict[str, Any] = _attrs(self.root[f"block_mapper/{info['current']}"])["state"]
        blocks = []
        for i, block in enumerate(meta["blocks"]):
            tensors = {
                name: torch.from_numpy(
                    np.asarray(self._read(f"block_mapper/{info['current']}/b{i}/{name}", ...))
                )
                for name in block["tensors"]
            }
            blocks.append(BlockState(block["name"], block["parameters"], block["attrs"], tensors))
        state = FittedState(meta["method"], meta["config"], meta["loss"], blocks)
        return restore_influence(state, model, loss, data)

    # ================================================================== reading with checks
    def _read(self, path: str, selection: Any) -> np.ndarray:
        """``array[selection]``; checksum or decoding failures name the array and chunk."""
        array = self._array(path)
        try:
            if isinstance(selection, tuple) and any(
                isinstance(s, (list, np.ndarray)) for s in selection
            ):
                return np.asarray(array.get_orthogonal_selection(selection))
            return np.asarray(array[selection])
        except (ValueError, RuntimeError, OSError) as error:
            if not _looks_like_corruption(error):
                raise
            raise StoreCorruptionError(
                f"Array {path!r} in {self.url!r} is corrupted at {_locate_bad_chunk(array)}: "
                f"{error}"
            ) from error

    # ================================================================== factors
    def _factors_marker(self, test_set: str) -> str:
        return f"_status/factors/{test_set}.json"

    def write_factors(
        self,
        test_set: str,
        influence: Any,
        loader: Iterable[Any],
        *,
        ids: Sequence[int] | np.ndarray | None = None,
        dtype: str = "float32",
        n_rows: int | None = None,
        annotations: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Compute and store the influence factors of a test set, streaming ``loader``
        batch by batch (memory: one batch of gradients). ``loader`` yields (x, y) or
        (x, y, ids); ids default to ``ids`` or 0..n-1. ``annotations`` (JSON) are kept in
        the completion record. Returns the completion record."""
        self._writable()
        _check_name("test set", test_set)
        if dtype not in ("float32", "float64"):
            raise StoreError(f"Factors are stored as float32 or float64, not {dtype!r}.")
        start_time = time.perf_counter()
        provenance = Provenance.of(influence)
        self._check_against_block_mapper(provenance)
        P = int(influence.n_parameters)
        self.location.delete(self._factors_marker(test_set))
        group = self.root.require_group("factors").require_group(test_set)
        itemsize = np.dtype(dtype).itemsize
        cols = min(P, max(1, CHUNK_BYTES // itemsize))
        rows = max(1, CHUNK_BYTES // (itemsize * cols))
        if n_rows is None and hasattr(loader, "dataset"):
            try:
                n_rows = len(loader.dataset)  # a size hint saves resizing
            except TypeError:
                n_rows = None
        values = group.create_array(
            "values",
            shape=(n_rows or 0, P),
            dtype=dtype,
            chunks=(rows, cols),
            fill_value=np.nan,
            compressors=_checksum_codecs(),
            dimension_names=("test", "parameter"),
            overwrite=True,
        )
        hasher = DataHasher()
        factor_hasher = hashlib.blake2b(digest_size=16)  # of the values as written, in order
        collected_ids: list[np.ndarray] = []
        row = 0
        for item in loader:
            x, y, batch_ids = _split_item(item)
            factors = influence.influence_factors(x, y)
            if not bool(torch.isfinite(factors).all()):
                raise ValueError(
                    f"Influence factors of test set {test_set!r} at rows {row}..{row + len(x) - 1} "
                    "are not finite; nothing was marked complete."
                )
            hasher.update(x, y)
            block = factors.detach().to("cpu", getattr(torch, dtype)).numpy()
            if row + len(block) > values.shape[0]:
                values.resize((max(row + len(block), 2 * values.shape[0]), P))
            values[row : row + len(block)] = block
            factor_hasher.update(np.ascontiguousarray(block).view(np.uint8).reshape(-1).data)
            if batch_ids is not None:
                collected_ids.append(_as_ids(batch_ids, len(block), "Batch ids"))
            row += len(block)
        if row == 0:
            raise StoreError(f"The loader of test set {test_set!r} yielded no rows.")
        if values.shape[0] != row:
            values.resize((row, P))
        if ids is not None:
            test_ids = _as_ids(ids, row, f"ids of test set {test_set!r}")
        elif collected_ids:
            test_ids = np.concatenate(collected_ids)
        else:
            test_ids = np.arange(row, dtype=np.int64)
        if len(np.unique(test_ids)) != row:
            raise StoreError(f"Test ids of {test_set!r} are not unique.")
        group.create_array(
            "ids",
            data=test_ids,
            compressors=_checksum_codecs(),
            dimension_names=("test",),
            overwrite=True,
        )
        provenance.data_fingerprints["test_set"] = hasher.hexdigest()
        factors_fp = factor_hasher.hexdigest()
        record = {
            "n_rows": row,
            "n_parameters": P,
            "dtype": dtype,
            "data_fingerprint": hasher.hexdigest(),
            "factors_fingerprint": factors_fp,
            "seconds": time.perf_counter() - start_time,
            **(annotations or {}),
        }
        group.attrs.update({"provenance": provenance.to_json(), **record})
        self.location.sync_tree(f"factors/{test_set}")
        record = {**record, "provenance": provenance.to_json()}
        self.location.write_json(self._factors_marker(test_set), record)
        return record

    def _check_against_block_mapper(self, provenance: Provenance) -> None:
        info = self.block_mapper_info()
        if info is not None:
            Provenance.from_json(info["provenance"]).check_matches(
                provenance, "The stored block mapper"
            )

    def test_sets(self) -> list[str]:
        group = self.root.get("factors")
        return sorted(group.group_keys()) if isinstance(group, zarr.Group) else []

    def factors_record(self, test_set: str) -> dict[str, Any]:
        """The completion record of a test set's factors; raises if missing or incomplete."""
        self._known_test_set(test_set)
        record = self.location.read_json(self._factors_marker(test_set))
        if record is None:
            raise IncompleteArtifactError(f"The factors of test set {test_set!r} are not complete.")
        return record

    def _known_test_set(self, test_set: str) -> None:
        if test_set not in self.test_sets():
            raise StoreError(f"Unknown test set {test_set!r}; the store has {self.test_sets()}.")

    def read_factors(self, test_set: str) -> tuple[np.ndarray, np.ndarray]:
        """(factors (n_test, P), test ids (n_test,)) of a complete test set."""
        self.factors_record(test_set)
        return (
            self._read(f"factors/{test_set}/values", ...),
            self._read(f"factors/{test_set}/ids", ...),
        )

    def test_ids(self, test_set: str) -> np.ndarray:
        self._known_test_set(test_set)
        return self._read(f"factors/{test_set}/ids", ...)

    # ================================================================== scores: allocation
    def _scores_path(self, test_set: str, mode: InfluenceMode = InfluenceMode.Up) -> str:
        prefix = "scores" if mode is InfluenceMode.Up else "scores_perturbation"
        return f"{prefix}/{test_set}"

    def allocation(self, test_set: str) -> dict[str, Any]:
        """{"shard_width": W, "shards": {name: {"start", "stop", "n_rows"}}, "order": [...]}."""
        self._known_test_set(test_set)
        if not self._exists(self._scores_path(test_set)):
            return {"shard_width": None, "shards": {}, "order": []}
        attrs = _attrs(self._array(self._scores_path(test_set)))
        return {
            "shard_width": attrs["shard_width"],
            "shards": dict(attrs["shards"]),
            "order": list(attrs["order"]),
        }

    def allocate_shards(
        self,
        test_set: str,
        shards: Sequence[ShardSpec],
        *,
        shard_width: int | None = None,
        input_shape: Sequence[int] | None = None,
    ) -> dict[str, Any]:
        """Create the scores array of a test set (once) and give every new training shard
        its column range: whole column blocks of ``shard_width`` columns (one chunk wide),
        in the order given.
        A shard that grew beyond its range gets a new range at the end.

        Call from one process before fanning out shard writers. ``input_shape`` (the shape
        of one input x) also allocates the perturbation scores array.
        """
        self._writable()
        record = self.factors_record(test_set)
        n_test = int(record["n_rows"])
        names = [_check_name("shard", s.name) for s in shards]
        if len(set(names)) != len(names):
            raise StoreError(f"Shard names repeat in {names}.")
        for spec in shards:
            if spec.n_rows < 1:
                raise StoreError(
                    f"Shard {spec.name!r} has {spec.n_rows} rows; shards need at least one."
                )
        with self.location.lock():
            path = self._scores_path(test_set)
            if self._exists(path):
                array = self._array(path)
                if array.shape[0] != n_test:
                    raise ProvenanceMismatchError(
                        f"The scores of {test_set!r} have {array.shape[0]} test rows but its "
                        f"factors {n_test}: recompute the scores."
                    )
                attrs = _attrs(array)
                width = int(attrs["shard_width"])
                allocation = dict(attrs["shards"])
                order = list(attrs["order"])
            else:
                width = shard_width or _default_block_width(n_test, [s.n_rows for s in shards])
                row_chunk = min(n_test, max(1, SCORE_CHUNK_BYTES // (4 * width)))
                array = self.root.require_group("scores").create_array(
                    test_set,
                    shape=(n_test, 0),
                    dtype="float32",
                    chunks=(row_chunk, width),
                    fill_value=np.nan,
                    compressors=_checksum_codecs(),
                    dimension_names=("test", "train"),
                    attributes={"shard_width": width, "shards": {}, "order": []},
                )
                allocation, order = {}, []
            n_columns = int(array.shape[1])
            for spec in shards:
                current = allocation.get(spec.name)
                if current is not None and spec.n_rows <= current["stop"] - current["start"]:
                    current["n_rows"] = spec.n_rows
                    continue
                slots = math.ceil(spec.n_rows / width)
                allocation[spec.name] = {
                    "start": n_columns,
                    "stop": n_columns + slots * width,
                    "n_rows": spec.n_rows,
                }
                if spec.name not in order:
                    order.append(spec.name)
                n_columns += slots * width
                for mode in InfluenceMode:
                    self.location.delete(self._shard_marker(test_set, spec.name, mode))
            if n_columns != array.shape[1]:
                array.resize((n_test, n_columns))
            for prefix in ("topk", "train_stats"):  # parents of the shard writers' groups
                self.root.require_group(prefix).require_group(test_set)
            array.attrs.update({"shard_width": width, "shards": allocation, "order": order})
            self._allocate_perturbation(
                test_set,
                n_test,
                n_columns,
                width,
                None if input_shape is None else tuple(input_shape),
            )
            return {"shard_width": width, "shards": allocation, "order": order}

    def _allocate_perturbation(
        self,
        test_set: str,
        n_test: int,
        n_columns: int,
        width: int,
        input_shape: tuple[int, ...] | None,
    ) -> None:
        """Create the perturbation scores array (given ``input_shape``) or keep an existing
        one as wide as the allocation (``input_shape`` None: only if it exists)."""
        path = self._scores_path(test_set, InfluenceMode.Perturbation)
        if self._exists(path):
            array = self._array(path)
            input_shape = tuple(array.shape[2:]) if input_shape is None else input_shape
            if tuple(array.shape[2:]) != input_shape:
                raise StoreError(
                    f"Perturbation scores of {test_set!r} have input shape "
                    f"{tuple(array.shape[2:])}, not {input_shape}."
                )
            if array.shape[1] != n_columns:
                array.resize((n_test, n_columns, *input_shape))
            return
        if input_shape is None:
            return
        features = int(np.prod(input_shape)) if input_shape else 1
        row_chunk = min(n_test, max(1, SCORE_CHUNK_BYTES // (4 * width * features)))
        self.root.require_group("scores_perturbation").create_array(
            test_set,
            shape=(n_test, n_columns, *input_shape),
            dtype="float32",
            chunks=(row_chunk, width, *input_shape),
            fill_value=np.nan,
            compressors=_checksum_codecs(),
            dimension_names=("test", "train", *[f"input_{i}" for i in range(len(input_shape))]),
        )

    # ================================================================== scores: writing
    def _shard_marker(
        self, test_set: str, shard: str, mode: InfluenceMode = InfluenceMode.Up
    ) -> str:
        """Completion marker of one shard's scores; each mode has its own (a perturbation
        run neither completes nor invalidates the up-weighting scores)."""
        return f"_status/{self._scores_path(test_set, mode)}/{shard}.json"

    def resolve_shard(self, test_set: str, shard: str | int) -> str:
        order = self.allocation(test_set)["order"]
        if isinstance(shard, int) and not isinstance(shard, bool):
            if not 0 <= shard < len(order):
                raise StoreError(
                    f"Shard index {shard} is out of range: test set {test_set!r} has {len(order)} "
                    "allocated shards."
                )
            return str(order[shard])
        if shard not in order:
            raise StoreError(
                f"Shard {shard!r} is not allocated for test set {test_set!r}; allocated: {order}."
            )
        return str(shard)

    def write_shard_scores(
        self,
        test_set: str,
        shard: str | int,
        influence: Any,
        loader: Iterable[Any],
        *,
        top_k: int = 10,
        ids: Sequence[int] | np.ndarray | None = None,
        mode: InfluenceMode = InfluenceMode.Up,
    ) -> ShardResult:
        """Score one training shard against the stored factors of ``test_set``.

        Streams ``loader`` (yielding (x, y) or (x, y, ids)) batch by batch, writes only
        the column blocks this training shard owns (buffering one block of scores),
        then its top-k and per-example statistics, then marks it complete.
        """
        from .scoring import score_shard

        self._writable()
        name = self.resolve_shard(test_set, shard)
        return score_shard(self, test_set, name, influence, loader, top_k=top_k, ids=ids, mode=mode)

    # ================================================================== status
    def shard_record(
        self, test_set: str, shard: str | int, mode: InfluenceMode = InfluenceMode.Up
    ) -> dict[str, Any] | None:
        """The completion record of a shard's scores in ``mode``, or None when they are
        not complete."""
        name = self.resolve_shard(test_set, shard)
        record = self.location.read_json(self._shard_marker(test_set, name, mode))
        if record is None:
            return None
        allocated = self.allocation(test_set)["shards"][name]
        if record.get("columns") != [allocated["start"], allocated["start"] + allocated["n_rows"]]:
            return None  # re-allocated since: stale
        return record

    def status(self, test_set: str | None = None) -> dict[str, dict[str, Any]]:
        """Per test set: whether its factors are complete, and its complete and missing
        (allocated but not complete) training shards."""
        result: dict[str, dict[str, Any]] = {}
        for name in [test_set] if test_set is not None else self.test_sets():
            self._known_test_set(name)
            factors = self.location.read_json(self._factors_marker(name)) is not None
            order = self.allocation(name)["order"] if factors else []
            complete = [s for s in order if self.shard_record(name, s) is not None]
            result[name] = {
                "factors": factors,
                "complete": complete,
                "missing": [s for s in order if s not in complete],
            }
        return result

    # ================================================================== tables (parquet)
    def table_uri(self, name: str) -> str:
        """Where table ``name`` ('<dir>/<file>' without .parquet) lives."""
        parts = [_check_name("table", p) for p in name.split("/")]
        key = "tables/" + "/".join(parts) + ".parquet"
        return self.location.local_path(key) if self.location.is_local else self.location._join(key)

    def write_table(self, name: str, frame: Any) -> str:
        """Write a pandas DataFrame as parquet (zstd) under ``tables/``, atomically; returns
        its path or URL."""
        self._writable()
        uri = self.table_uri(name)
        if self.location.is_local:
            os.makedirs(os.path.dirname(uri), exist_ok=True)
            tmp = f"{uri}.{os.getpid()}.tmp"
            frame.to_parquet(tmp, compression="zstd", index=False)
            with open(tmp, "rb") as handle:
                os.fsync(handle.fileno())
            os.replace(tmp, uri)
        else:
            with self.location.fs.open(uri, "wb") as handle:
                frame.to_parquet(handle, compression="zstd", index=False)
        return uri

    def read_table(self, name: str) -> Any:
        """The table ``name`` as a DataFrame, or None if it was never written."""
        import pandas as pd

        uri = self.table_uri(name)
        if not self.location.fs.exists(uri):
            return None
        with self.location.fs.open(uri, "rb") as handle:
            return pd.read_parquet(handle)

    # ================================================================== per-example values
    def write_example_values(
        self, name: str, shard: str, values: dict[str, np.ndarray], attrs: dict[str, Any]
    ) -> None:
        """Per-training-example arrays of one shard (e.g. self-influence), with attributes
        saying what they were computed from; one writer per (name, shard)."""
        self._writable()
        group_path = (
            f"example_values/{_check_name('value set', name)}/{_check_name('shard', shard)}"
        )
        group = self.root.require_group("example_values").require_group(name)
        try:
            shard_group: Any = group.require_group(shard)
        except zarr.errors.ContainsGroupError:
            shard_group = group[shard]
        shard_group.attrs.update({"complete": False})
        for key, array in values.items():
            shard_group.create_array(
                key,
                data=np.asarray(array),
                compressors=_checksum_codecs(),
                dimension_names=("train",),
                overwrite=True,
            )
        self.location.sync_tree(group_path)
        shard_group.attrs.update({**attrs, "complete": True})

    def read_example_values(
        self, name: str, shard: str
    ) -> tuple[dict[str, np.ndarray], dict[str, Any]] | None:
        """(arrays, attributes) written by :meth:`write_example_values`, or None."""
        path = f"example_values/{name}/{shard}"
        node = self.root.get(path)
        if not isinstance(node, zarr.Group) or not node.attrs.get("complete", False):
            return None
        arrays = {key: self._read(f"{path}/{key}", ...) for key in node.array_keys()}
        return arrays, _attrs(node)

    # ================================================================== pandas readers
    def scores_table(self, test_set: str, **kwargs: Any) -> Any:
        from .readers import scores_table

        return scores_table(self, test_set, **kwargs)

    def top_k(self, test_set: str, k: int = 10, **kwargs: Any) -> Any:
        from .readers import top_k

        return top_k(self, test_set, k, **kwargs)

    def train_aggregates(self, test_set: str, **kwargs: Any) -> Any:
        from .readers import train_aggregates

        return train_aggregates(self, test_set, **kwargs)

    def scores_array(self, test_set: str, mode: InfluenceMode = InfluenceMode.Up) -> zarr.Array:
        """The raw (n_test, n_columns) scores array (dimension names: test, train); see
        :meth:`column_index` for which training example each column holds."""
        self._known_test_set(test_set)
        return self._array(self._scores_path(test_set, mode))

    def column_index(self, test_set: str) -> Any:
        from .readers import column_index

        return column_index(self, test_set)


def _attrs(node: Any) -> dict[str, Any]:
    """A node's attributes as a plain dict (JSON values)."""
    return dict(node.attrs)


def _row_chunks(shape: tuple[int, ...], itemsize: int) -> tuple[int, ...]:
    if not shape:
        return ()
    row_bytes = itemsize * int(np.prod(shape[1:])) if len(shape) > 1 else itemsize
    rows = max(1, min(shape[0] or 1, CHUNK_BYTES // max(1, row_bytes)))
    return (rows, *shape[1:])


def _default_block_width(n_test: int, shard_rows: Sequence[int]) -> int:
    """Columns per column block (= chunk width): the largest training shard, rounded up to
    64, but a chunk of at most 2,048 test rows stays within SCORE_CHUNK_BYTES."""
    cap = max(64, SCORE_CHUNK_BYTES // (4 * min(max(1, n_test), 2048)))
    width = min(cap, max(shard_rows) if shard_rows else cap)
    return 64 * math.ceil(width / 64) if width >= 64 else max(1, width)


def _looks_like_corruption(error: BaseException) -> bool:
    text = str(error).lower()
    return any(
        s in text for s in ("checksum", "decompress", "corrupt", "unexpected", "buffer", "invalid")
    )


def _locate_bad_chunk(array: zarr.Array) -> str:
    """The first chunk (in grid coordinates) that cannot be read back."""
    chunks = array.chunks
    grid = [range(math.ceil(s / c)) for s, c in zip(array.shape, chunks, strict=True)]
    import itertools

    for coords in itertools.product(*grid):
        region = tuple(
            slice(i * c, min((i + 1) * c, s))
            for i, c, s in zip(coords, chunks, array.shape, strict=True)
        )
        try:
            array[region]
        except Exception:
            return f"chunk {coords} (elements {[(r.start, r.stop) for r in region]})"
    return "an unknown chunk"
