"""Scoring one training shard against stored influence factors.

Persisting is apart from computing: a :class:`ShardWriter` takes score blocks
(n_test, b[, *x.shape]) in training-row order and writes them into the shard's own column
range of ``scores/<test_set>``, one whole Zarr shard at a time (a buffer of
n_test × shard_width float32); it keeps, per test point, the k largest (most helpful) and
k smallest (most harmful) scores with their rows, and per training example the sum, min
and max over the test points; ``finish`` writes those summaries, syncs, and marks the
shard complete. :func:`score_shard` feeds it S = F ∇_θℓ(z_j) for the stored factors F and
a shard loader, one batch at a time. Memory: the factors, one batch of gradients, one Zarr
shard of scores.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ..influence.types import InfluenceMode
from .errors import IncompleteArtifactError, StoreError
from .provenance import DataHasher, Provenance
from .store import ShardResult, _as_ids, _checksum_codecs, _split_item

if TYPE_CHECKING:
    from .store import InfluenceStore


class _RunningTopK:
    """Per row, the k largest values seen so far and their column positions."""

    def __init__(self, n_rows: int, k: int, device: torch.device, dtype: torch.dtype) -> None:
        self.k = k
        self.values = torch.zeros((n_rows, 0), device=device, dtype=dtype)
        self.positions = torch.zeros((n_rows, 0), dtype=torch.int64, device=device)

    def update(self, block: torch.Tensor, offset: int) -> None:
        positions = torch.arange(offset, offset + block.shape[1], device=block.device)
        values = torch.cat([self.values, block], dim=1)
        positions = torch.cat([self.positions, positions.expand_as(block)], dim=1)
        k = min(self.k, values.shape[1])
        self.values, index = torch.topk(values, k, dim=1)
        self.positions = torch.gather(positions, 1, index)


class ShardWriter:
    """Writes the scores of one allocated training shard (see the module docstring)."""

    def __init__(
        self,
        store: InfluenceStore,
        test_set: str,
        shard: str,
        *,
        top_k: int = 10,
        mode: InfluenceMode = InfluenceMode.Up,
    ) -> None:
        if top_k < 1:
            raise StoreError(f"top_k must be at least 1, got {top_k}.")
        self.store, self.test_set, self.shard, self.mode, self.top_k = (
            store,
            test_set,
            shard,
            mode,
            top_k,
        )
        self.record = store.factors_record(test_set)
        allocation = store.allocation(test_set)
        slot = allocation["shards"][shard]
        self.width = int(allocation["shard_width"])
        self.start, self.stop = int(slot["start"]), int(slot["stop"])
        self.expected_rows = int(slot["n_rows"])
        self.array = store._array(store._scores_path(test_set, mode))
        self.n_test = int(self.array.shape[0])
        store.location.delete(store._shard_marker(test_set, shard))
        self.buffer = np.full(
            (self.n_test, self.width, *self.array.shape[2:]), np.nan, dtype=np.float32
        )
        self.filled = 0
        self.next_column = self.start
        self.rows = 0
        self._helpful: _RunningTopK | None = None
        self._harmful: _RunningTopK | None = None
        self._stats: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        self._ids: list[np.ndarray] = []
        self._started = time.perf_counter()

    def _flush(self) -> None:
        self.array[:, self.next_column : self.next_column + self.width] = self.buffer
        self.next_column += self.width
        self.buffer[...] = np.nan
        self.filled = 0

    def add(self, scores: torch.Tensor, ids: Any = None) -> None:
        """Append the scores of the next ``b`` training rows: (n_test, b[, *x.shape])."""
        n = int(scores.shape[1])
        if scores.shape[0] != self.n_test:
            raise StoreError(f"Score blocks need {self.n_test} test rows, got {scores.shape[0]}.")
        if self.rows + n > self.stop - self.start:
            raise StoreError(
                f"Shard {self.shard!r} yields more rows than its {self.stop - self.start}-column "
                f"allocation ({self.expected_rows} rows): allocate it again with its new size."
            )
        if not bool(torch.isfinite(scores).all()):
            raise ValueError(
                f"Scores of shard {self.shard!r} rows {self.rows}..{self.rows + n - 1} against "
                f"{self.test_set!r} are not finite; the shard is not marked complete."
            )
        if self.mode is InfluenceMode.Up:
            if self._helpful is None:
                self._helpful = _RunningTopK(self.n_test, self.top_k, scores.device, scores.dtype)
                self._harmful = _RunningTopK(self.n_test, self.top_k, scores.device, scores.dtype)
            assert self._harmful is not None
            self._helpful.update(scores, self.rows)
            self._harmful.update(-scores, self.rows)
            self._stats.append(
                (
                    scores.sum(dim=0).double().cpu().numpy(),
                    scores.min(dim=0).values.cpu().numpy(),
                    scores.max(dim=0).values.cpu().numpy(),
                )
            )
        if ids is not None:
            self._ids.append(_as_ids(ids, n, "Batch ids"))
        block = scores.detach().to("cpu", torch.float32).numpy()
        offset = 0
        while offset < n:
            take = min(self.width - self.filled, n - offset)
            self.buffer[:, self.filled : self.filled + take] = block[:, offset : offset + take]
            self.filled += take
            offset += take
            if self.filled == self.width:
                self._flush()
        self.rows += n

    def finish(
        self, data_fingerprint: str, ids: Sequence[int] | np.ndarray | None = None
    ) -> ShardResult:
        """Write what is left, the summaries, sync, and mark the shard complete."""
        store, test_set, shard = self.store, self.test_set, self.shard
        if self.rows != self.expected_rows:
            raise StoreError(
                f"Shard {shard!r} yielded {self.rows} rows but was allocated with "
                f"{self.expected_rows}; the shard is not marked complete (allocate it again if "
                "its data changed)."
            )
        while self.next_column < self.stop:  # the last, partly filled Zarr shard and stale ones
            self._flush()
        if ids is not None:
            shard_ids = _as_ids(ids, self.rows, f"ids of shard {shard!r}")
        elif self._ids:
            shard_ids = np.concatenate(self._ids)
        else:
            shard_ids = np.arange(self.start, self.start + self.rows, dtype=np.int64)
        stats = store.root.require_group("train_stats").require_group(test_set).require_group(shard)
        _write(stats, "ids", shard_ids, ("train",))
        score_min = score_max = float("nan")
        if self.mode is InfluenceMode.Up:
            assert self._helpful is not None and self._harmful is not None
            total, low, high = (np.concatenate(column) for column in zip(*self._stats, strict=True))
            score_min, score_max = float(low.min()), float(high.max())
            _write(stats, "sum", total, ("train",))
            _write(stats, "min", low.astype(np.float32), ("train",))
            _write(stats, "max", high.astype(np.float32), ("train",))
            topk = store.root.require_group("topk").require_group(test_set).require_group(shard)
            for name, tracker, sign in (
                ("helpful", self._helpful, 1),
                ("harmful", self._harmful, -1),
            ):
                values = (sign * tracker.values).to("cpu", torch.float32).numpy()
                _write(topk, f"{name}_values", values, ("test", "k"))
                _write(topk, f"{name}_rows", tracker.positions.cpu().numpy(), ("test", "k"))
        scores_key = store._scores_path(test_set, self.mode)
        for row_shard in store.location.list_dirs(f"{scores_key}/c"):
            for column_shard in range(self.start // self.width, self.stop // self.width):
                store.location.sync_tree(f"{scores_key}/c/{row_shard}/{column_shard}")
        store.location.sync_tree(f"train_stats/{test_set}/{shard}")
        store.location.sync_tree(f"topk/{test_set}/{shard}")
        seconds = time.perf_counter() - self._started
        columns = (self.start, self.start + self.rows)
        store.location.write_json(
            store._shard_marker(test_set, shard),
            {
                "n_rows": self.rows,
                "columns": list(columns),
                "data_fingerprint": data_fingerprint,
                "factors_fingerprint": self.record["factors_fingerprint"],
                "mode": self.mode.value,
                "top_k": self.top_k,
                "seconds": seconds,
                "score_min": score_min,
                "score_max": score_max,
            },
        )
        return ShardResult(
            test_set, shard, self.rows, columns, data_fingerprint, seconds, score_min, score_max
        )


def score_shard(
    store: InfluenceStore,
    test_set: str,
    shard: str,
    influence: Any,
    loader: Iterable[Any],
    *,
    top_k: int,
    ids: Sequence[int] | np.ndarray | None,
    mode: InfluenceMode,
) -> ShardResult:
    """Compute and write the scores of one shard with ``influence`` (see the module docstring)."""
    record = store.factors_record(test_set)
    stored = Provenance.from_json(record["provenance"])
    stored.check_matches(Provenance.of(influence), f"The factors of test set {test_set!r}")
    writer = ShardWriter(store, test_set, shard, top_k=top_k, mode=mode)
    values = store._read(f"factors/{test_set}/values", ...)
    if not np.isfinite(values).all():
        raise IncompleteArtifactError(f"The stored factors of {test_set!r} contain NaN/inf.")
    factors = torch.from_numpy(values).to(
        device=influence.model_device, dtype=influence.model_dtype
    )
    hasher = DataHasher()
    for item in loader:
        x, y, batch_ids = _split_item(item)
        hasher.update(x, y)
        writer.add(influence.influences_from_factors(factors, x, y, mode=mode), batch_ids)
    return writer.finish(hasher.hexdigest(), ids)


def _write(group: Any, name: str, data: np.ndarray, dims: tuple[str, ...]) -> None:
    group.create_array(
        name, data=data, compressors=_checksum_codecs(), dimension_names=dims, overwrite=True
    )
