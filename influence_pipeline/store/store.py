"""InfluenceStore: the Zarr layout of the package docstring, its writers and guards.

Correctness rests on four rules, each checked where an artifact is read:

* **Complete means every chunk is there and decodes.** Arrays are written with
  ``write_empty_chunks`` so every chunk of a written region is a file; a completion record
  lists the chunk grid of what it completed (a manifest), and a completeness check finds
  a deleted chunk file without reading data. Every read checks the chunks it touches and
  their crc32c; a missing or corrupt chunk raises :class:`StoreCorruptionError` naming the
  array, the chunk and what to do, and (on a writable store) marks the owning artifact
  (its shard, the factors, the block mapper version) incomplete so a re-run redoes it.
* **Complete is relative to inputs.** Factors record the digest of the fitted state and
  the loss they were computed with; a shard records the factors fingerprint, fitted-state
  digest and loss it was scored with. Factors of another block mapper than the stored one
  and shards of other factors are *stale*: never served, reported as such.
* **Replacement is atomic.** New factors and block mappers are written beside the current
  version and become current by one atomic write (the completion marker, the ``current``
  attribute); a failed write leaves the previous version readable.
* **Names are validated** (:func:`validate_name`) before any path is built from them.
"""

from __future__ import annotations

import hashlib
import itertools
import math
import os
import re
import time
import uuid
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import zarr
from zarr.codecs import Crc32cCodec

from .chunks import (
    WRITE_ALL_CHUNKS,
    grid_keys,
    locate_bad_chunk,
    looks_like_corruption,
    manifest,
    selection_chunks,
)
from .errors import (
    IncompleteArtifactError,
    ProvenanceMismatchError,
    StaleArtifactError,
    StoreCorruptionError,
    StoreError,
)
from .location import StoreLocation
from .provenance import (
    DataHasher,
    Provenance,
    loss_name,
    model_fingerprint,
    remember_digest,
    state_digest,
    state_meta,
)

if TYPE_CHECKING:
    import torch

#: Target size of one chunk of factors and fitted tensors.
CHUNK_BYTES = 4 << 20
#: Target size of one chunk of scores; a column block (the unit a training shard owns) is
#: one chunk wide, and a shard writer buffers one column block (n_test × width float32).
SCORE_CHUNK_BYTES = 8 << 20
#: Values of :class:`~influence_pipeline.influence.InfluenceMode` (kept as strings here so
#: that reading a store imports no torch).
MODES = ("up", "perturbation")

_NAME = re.compile(r"^[A-Za-z0-9_.=-][A-Za-z0-9_.=@+-]*$")


def validate_name(name: Any, kind: str = "name") -> str:
    """``name`` if it is safe as one path component of the store (a test set, a training
    shard, a table), else :class:`StoreError` naming it. Call it on partition keys before
    opening any file named after them (``../test/holdout`` is refused here)."""
    if not isinstance(name, str) or not _NAME.match(name) or name in (".", "..") or len(name) > 200:
        raise StoreError(
            f"Invalid {kind} {name!r}: expected 1-200 characters from letters, digits and "
            ". _ - = @ + (not starting with @ or +; no '/'; not '.' or '..')."
        )
    return name


_check_name = validate_name  # the old private name


def mode_value(mode: Any) -> str:
    """'up' or 'perturbation' from an InfluenceMode or its value."""
    value = getattr(mode, "value", mode)
    if value not in MODES:
        raise StoreError(f"mode must be one of {list(MODES)} (or an InfluenceMode), got {mode!r}.")
    return str(value)


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


@dataclass(frozen=True)
class ArtifactState:
    """Where an artifact stands: ``state`` is 'complete', 'missing', 'stale' or 'damaged';
    ``reason`` says why it is not complete; ``record`` is its completion record when
    complete."""

    state: str
    reason: str = ""
    record: dict[str, Any] | None = None

    @property
    def complete(self) -> bool:
        return self.state == "complete"


def _split_item(item: Any) -> tuple[torch.Tensor, torch.Tensor, Any]:
    """(x, y, ids or None) of a loader element."""
    from ..influence.batch import TorchBatch

    if isinstance(item, TorchBatch):
        return item.x, item.y, None
    if isinstance(item, (tuple, list)) and len(item) in (2, 3):
        TorchBatch(item[0], item[1])  # validates types and lengths
        return item[0], item[1], item[2] if len(item) == 3 else None
    raise TypeError(
        "A loader for the store must yield (x, y) or (x, y, ids) tuples, got "
        f"{type(item).__name__}."
    )


def _write_test_ids(
    group: Any, test_set: str, n_rows: int, ids: Any, collected_ids: list[np.ndarray]
) -> Any:
    """The ``ids`` array of a factors version: the given ids, else the ids the loader's
    batches carried, else 0..n_rows-1; refused unless unique."""
    if ids is not None:
        test_ids = _as_ids(ids, n_rows, f"ids of test set {test_set!r}")
    elif collected_ids:
        test_ids = np.concatenate(collected_ids)
    else:
        test_ids = np.arange(n_rows, dtype=np.int64)
    if len(np.unique(test_ids)) != n_rows:
        raise StoreError(f"Test ids of {test_set!r} are not unique.")
    return group.create_array(
        "ids",
        data=test_ids,
        compressors=_checksum_codecs(),
        dimension_names=("test",),
        config=WRITE_ALL_CHUNKS,
    )


def _as_ids(ids: Any, n: int, what: str) -> np.ndarray:
    if hasattr(ids, "detach"):
        ids = ids.detach().cpu().numpy()
    array = np.asarray(ids)
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
        try:
            self.root = self.location.open_group("r" if mode == "r" else "a")
        except ValueError as error:  # a zarr.json that does not decode
            raise self._metadata_error("", error) from error
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

    def _metadata_error(self, path: str, error: BaseException) -> StoreCorruptionError:
        key = f"{path}/zarr.json" if path else "zarr.json"
        return StoreCorruptionError(
            f"The metadata file {self.location._join(key)!r} is damaged "
            f"({type(error).__name__}: {error}); {_advice(path)}"
        )

    def _array(self, path: str) -> zarr.Array:
        try:
            node = zarr.open_array(
                self.location.zarr_store(read_only=self.mode == "r"),
                path=path,
                mode="r" if self.mode == "r" else "r+",
            )
        except (FileNotFoundError, KeyError, zarr.errors.ArrayNotFoundError) as error:
            if self.location.exists_key(f"{path}/zarr.json"):
                raise self._metadata_error(path, error) from error
            raise StoreError(f"No array {path!r} in {self!r}.") from error
        except (ValueError, TypeError) as error:  # JSONDecodeError, UnicodeDecodeError, ...
            raise self._metadata_error(path, error) from error
        return node.with_config(WRITE_ALL_CHUNKS) if self.mode != "r" else node

    def _exists(self, path: str) -> bool:
        """Whether the array ``path`` exists (its metadata file is there; a damaged one
        raises on open, it never counts as absent)."""
        return self.location.exists_key(f"{path}/zarr.json")

    # ================================================================== damage
    def _missing_chunks(self, path: str, keys: Sequence[str]) -> list[str]:
        if not keys:
            return []
        if self.location.is_local:
            return [k for k in keys if not self.location.exists_key(f"{path}/{k}")]
        present = self.location.list_files(path)
        return [k for k in keys if k not in present]

    def _manifest_missing(self, chunks: dict[str, Any] | None) -> tuple[str, str] | None:
        """(array, chunk key) of the first chunk a completion manifest lists that is not
        there, or None."""
        for path, entry in (chunks or {}).items():
            columns = entry.get("columns")
            keys = grid_keys(
                entry["shape"], entry["chunks"], None if columns is None else tuple(columns)
            )
            missing = self._missing_chunks(path, keys)
            if missing:
                return path, missing[0]
        return None

    def _damaged(
        self, path: str, detail: str, coords: Sequence[int] | None = None
    ) -> StoreCorruptionError:
        """The error for a damaged array ``path``; on a writable store the artifact that
        owns it is marked incomplete first, so a re-run redoes it."""
        owner = self._owner(path, coords)
        consequence = ""
        if owner is not None and self.mode != "r":
            try:
                self._invalidate(owner)
                consequence = f" {owner[0]} is now marked incomplete."
            except Exception as error:
                consequence = f" (could not mark {owner[0]} incomplete: {error})"
        elif owner is not None:
            consequence = (
                f" {owner[0]} is not served; the store is read-only, so a writable open "
                "marks it incomplete when it finds the damage."
            )
        return StoreCorruptionError(
            f"Array {path!r} in {self.url!r} is damaged: {detail}.{consequence} "
            + _advice(path, owner)
        )

    def _owner(self, path: str, coords: Sequence[int] | None) -> tuple[str, ...] | None:
        """(description, kind, names...) of the artifact an array belongs to."""
        parts = path.split("/")
        try:
            if parts[0] == "block_mapper" and len(parts) > 2:
                return (f"Block mapper version {parts[1]!r}", "block_mapper", parts[1])
            if parts[0] == "factors" and len(parts) > 2:
                return (f"The factors of {parts[1]!r}", "factors", parts[1])
            if parts[0] in ("topk", "train_stats") and len(parts) > 3:
                return (f"Shard {parts[2]!r} of {parts[1]!r}", "shard", parts[1], parts[2])
            if parts[0] in ("scores", "scores_perturbation") and len(parts) == 2 and coords:
                allocation = self.allocation(parts[1])
                column = int(coords[1]) * int(allocation["shard_width"])
                for shard, slot in allocation["shards"].items():
                    if slot["start"] <= column < slot["stop"]:
                        return (f"Shard {shard!r} of {parts[1]!r}", "shard", parts[1], shard)
            if parts[0] == "example_values" and len(parts) > 3:
                return (f"Values {parts[1]!r} of shard {parts[2]!r}", "example_values", *parts[1:3])
        except StoreError:
            return None
        return None

    def _invalidate(self, owner: tuple[str, ...]) -> None:
        kind = owner[1]
        if kind == "block_mapper":
            self.root[f"block_mapper/{owner[2]}"].attrs.update({"complete": False})
        elif kind == "factors":
            self.location.delete(self._factors_marker(owner[2]))
        elif kind == "shard":
            for mode in MODES:
                self.location.delete(self._shard_marker(owner[2], owner[3], mode))
        elif kind == "example_values":
            self.root[f"example_values/{owner[2]}/{owner[3]}"].attrs.update({"complete": False})

    # ================================================================== reading with checks
    def _read(self, path: str, selection: Any) -> np.ndarray:
        """``array[selection]`` (orthogonal for index lists); a missing chunk file or a
        chunk that fails its checksum raises :class:`StoreCorruptionError` naming the
        array and the chunk (see :meth:`_damaged`)."""
        array = self._array(path)
        touched = selection_chunks(selection, array.shape, array.chunks)
        coords_list = list(itertools.product(*touched)) if all(touched) else []
        keys = ["/".join(["c", *map(str, c)]) for c in coords_list]
        missing = self._missing_chunks(path, keys)
        if missing:
            first = coords_list[keys.index(missing[0])]
            raise self._damaged(
                path,
                f"chunk {tuple(first)} (file {missing[0]!r}) is missing"
                + (f", and {len(missing) - 1} more" if len(missing) > 1 else ""),
                first,
            )
        try:
            if isinstance(selection, tuple) and any(
                isinstance(s, (list, np.ndarray)) for s in selection
            ):
                return np.asarray(array.get_orthogonal_selection(selection))
            return np.asarray(array[selection])
        except (ValueError, RuntimeError, OSError) as error:
            if not looks_like_corruption(error):
                raise
            bad = locate_bad_chunk(array, coords_list)
            raise self._damaged(
                path,
                f"{'chunk ' + str(bad) if bad is not None else 'a chunk'} fails to decode "
                f"({error})",
                bad,
            ) from error

    # ================================================================== block mapper
    def save_block_mapper(self, influence: Any, *, fit_data_fingerprint: str | None = None) -> str:
        """Persist a fitted influence model; returns the digest of its fitted state.

        A new version is written beside the old one and becomes current (one attribute
        write) only once complete and synced, so a failed save leaves the previous version
        current and readable. A version whose chunks were lost is written again.
        """
        from ..influence.state import fitted_state

        self._writable()
        state = fitted_state(influence)
        meta, digest = state_meta(state)
        provenance = Provenance.of(
            influence, **({"fit": fit_data_fingerprint} if fit_data_fingerprint else {})
        )
        group = self.root.require_group("block_mapper")
        version = f"v-{digest}"
        if not self._version_intact(version):
            vgroup = group.create_group(
                version, overwrite=True, attributes={"state": meta, "complete": False}
            )
            chunks = {}
            for i, block in enumerate(state.blocks):
                for name, tensor in block.tensors.items():
                    data = tensor.detach().cpu().contiguous().numpy()
                    array = vgroup.create_array(
                        f"b{i}/{name}",
                        data=data,
                        chunks=_row_chunks(data.shape, data.dtype.itemsize),
                        compressors=_checksum_codecs(),
                        dimension_names=tuple(f"dim_{d}" for d in range(data.ndim)),
                        config=WRITE_ALL_CHUNKS,
                    )
                    chunks[f"block_mapper/{version}/b{i}/{name}"] = manifest(array)
            self.location.sync_tree(f"block_mapper/{version}")
            vgroup.attrs.update({"chunks": chunks, "complete": True})
        group.attrs.update(
            {"current": version, "digest": digest, "provenance": provenance.to_json()}
        )
        remember_digest(influence, digest)
        return digest

    def _version_intact(self, version: str) -> bool:
        node = self.root.get(f"block_mapper/{version}")
        if not isinstance(node, zarr.Group) or not node.attrs.get("complete", False):
            return False
        return self._manifest_missing(_attrs(node).get("chunks")) is None

    def block_mapper_info(self) -> dict[str, Any] | None:
        """Digest and provenance of the current block mapper, or None when there is none
        or it is damaged (a chunk lost or found corrupt: a warning names it, and saving the
        block mapper again rewrites it)."""
        try:
            group = self.root.get("block_mapper")
        except ValueError as error:
            raise self._metadata_error("block_mapper", error) from error
        if group is None or "current" not in group.attrs:
            return None
        info = _attrs(group)
        node = self.root.get(f"block_mapper/{info['current']}")
        if not isinstance(node, zarr.Group) or not node.attrs.get("complete", False):
            warnings.warn(
                f"The current block mapper {info['current']!r} in {self.url!r} is marked "
                "incomplete (damaged); materialize block_mapper again.",
                stacklevel=2,
            )
            return None
        lost = self._manifest_missing(_attrs(node).get("chunks"))
        if lost is not None:
            message = str(self._damaged(lost[0], f"chunk file {lost[1]!r} is missing"))
            warnings.warn(message, stacklevel=2)
            return None
        return info

    def load_block_mapper(
        self, model: torch.nn.Module, loss: Any = None, data: Iterable[Any] | None = None
    ) -> Any:
        """The stored fitted influence model, restored onto ``model``.

        Raises :class:`ProvenanceMismatchError` when ``model`` has other parameter names,
        shapes or weights than the model it was fitted for, or ``loss`` is another loss
        than the one it was fitted with.
        """
        import torch

        from ..influence.state import BlockState, FittedState, restore_influence

        info = self.block_mapper_info()
        if info is None:
            raise StoreError(
                f"{self!r} holds no intact fitted block mapper: materialize block_mapper "
                "(save_block_mapper)."
            )
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
        if loss is not None and meta["loss"] is not None and loss_name(loss) != meta["loss"]:
            raise ProvenanceMismatchError(
                f"The block mapper was fitted with loss {meta['loss']!r}, not "
                f"{loss_name(loss)!r}: fit it again with this loss, or pass its own loss."
            )
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
        influence = restore_influence(state, model, loss, data)
        remember_digest(influence, info["digest"])
        return influence

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
        the completion record. Returns the completion record.

        The factors go to a new version ``factors/<test_set>/v-<id>``; the completion
        marker, written atomically last, makes it current, and older versions are removed
        after. A failure (non-finite factors, an empty loader, an exception) leaves the
        previous factors current and readable.
        """
        import torch

        self._writable()
        validate_name(test_set, "test set")
        if dtype not in ("float32", "float64"):
            raise StoreError(f"Factors are stored as float32 or float64, not {dtype!r}.")
        start_time = time.perf_counter()
        provenance = Provenance.of(influence)
        self._check_against_block_mapper(provenance)
        digest = state_digest(influence)
        P = int(influence.n_parameters)
        base = f"factors/{test_set}"
        group = _require_group(self.root, base)
        version = f"v-{uuid.uuid4().hex[:16]}"
        path = f"{base}/{version}"
        itemsize = np.dtype(dtype).itemsize
        cols = min(P, max(1, CHUNK_BYTES // itemsize))
        rows = max(1, CHUNK_BYTES // (itemsize * cols))
        if n_rows is None and hasattr(loader, "dataset"):
            try:
                n_rows = len(loader.dataset)  # a size hint saves resizing
            except TypeError:
                n_rows = None
        try:
            vgroup = group.create_group(version)
            values = vgroup.create_array(
                "values",
                shape=(n_rows or 0, P),
                dtype=dtype,
                chunks=(rows, cols),
                fill_value=np.nan,
                compressors=_checksum_codecs(),
                dimension_names=("test", "parameter"),
                config=WRITE_ALL_CHUNKS,
            )
            hasher = DataHasher()
            factor_hasher = hashlib.blake2b(digest_size=16)  # of the values as written
            collected_ids: list[np.ndarray] = []
            row = 0
            for item in loader:
                x, y, batch_ids = _split_item(item)
                factors = influence.influence_factors(x, y)
                if not bool(torch.isfinite(factors).all()):
                    raise ValueError(
                        f"Influence factors of test set {test_set!r} at rows {row}.."
                        f"{row + len(x) - 1} are not finite; nothing was marked complete and "
                        "the previous factors (if any) stay current."
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
                raise StoreError(
                    f"The loader of test set {test_set!r} yielded no rows; the previous "
                    "factors (if any) stay current."
                )
            if values.shape[0] != row:
                values.resize((row, P))
            id_array = _write_test_ids(vgroup, test_set, row, ids, collected_ids)
            provenance.data_fingerprints["test_set"] = hasher.hexdigest()
            record = {
                "n_rows": row,
                "n_parameters": P,
                "dtype": dtype,
                "data_fingerprint": hasher.hexdigest(),
                "factors_fingerprint": factor_hasher.hexdigest(),
                "seconds": time.perf_counter() - start_time,
                **(annotations or {}),
                "block_mapper_digest": digest,
                "loss": loss_name(influence.loss),
                "path": path,
                "chunks": {f"{path}/values": manifest(values), f"{path}/ids": manifest(id_array)},
                "provenance": provenance.to_json(),
            }
            vgroup.attrs.update({k: v for k, v in record.items() if k != "chunks"})
            self.location.sync_tree(path)
        except BaseException:
            self.location.remove_tree(path)
            raise
        self.location.write_json(self._factors_marker(test_set), record)  # the switch
        self._remove_other_versions(test_set, keep=version)
        return record

    def _remove_other_versions(self, test_set: str, keep: str) -> None:
        base = f"factors/{test_set}"
        group = self.root.get(base)
        if not isinstance(group, zarr.Group):
            return
        for name in [*group.group_keys(), *group.array_keys()]:
            if name != keep:
                self.location.remove_tree(f"{base}/{name}")

    def _check_against_block_mapper(self, provenance: Provenance) -> None:
        info = self.block_mapper_info()
        if info is not None:
            Provenance.from_json(info["provenance"]).check_matches(
                provenance, "The stored block mapper"
            )

    def test_sets(self) -> list[str]:
        try:
            group = self.root.get("factors")
        except ValueError as error:
            raise self._metadata_error("factors", error) from error
        return sorted(group.group_keys()) if isinstance(group, zarr.Group) else []

    def factors_state(self, test_set: str, *, check_chunks: bool = True) -> ArtifactState:
        """Whether the factors of ``test_set`` are complete, missing, stale (computed with
        another block mapper than the stored one) or damaged (a marker that does not decode,
        a chunk file lost: listed chunks are looked for unless ``check_chunks`` is False)."""
        self._known_test_set(test_set)
        key = self._factors_marker(test_set)
        try:
            record = self.location.read_json(key)
        except StoreCorruptionError as error:
            if self.mode != "r":
                self.location.delete(key)
            return ArtifactState("damaged", str(error))
        if record is None:
            return ArtifactState("missing", f"the factors of {test_set!r} are not complete")
        info = self.block_mapper_info()
        made_with = record.get("block_mapper_digest")
        if info is not None and made_with is not None and made_with != info["digest"]:
            return ArtifactState(
                "stale",
                f"the factors of {test_set!r} were computed with block mapper {made_with}, "
                f"the store's block mapper is {info['digest']}: compute them again",
            )
        lost = self._manifest_missing(record.get("chunks")) if check_chunks else None
        if lost is not None:
            return ArtifactState(
                "damaged", str(self._damaged(lost[0], f"chunk file {lost[1]!r} is missing"))
            )
        return ArtifactState("complete", "", record)

    def factors_record(self, test_set: str, *, verify: bool = False) -> dict[str, Any]:
        """The completion record of a test set's current factors; raises
        :class:`IncompleteArtifactError` (:class:`StaleArtifactError` when stale) naming
        why when they are not complete. ``verify`` also decodes every chunk (a corrupt one
        marks the factors incomplete and raises)."""
        state = self.factors_state(test_set)
        if state.state == "stale":
            raise StaleArtifactError(state.reason[0].upper() + state.reason[1:] + ".")
        if state.record is None:
            raise IncompleteArtifactError(
                f"The factors of test set {test_set!r} are not complete ({state.state}: "
                f"{state.reason}); materialize influence_factors[{test_set}] (write_factors or "
                "write_query_factors)."
            )
        if verify:
            for path in state.record.get("chunks", {}):
                try:
                    self._read(path, ...)
                except StoreCorruptionError as error:
                    raise IncompleteArtifactError(str(error)) from error
        return state.record

    def _known_test_set(self, test_set: str) -> None:
        validate_name(test_set, "test set")
        if test_set not in self.test_sets():
            raise StoreError(f"Unknown test set {test_set!r}; the store has {self.test_sets()}.")

    def _factors_path(self, record: dict[str, Any], test_set: str) -> str:
        return str(record.get("path", f"factors/{test_set}"))

    def read_factors(self, test_set: str) -> tuple[np.ndarray, np.ndarray]:
        """(factors (n_test, P), test ids (n_test,)) of a complete test set."""
        record = self.factors_record(test_set)
        if record.get("kind") == "query":
            raise StoreError(
                f"The factors of test set {test_set!r} are per-layer query factors (rank "
                f"{record.get('rank')!r}), not dense (n_test, P) factors: read them with "
                "query_factors(test_set)."
            )
        path = self._factors_path(record, test_set)
        return self._read(f"{path}/values", ...), self._read(f"{path}/ids", ...)

    def write_query_factors(
        self,
        test_set: str,
        influence: Any,
        loader: Iterable[Any],
        *,
        rank: int | None,
        ids: Sequence[int] | np.ndarray | None = None,
        dtype: str = "float32",
        n_rows: int | None = None,
        annotations: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Compute and store the per-layer EK-FAC query factors of a test set (rank
        ``rank``, None: exact), one group per layer chunked by test rows, as a new version
        of its factors with the rules of :meth:`write_factors` (atomic replacement, chunk
        lists, provenance with ``modules``, ``fisher`` and ``rank``); shards are then
        scored against them by :meth:`write_shard_scores`. See
        :mod:`~influence_pipeline.store.query_factors`."""
        from .query_factors import write_query_factors

        return write_query_factors(
            self,
            test_set,
            influence,
            loader,
            rank=rank,
            ids=ids,
            dtype=dtype,
            n_rows=n_rows,
            annotations=annotations,
        )

    def query_factors(self, test_set: str, influence: Any = None, rank: Any = "any") -> Any:
        """The stored query factors of a complete test set, read lazily
        (:class:`~influence_pipeline.store.query_factors.StoredQueryFactors`:
        ``rows(start, stop)``). With ``influence`` and/or ``rank``, factors written for
        another model, ``modules``, ``fisher`` or ``rank`` raise
        :class:`ProvenanceMismatchError`."""
        from .query_factors import StoredQueryFactors, check_query_factors

        record = self.factors_record(test_set)
        check_query_factors(record, test_set, influence, rank)
        return StoredQueryFactors(self, test_set, record)

    def test_ids(self, test_set: str) -> np.ndarray:
        """The ids of the test points, in the order of the score rows (position i = row i)."""
        record = self.factors_record(test_set)
        return self._read(f"{self._factors_path(record, test_set)}/ids", ...)

    # ================================================================== scores: allocation
    def _scores_path(self, test_set: str, mode: Any = "up") -> str:
        prefix = "scores" if mode_value(mode) == "up" else "scores_perturbation"
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
        in the order given. A shard that grew beyond its range gets a new range at the end.

        Idempotent: asking again for shards already allocated with these sizes writes
        nothing. Call it from one process for every shard of a test set before fanning out
        the shard writers (the influence_factors asset does): on a local or in-memory store
        it runs under a lock, but object stores have none, so two allocating processes
        there could lose each other's allocation. ``input_shape`` (the shape of one input
        x) also allocates the perturbation scores array.
        """
        self._writable()
        record = self.factors_record(test_set)
        n_test = int(record["n_rows"])
        names = [validate_name(s.name, "shard") for s in shards]
        if len(set(names)) != len(names):
            raise StoreError(f"Shard names repeat in {names}.")
        for spec in shards:
            if spec.n_rows < 1:
                raise StoreError(
                    f"Shard {spec.name!r} has {spec.n_rows} rows; shards need at least one."
                )
        with self.location.lock():
            path = self._scores_path(test_set)
            changed = False
            if self._exists(path):
                array = self._array(path)
                if array.shape[0] != n_test:
                    raise ProvenanceMismatchError(
                        f"The scores of {test_set!r} have {array.shape[0]} test rows but its "
                        f"factors {n_test}: delete {path!r} and score the shards again."
                    )
                attrs = _attrs(array)
                width = int(attrs["shard_width"])
                allocation = dict(attrs["shards"])
                order = list(attrs["order"])
            else:
                # no array: chunks or markers left without one (a lost zarr.json) must not
                # come back as values of new shards
                for stale in (path, self._scores_path(test_set, "perturbation")):
                    self.location.remove_tree(stale)
                    self.location.remove_tree(f"_status/{stale}")
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
                    if current["n_rows"] != spec.n_rows:
                        current["n_rows"] = spec.n_rows
                        changed = True
                    continue
                changed = True
                slots = math.ceil(spec.n_rows / width)
                allocation[spec.name] = {
                    "start": n_columns,
                    "stop": n_columns + slots * width,
                    "n_rows": spec.n_rows,
                }
                if spec.name not in order:
                    order.append(spec.name)
                n_columns += slots * width
                for mode in MODES:
                    self.location.delete(self._shard_marker(test_set, spec.name, mode))
            if n_columns != array.shape[1]:
                array.resize((n_test, n_columns))
            for prefix in ("topk", "train_stats"):  # parents of the shard writers' groups
                _require_group(self.root, f"{prefix}/{test_set}")
            if changed:
                array.attrs.update({"shard_width": width, "shards": allocation, "order": order})
            self._allocate_perturbation(
                test_set,
                n_test,
                n_columns,
                width,
                None if input_shape is None else tuple(input_shape),
            )
            return {"shard_width": width, "shards": allocation, "order": order}

    def ensure_allocated(self, test_set: str, shard: str, n_rows: int) -> dict[str, Any]:
        """The allocation of one shard with ``n_rows`` rows: nothing is written when it is
        allocated so already. Allocating it here (a shard registered after the fan-out) is
        done only where the store has a lock (local, in memory); on object storage it is
        refused: allocate every shard before fanning out."""
        validate_name(shard, "shard")
        slot = self.allocation(test_set)["shards"].get(shard)
        if slot is not None and int(slot["n_rows"]) == int(n_rows):
            return dict(slot)
        if not self.location.has_lock:
            now = "is not allocated" if slot is None else f"is allocated with {slot['n_rows']} rows"
            raise StoreError(
                f"Shard {shard!r} {now} for test set {test_set!r} (it has {n_rows} rows), and "
                f"{self.url!r} is object storage, where allocating from parallel writers is "
                "not safe: allocate every shard from one process before fanning out "
                "(allocate_shards; the influence_factors asset does)."
            )
        return dict(
            self.allocate_shards(test_set, [ShardSpec(shard, int(n_rows))])["shards"][shard]
        )

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
        path = self._scores_path(test_set, "perturbation")
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
    def _shard_marker(self, test_set: str, shard: str, mode: Any = "up") -> str:
        """Completion marker of one shard's scores; each mode has its own (a perturbation
        run neither completes nor invalidates the up-weighting scores)."""
        return f"_status/{self._scores_path(test_set, mode)}/{shard}.json"

    def _claim_key(self, test_set: str, shard: str, mode: Any = "up") -> str:
        """The claim of the shard's latest writer (a token its marker must carry)."""
        return f"_status/{self._scores_path(test_set, mode)}/{shard}.claim"

    def resolve_shard(self, test_set: str, shard: str | int) -> str:
        order = self.allocation(test_set)["order"]
        if isinstance(shard, int) and not isinstance(shard, bool):
            if not 0 <= shard < len(order):
                raise StoreError(
                    f"Shard index {shard} is out of range: test set {test_set!r} has {len(order)} "
                    "allocated shards."
                )
            return str(order[shard])
        validate_name(shard, "shard")
        if shard not in order:
            raise StoreError(
                f"Shard {shard!r} is not allocated for test set {test_set!r} (allocated: "
                f"{order}): allocate it before scoring (allocate_shards)."
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
        mode: Any = "up",
        query_rank: Any = "any",
    ) -> ShardResult:
        """Score one training shard against the stored factors of ``test_set``: dense
        factors (:meth:`write_factors`) or per-layer query factors
        (:meth:`write_query_factors`; ``query_rank`` other than "any" refuses stored
        factors of another rank).

        Streams ``loader`` (yielding (x, y) or (x, y, ids)) batch by batch, writes only
        the column blocks this training shard owns (buffering one block of scores),
        then its top-k and per-example statistics, then marks it complete. The shard
        must be allocated; ``influence`` must be the fitted state the factors were
        computed with.
        """
        from ..influence.types import InfluenceMode
        from .scoring import score_shard

        self._writable()
        name = self.resolve_shard(test_set, shard)
        return score_shard(
            self,
            test_set,
            name,
            influence,
            loader,
            top_k=top_k,
            ids=ids,
            mode=InfluenceMode(mode_value(mode)),
            query_rank=query_rank,
        )

    # ================================================================== status
    def shard_state(
        self,
        test_set: str,
        shard: str | int,
        mode: Any = "up",
        *,
        verify: bool = False,
        _factors: ArtifactState | None = None,
    ) -> ArtifactState:
        """Whether a shard's scores in ``mode`` are complete, missing, stale (scored with
        other factors, another block mapper or loss than the current factors) or damaged
        (a marker that does not decode, a chunk file lost; with ``verify``, also a chunk
        that fails its checksum). A damaged shard is marked incomplete (writable store)."""
        name = self.resolve_shard(test_set, shard)
        key = self._shard_marker(test_set, name, mode)
        try:
            record = self.location.read_json(key)
        except StoreCorruptionError as error:
            if self.mode != "r":
                self.location.delete(key)
            return ArtifactState("damaged", str(error))
        if record is None:
            return ArtifactState("missing", "not scored (no completion marker)")
        if "writer" in record:
            try:
                claim = self.location.read_json(self._claim_key(test_set, name, mode))
            except StoreCorruptionError as error:
                return ArtifactState("damaged", str(error))
            if claim is not None and claim.get("writer") != record["writer"]:
                return ArtifactState(
                    "missing",
                    "another writer has started on it since it was marked (still writing, or "
                    "it died: score it again)",
                )
        allocated = self.allocation(test_set)["shards"][name]
        if record.get("columns") != [allocated["start"], allocated["start"] + allocated["n_rows"]]:
            return ArtifactState("missing", "re-allocated since it was scored")
        # the shard's scores depend on the factors it was scored with (their fingerprint),
        # not on the stored factor bytes: their chunks are not looked for here
        factors = (
            _factors if _factors is not None else self.factors_state(test_set, check_chunks=False)
        )
        if factors.record is None:
            return ArtifactState("stale", f"its factors are {factors.state}: {factors.reason}")
        for field in ("factors_fingerprint", "block_mapper_digest", "loss"):
            if field in factors.record and record.get(field) != factors.record[field]:
                return ArtifactState(
                    "stale",
                    f"scored with {field} {record.get(field)!r}, but the current factors of "
                    f"{test_set!r} have {factors.record[field]!r}: score it again",
                )
        lost = self._manifest_missing(record.get("chunks"))
        if lost is not None:
            damage = self._damaged(lost[0], f"chunk file {lost[1]!r} is missing")
            return ArtifactState("damaged", str(damage))
        if verify:
            for path, entry in record.get("chunks", {}).items():
                columns = entry.get("columns")
                width = entry["chunks"][1] if columns is not None else None
                selection: Any = (
                    ...
                    if columns is None
                    else (slice(None), slice(columns[0] * width, columns[1] * width))
                )
                try:
                    self._read(path, selection)
                except StoreCorruptionError as error:
                    return ArtifactState("damaged", str(error))
        return ArtifactState("complete", "", record)

    def shard_record(
        self, test_set: str, shard: str | int, mode: Any = "up", *, verify: bool = False
    ) -> dict[str, Any] | None:
        """The completion record of a shard's scores in ``mode``, or None when they are
        not complete (missing, stale or damaged: see :meth:`shard_state`)."""
        return self.shard_state(test_set, shard, mode, verify=verify).record

    def status(self, test_set: str | None = None) -> dict[str, dict[str, Any]]:
        """Per test set: ``factors`` (complete and current), ``factors_state``, the
        allocated shards by state (``complete``, ``missing``: never or not fully scored,
        or damaged; ``stale``: scored against other inputs), and ``problems``: shard →
        why it is not complete."""
        result: dict[str, dict[str, Any]] = {}
        for name in [test_set] if test_set is not None else self.test_sets():
            factors = self.factors_state(name)
            inputs = self.factors_state(name, check_chunks=False)
            order = self.allocation(name)["order"]
            states = {s: self.shard_state(name, s, _factors=inputs) for s in order}
            result[name] = {
                "factors": factors.complete,
                "factors_state": factors.state,
                "complete": [s for s in order if states[s].complete],
                "missing": [s for s in order if states[s].state in ("missing", "damaged")],
                "stale": [s for s in order if states[s].state == "stale"],
                "problems": {s: st.reason for s, st in states.items() if not st.complete},
            }
            if factors.record is None:
                result[name]["problems"]["factors"] = factors.reason
        return result

    # ================================================================== tables (parquet)
    def table_uri(self, name: str) -> str:
        """Where table ``name`` ('<dir>/<file>' without .parquet) lives."""
        parts = [validate_name(p, "table name part") for p in str(name).split("/")]
        key = "tables/" + "/".join(parts) + ".parquet"
        return self.location.local_path(key) if self.location.is_local else self.location._join(key)

    def tables(self) -> list[str]:
        """Names of the tables written so far."""
        suffix = ".parquet"
        return sorted(
            k[: -len(suffix)] for k in self.location.list_files("tables") if k.endswith(suffix)
        )

    def write_table(self, name: str, frame: Any) -> str:
        """Write a pandas DataFrame as parquet (zstd) under ``tables/``, atomically; returns
        its path or URL. ``name`` must be a known table (see
        :mod:`~influence_pipeline.store.schemas`) and ``frame`` match its schema."""
        from .schemas import schema_of

        self._writable()
        schema_of(name).check(frame)
        uri = self.table_uri(name)
        if self.location.is_local:
            os.makedirs(os.path.dirname(uri), exist_ok=True)
            tmp = f"{uri}.{uuid.uuid4().hex}.tmp"
            frame.to_parquet(tmp, compression="zstd", index=False)
            with open(tmp, "rb") as handle:
                os.fsync(handle.fileno())
            os.replace(tmp, uri)
        else:
            with self.location.fs.open(uri, "wb") as handle:
                frame.to_parquet(handle, compression="zstd", index=False)
        return uri

    def read_table(self, name: str, *, missing_ok: bool = False) -> Any:
        """The table ``name`` as a DataFrame (dtypes of its schema in
        :mod:`~influence_pipeline.store.schemas`). An unknown name raises
        :class:`StoreError` naming the known tables; a table not written yet raises too,
        or gives None with ``missing_ok``."""
        import pandas as pd

        from .schemas import table_kind

        table_kind(name)
        uri = self.table_uri(name)
        if not self.location.fs.exists(uri):
            if missing_ok:
                return None
            raise StoreError(
                f"Table {name!r} has not been written to {self.url!r} (materialize the asset "
                f"that writes it); written tables: {self.tables()}."
            )
        with self.location.fs.open(uri, "rb") as handle:
            try:
                return pd.read_parquet(handle)
            except (OSError, ValueError) as error:
                raise StoreCorruptionError(
                    f"The table file {uri!r} is damaged ({error}); materialize the asset that "
                    "writes it again."
                ) from error

    # ================================================================== per-example values
    def write_example_values(
        self, name: str, shard: str, values: dict[str, np.ndarray], attrs: dict[str, Any]
    ) -> None:
        """Per-training-example arrays of one shard (e.g. self-influence), with attributes
        saying what they were computed from; one writer per (name, shard)."""
        self._writable()
        group_path = (
            f"example_values/{validate_name(name, 'value set')}/{validate_name(shard, 'shard')}"
        )
        shard_group = _require_group(self.root, group_path)
        shard_group.attrs.update({"complete": False})
        chunks = {}
        for key, array in values.items():
            created = shard_group.create_array(
                validate_name(key, "value name"),
                data=np.asarray(array),
                compressors=_checksum_codecs(),
                dimension_names=("train",),
                overwrite=True,
                config=WRITE_ALL_CHUNKS,
            )
            chunks[f"{group_path}/{key}"] = manifest(created)
        self.location.sync_tree(group_path)
        shard_group.attrs.update({**attrs, "chunks": chunks, "complete": True})

    def read_example_values(
        self, name: str, shard: str
    ) -> tuple[dict[str, np.ndarray], dict[str, Any]] | None:
        """(arrays, attributes) written by :meth:`write_example_values`, or None (never
        written, or damaged: a lost chunk marks them incomplete)."""
        path = f"example_values/{validate_name(name, 'value set')}/{validate_name(shard, 'shard')}"
        node = self.root.get(path)
        if not isinstance(node, zarr.Group) or not node.attrs.get("complete", False):
            return None
        attrs = _attrs(node)
        lost = self._manifest_missing(attrs.pop("chunks", None))
        if lost is not None:
            warnings.warn(
                str(self._damaged(lost[0], f"chunk file {lost[1]!r} is missing")), stacklevel=2
            )
            return None
        arrays = {key: self._read(f"{path}/{key}", ...) for key in node.array_keys()}
        return arrays, attrs

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

    def scores_array(self, test_set: str, mode: Any = "up") -> zarr.Array:
        """The raw (n_test, n_columns) scores array (dimension names: test, train); see
        :meth:`column_index` for which training example each column holds. Reads through
        it are Zarr's own: missing chunks read as NaN there (use :meth:`scores_table` or
        :meth:`read_scores` for checked reads)."""
        self._known_test_set(test_set)
        return self._array(self._scores_path(test_set, mode))

    def read_scores(self, test_set: str, rows: Any, columns: Any, mode: Any = "up") -> np.ndarray:
        """``scores[rows, columns]`` (orthogonal selection) with every chunk checked."""
        self._known_test_set(test_set)
        return self._read(self._scores_path(test_set, mode), (rows, columns))

    def column_index(self, test_set: str) -> Any:
        from .readers import column_index

        return column_index(self, test_set)


def _attrs(node: Any) -> dict[str, Any]:
    """A node's attributes as a plain dict (JSON values)."""
    return dict(node.attrs)


def _require_group(root: Any, path: str) -> Any:
    """Open or create a group; a group another writer creates meanwhile is simply opened."""
    group = root
    for name in path.split("/"):
        try:
            group = group.require_group(name)
        except zarr.errors.ContainsGroupError:
            group = group[name]
    return group


def _advice(path: str, owner: tuple[str, ...] | None = None) -> str:
    """What to do about damage in ``path``."""
    if owner is not None and owner[1] == "shard":
        return (
            f"Score shard {owner[3]!r} of {owner[2]!r} again (materialize influence_scores "
            f"[{owner[2]}|{owner[3]}], or write_shard_scores)."
        )
    head = path.split("/")[0] if path else ""
    if head == "block_mapper":
        return "Materialize block_mapper again (save_block_mapper writes an intact version)."
    if head == "factors":
        name = path.split("/")[1] if "/" in path else "<test_set>"
        return (
            f"Materialize influence_factors[{name}] again (write_factors or write_query_factors)."
        )
    if head in ("scores", "scores_perturbation", "topk", "train_stats"):
        return (
            "Delete the damaged array and score its shards again (allocate_shards, then "
            "write_shard_scores)."
        )
    return "Restore the file from a backup or delete the store and run the pipeline again."


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
