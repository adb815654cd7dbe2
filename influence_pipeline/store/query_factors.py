"""Per-layer (compressed) EK-FAC query factors of a test set in the store.

The query factors of :meth:`EkfacInfluence.compressed_factors
<influence_pipeline.influence.EkfacInfluence.compressed_factors>` are, per layer, either
the exact preconditioned gradient matrices ``dense`` (n, G, out, in_dim) or a rank-r pair
``left`` (n, G, out, r), ``right`` (n, G, r, in_dim). They are stored as one version of the
test set's factors, beside the dense (n_test, P) kind and with the same rules::

    factors/<test_set>/v-<id>/
      layers/l<k>/dense | left, right   float32|float64, chunked by test rows (~4 MiB)
      ids                               (n_test,) int64

Layer k's name (dots and all) is in the group's attributes and in the completion record
(``kind: "query"``, ``modules``, ``rank``, ``fisher``, per-layer shapes, the chunk grid of
every array). The marker written last makes the version current, so completeness,
staleness (another block mapper), damage (a lost chunk) and the shards scored against them
follow the dense factors' rules in :mod:`~influence_pipeline.store.store`. Size: n_test ×
Σ_layers G·min(r(out + in_dim), out·in_dim) numbers; nothing of size n_test × P is formed.

:class:`StoredQueryFactors` reads row blocks lazily (``rows(start, stop)`` reads only the
chunks of those rows). :func:`check_query_factors` refuses factors made for another model,
``modules``, ``fisher`` or ``rank``. :func:`query_scores` scores a training batch
against every test row block (the shard writer's path, :func:`score_shard
<influence_pipeline.store.scoring.score_shard>`): the factors are held in memory when they
fit ``max_bytes``, else read block by block for each training batch.
"""

from __future__ import annotations

import hashlib
import time
import uuid
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ..influence.compressed import LayerQuery, QueryFactors, check_rank
from .chunks import WRITE_ALL_CHUNKS, manifest
from .errors import ProvenanceMismatchError, StoreError
from .provenance import DataHasher, Provenance, loss_name, state_digest
from .store import (
    CHUNK_BYTES,
    _as_ids,
    _checksum_codecs,
    _require_group,
    _split_item,
    _write_test_ids,
    validate_name,
)

if TYPE_CHECKING:
    from .store import InfluenceStore

#: Query factors up to this size are read once per shard and kept in memory while scoring.
HOLD_BYTES = 1 << 30


def _rows_per_chunk(row_shape: Sequence[int], itemsize: int) -> int:
    row_bytes = itemsize * int(np.prod(row_shape))
    return max(1, CHUNK_BYTES // max(1, row_bytes))


def write_query_factors(
    store: InfluenceStore,
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
    """Compute the per-layer query factors of a test set batch by batch and store them as
    a new version of its factors (see the module docstring); returns the completion record."""
    store._writable()
    validate_name(test_set, "test set")
    rank = check_rank(rank)
    if not hasattr(influence, "compressed_factors"):
        raise StoreError(
            f"Query factors need an EK-FAC influence model (compressed_factors), got "
            f"{type(influence).__name__}; use write_factors for dense (n_test, P) factors."
        )
    if dtype not in ("float32", "float64"):
        raise StoreError(f"Factors are stored as float32 or float64, not {dtype!r}.")
    start_time = time.perf_counter()
    provenance = Provenance.of(influence)
    store._check_against_block_mapper(provenance)
    digest = state_digest(influence)
    base = f"factors/{test_set}"
    group = _require_group(store.root, base)
    version = f"v-{uuid.uuid4().hex[:16]}"
    path = f"{base}/{version}"
    np_dtype = np.dtype(dtype)
    if n_rows is None and hasattr(loader, "dataset"):
        try:
            n_rows = len(loader.dataset)
        except TypeError:
            n_rows = None
    try:
        vgroup = group.create_group(version)
        arrays: dict[str, Any] = {}  # "<k>/<kind>" -> zarr array
        layers: list[dict[str, Any]] = []
        hasher, factor_hasher = DataHasher(), hashlib.blake2b(digest_size=16)
        collected_ids: list[np.ndarray] = []
        row = 0
        for item in loader:
            x, y, batch_ids = _split_item(item)
            queries = influence.compressed_factors(x, y, rank=rank)
            if not layers:
                for k, (name, query) in enumerate(queries.layers.items()):
                    shapes = {kind: list(t.shape[1:]) for kind, t in query.tensors().items()}
                    layers.append({"name": name, "group": f"l{k}", "shapes": shapes})
                    layer_group = vgroup.require_group(f"layers/l{k}")
                    layer_group.attrs.update({"name": name})
                    for kind, shape in shapes.items():
                        arrays[f"{k}/{kind}"] = layer_group.create_array(
                            kind,
                            shape=(n_rows or 0, *shape),
                            dtype=np_dtype,
                            chunks=(_rows_per_chunk(shape, np_dtype.itemsize), *shape),
                            fill_value=np.nan,
                            compressors=_checksum_codecs(),
                            dimension_names=("test", "group", *_dims(kind)),
                            config=WRITE_ALL_CHUNKS,
                        )
            if list(queries.layers) != [layer["name"] for layer in layers]:
                raise StoreError(
                    f"Query factors of test set {test_set!r} changed layers between batches: "
                    f"{list(queries.layers)} after {[layer['name'] for layer in layers]}."
                )
            n = queries.n_rows
            for k, query in enumerate(queries.layers.values()):
                for kind, tensor in query.tensors().items():
                    if not bool(torch.isfinite(tensor).all()):
                        raise ValueError(
                            f"Query factors of test set {test_set!r}, layer "
                            f"{layers[k]['name']!r}, rows {row}..{row + n - 1} are not finite; "
                            "nothing was marked complete and the previous factors (if any) "
                            "stay current."
                        )
                    array = arrays[f"{k}/{kind}"]
                    if tuple(tensor.shape[1:]) != tuple(array.shape[1:]):
                        raise StoreError(
                            f"Layer {layers[k]['name']!r} {kind} factors have row shape "
                            f"{tuple(tensor.shape[1:])}, earlier batches "
                            f"{tuple(array.shape[1:])}."
                        )
                    block = tensor.detach().to("cpu", getattr(torch, dtype)).numpy()
                    if row + n > array.shape[0]:
                        array.resize((max(row + n, 2 * array.shape[0]), *array.shape[1:]))
                    array[row : row + n] = block
                    factor_hasher.update(f"{k}/{kind}|{row}|".encode())
                    factor_hasher.update(
                        np.ascontiguousarray(block).view(np.uint8).reshape(-1).data
                    )
            hasher.update(x, y)
            if batch_ids is not None:
                collected_ids.append(_as_ids(batch_ids, n, "Batch ids"))
            row += n
        if row == 0:
            raise StoreError(
                f"The loader of test set {test_set!r} yielded no rows; the previous factors "
                "(if any) stay current."
            )
        for array in arrays.values():
            if array.shape[0] != row:
                array.resize((row, *array.shape[1:]))
        id_array = _write_test_ids(vgroup, test_set, row, ids, collected_ids)
        provenance.data_fingerprints["test_set"] = hasher.hexdigest()
        chunks = {f"{path}/ids": manifest(id_array)}
        for key, array in arrays.items():
            index, kind = key.split("/")
            chunks[f"{path}/layers/l{index}/{kind}"] = manifest(array)
        record = {
            "kind": "query",
            "n_rows": row,
            "n_parameters": int(influence.n_parameters),
            "dtype": dtype,
            "rank": rank,
            "modules": [layer["name"] for layer in layers],
            "fisher": getattr(influence, "fisher", None),
            "layers": layers,
            "nbytes": int(sum(a.nbytes for a in arrays.values())),
            "data_fingerprint": hasher.hexdigest(),
            "factors_fingerprint": factor_hasher.hexdigest(),
            "seconds": time.perf_counter() - start_time,
            **(annotations or {}),
            "block_mapper_digest": digest,
            "loss": loss_name(influence.loss),
            "path": path,
            "chunks": chunks,
            "provenance": provenance.to_json(),
        }
        vgroup.attrs.update({k: v for k, v in record.items() if k != "chunks"})
        store.location.sync_tree(path)
    except BaseException:
        store.location.remove_tree(path)
        raise
    store.location.write_json(store._factors_marker(test_set), record)  # the switch
    store._remove_other_versions(test_set, keep=version)
    return record


def _dims(kind: str) -> tuple[str, str]:
    return {"dense": ("out", "in"), "left": ("out", "rank"), "right": ("rank", "in")}[kind]


class StoredQueryFactors:
    """The stored query factors of a test set, read lazily: ``rows(start, stop)`` reads
    only the chunks holding those rows (each checked like every store read)."""

    def __init__(self, store: InfluenceStore, test_set: str, record: dict[str, Any]) -> None:
        self.store, self.test_set, self.record = store, test_set, record
        self.path = str(record["path"])

    @property
    def n_rows(self) -> int:
        return int(self.record["n_rows"])

    def __len__(self) -> int:
        return self.n_rows

    @property
    def rank(self) -> int | None:
        rank = self.record.get("rank")
        return None if rank is None else int(rank)

    @property
    def modules(self) -> list[str]:
        return list(self.record["modules"])

    @property
    def nbytes(self) -> int:
        return int(self.record["nbytes"])

    @property
    def row_block(self) -> int:
        """Test rows per block that reads whole chunks of every array (the smallest row
        chunk over the layers, as written)."""
        chunks = self.record["chunks"]
        sizes = [
            int(chunks[f"{self.path}/layers/{layer['group']}/{kind}"]["chunks"][0])
            for layer in self.record["layers"]
            for kind in layer["shapes"]
        ]
        return max(1, min(sizes))

    def _layers(self, selection: Any) -> QueryFactors:
        layers: OrderedDict[str, LayerQuery] = OrderedDict()
        for layer in self.record["layers"]:
            tensors = {
                kind: torch.from_numpy(
                    np.ascontiguousarray(
                        self.store._read(f"{self.path}/layers/{layer['group']}/{kind}", selection)
                    )
                )
                for kind in layer["shapes"]
            }
            layers[layer["name"]] = LayerQuery(**tensors)
        return QueryFactors(layers, self.rank)

    def select(self, positions: Sequence[int]) -> QueryFactors:
        """Query factors of the test rows at ``positions`` (e.g. a spot-check's few rows)."""
        index = [int(p) for p in positions]
        if not index or not all(0 <= p < self.n_rows for p in index):
            raise StoreError(
                f"positions {index} must be a non-empty list within the {self.n_rows} test "
                f"rows of {self.test_set!r}."
            )
        return self._layers((index,))

    def rows(self, start: int, stop: int) -> QueryFactors:
        """Query factors of test rows [start, stop) as tensors (the stored dtype)."""
        if not 0 <= start <= stop <= self.n_rows:
            raise StoreError(
                f"rows({start}, {stop}) is outside the {self.n_rows} test rows of "
                f"{self.test_set!r}."
            )
        return self._layers(slice(start, stop))

    def all(self) -> QueryFactors:
        return self.rows(0, self.n_rows)

    def blocks(self, block_rows: int | None = None) -> Iterable[tuple[int, QueryFactors]]:
        """(start, factors of rows start..start + block_rows) over all test rows."""
        step = block_rows or self.row_block
        for start in range(0, self.n_rows, step):
            yield start, self.rows(start, min(start + step, self.n_rows))


def check_query_factors(
    record: dict[str, Any], test_set: str, influence: Any = None, rank: Any = "any"
) -> None:
    """Refuse stored query factors made for another model or method (provenance),
    ``modules``, ``fisher`` or ``rank`` (``rank="any"`` accepts any stored rank)."""
    if record.get("kind") != "query":
        raise StoreError(
            f"The factors of test set {test_set!r} are dense (n_test, P) factors, not "
            "per-layer query factors: write them with write_query_factors."
        )
    differences = []
    if rank != "any" and record.get("rank") != check_rank(rank):
        differences.append(f"rank: stored {record.get('rank')!r}, given {rank!r}")
    if influence is not None:
        given_modules = list(getattr(influence, "modules", []))
        if record.get("modules") != given_modules:
            differences.append(f"modules: stored {record.get('modules')}, given {given_modules}")
        fisher = getattr(influence, "fisher", None)
        if record.get("fisher") != fisher:
            differences.append(f"fisher: stored {record.get('fisher')!r}, given {fisher!r}")
    if differences:
        raise ProvenanceMismatchError(
            f"The query factors of test set {test_set!r} were written for other settings:\n  "
            + "\n  ".join(differences)
            + f"\nCompute them again (materialize influence_factors[{test_set}], "
            "write_query_factors)."
        )
    if influence is not None:
        Provenance.from_json(record["provenance"]).check_matches(
            Provenance.of(influence), f"The query factors of test set {test_set!r}"
        )


def query_scores(
    influence: Any, stored: StoredQueryFactors, x: torch.Tensor, y: torch.Tensor, held: Any
) -> torch.Tensor:
    """Scores (n_test, b) of a training batch against the stored query factors: against
    ``held`` (all factors, in memory) when given, else one test row block at a time."""
    if held is not None:
        return influence.influences_from_factors(held, x, y)
    parts = [influence.influences_from_factors(block, x, y) for _, block in stored.blocks()]
    return torch.cat(parts, dim=0)
