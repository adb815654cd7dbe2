"""Persisted influence artifacts in one Zarr store per workload.

Layout under the store root (a local path or any fsspec URL: ``file://``, ``memory://``,
``s3://`` with s3fs)::

    block_mapper/               attrs: current version, its provenance
      v-<digest>/               one fitted state: attrs (method, config, blocks) +
        b<i>/<tensor>             a float array per operator tensor (no pickle)
    factors/<test_set>/
      values                    (n_test, P) float32|float64, row chunks, NaN = not computed
      ids                       (n_test,) int64 test ids
      (or, for EK-FAC query factors, ``layers/l<k>/dense`` or ``left``/``right``: one
      group per layer, chunked by test rows; see ``query_factors.py``)
    scores/<test_set>           (n_test, n_columns) float32; each training shard owns whole
                                column blocks (one chunk wide, all test rows) along the
                                train axis; attrs: the allocation shard → column range,
                                the block width (``shard_width``)
    topk/<test_set>/<shard>/    per test point the shard's top-k helpful and harmful
                                (values, rows within the shard)
    train_stats/<test_set>/<shard>/  ids (n_rows,), and per training example the sum, min
                                and max of its scores over the test set
    _status/                    completion markers (small JSON files, written atomically)
    tables/                     parquet tables written by the pipeline

Rules:

* Arrays are created, and training shards allocated, by one process before any fan-out
  (``allocate_shards``, idempotent; on a local store it also takes a file lock;
  ``ensure_allocated`` allocates one late shard only where there is a lock). A shard
  writer then writes only the whole chunks it owns, under the shard's lease, so parallel
  writers never share a chunk (Zarr silently loses data when two writers touch one chunk
  or shard). The scores use plain
  ~8 MiB chunks rather than Zarr sharding: on the reference machine unsharded chunks wrote
  ~780 MB/s and read ~1.1 GB/s against ~480/670 MB/s sharded (``benchmarks/store_benchmark.py``),
  at the price of one file per chunk.
* Completion is a marker written after the data (and its summaries) are written and
  synced; a writer first removes its marker, so a crash leaves the shard incomplete and
  ``status()`` reports it missing; re-running redoes exactly the incomplete shards. A
  marker records the inputs (factors fingerprint, fitted-state digest, loss) and a
  manifest of its chunks: a shard of other inputs is stale, one with a lost or corrupt
  chunk damaged, and neither is served (see ``store.py``).
* Factors and block mappers are replaced atomically: written beside the current version,
  made current by one write once complete.
* Every artifact carries provenance (model fingerprint, method and config, block
  structure, data fingerprints, code and library versions, created_at); using factors of
  another model, method or block structure, or loading a block mapper onto another model,
  raises :class:`ProvenanceMismatchError`.
* Every chunk carries a crc32c checksum; a corrupted or missing chunk raises
  :class:`StoreCorruptionError` naming the array and the chunk.
* Names from outside (test sets, shards, tables) pass :func:`validate_name` first.

Importing this package (and reading a store) does not import torch; the writers import it
when called.
"""

from typing import TYPE_CHECKING, Any

from .errors import (
    IncompleteArtifactError,
    ProvenanceMismatchError,
    StaleArtifactError,
    StoreCorruptionError,
    StoreError,
)
from .provenance import Provenance, data_fingerprint, model_fingerprint
from .schemas import TABLES, Column, TableSchema
from .store import ArtifactState, InfluenceStore, ShardResult, ShardSpec, validate_name

if TYPE_CHECKING:
    from .scoring import ShardWriter


def __getattr__(name: str) -> Any:
    if name in ("ShardWriter", "scoring"):  # imports torch: only when asked for
        import importlib

        scoring = importlib.import_module(f"{__name__}.scoring")
        return scoring if name == "scoring" else scoring.ShardWriter
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "TABLES",
    "ArtifactState",
    "Column",
    "IncompleteArtifactError",
    "InfluenceStore",
    "Provenance",
    "ProvenanceMismatchError",
    "ShardResult",
    "ShardSpec",
    "ShardWriter",
    "StaleArtifactError",
    "StoreCorruptionError",
    "StoreError",
    "TableSchema",
    "data_fingerprint",
    "model_fingerprint",
    "validate_name",
]
