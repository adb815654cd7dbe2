"""Scoring one training shard against stored influence factors.

Persisting is apart from computing: a :class:`ShardWriter` takes score blocks
(n_test, b[, *x.shape]) in training-row order and writes them into the shard's own column
range of ``scores/<test_set>``, one whole column block at a time (a buffer of
n_test × block-width float32, written by a background thread while the next one fills).
It keeps, per test point, the k largest (most helpful) and k smallest (most harmful)
scores with their rows, and per training example the sum, min and max over the test
points; ``finish`` writes those summaries, syncs, and marks the shard complete with a
record of the inputs (factors fingerprint, fitted-state digest, loss) and a manifest of
its chunks. A writer holds the shard's lease from start to finish: a second writer of the
same shard is refused while the first runs (local and in-memory stores; on object storage
the orchestrator must run one writer per shard). :func:`score_shard` feeds it
S = F ∇_θℓ(z_j) for the stored factors F and a shard loader, one batch at a time.
Memory: the factors, one batch of gradients, two column blocks.
"""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ..influence.types import InfluenceMode
from . import query_factors
from .chunks import WRITE_ALL_CHUNKS, manifest
from .errors import IncompleteArtifactError, ProvenanceMismatchError, StoreError
from .provenance import DataHasher, Provenance, loss_name, state_digest
from .query_factors import check_query_factors, query_scores
from .store import (
    ShardResult,
    _as_ids,
    _checksum_codecs,
    _require_group,
    _split_item,
    mode_value,
)

if TYPE_CHECKING:
    from .store import InfluenceStore


class _RunningTopK:
    """Per row, the k largest (or smallest) values seen so far, best first, and their
    column positions; among equal values the earlier column comes first, so the result
    does not depend on how the columns were cut into blocks.

    A block only contributes its candidates: the values strictly better than the row's
    current k-th value (or, while fewer than k are held, at least as good as the block's
    own k-th value). Past the first blocks these are a few per row, so an update costs a
    comparison pass over the block and a sort of k + a few values per row, instead of a
    partial sort of the whole block.
    """

    def __init__(self, n_rows: int, k: int, largest: bool) -> None:
        self.k, self.sign = k, 1.0 if largest else -1.0
        self.values = np.empty((n_rows, 0), np.float32)
        self.positions = np.empty((n_rows, 0), np.int64)

    def _candidates(self, block: np.ndarray) -> np.ndarray:
        """Flat indices into ``block`` of its candidates, row-major."""
        held, width, k = self.values.shape[1], block.shape[1], self.k
        largest = self.sign > 0
        if held == k:
            kth = self.values[:, -1:]
            mask = block > kth if largest else block < kth
        elif width > k:
            i = width - k if largest else k - 1
            kth = np.partition(block, i, axis=1)[:, i : i + 1]
            mask = block >= kth if largest else block <= kth
        else:
            return np.arange(block.size)
        # 1-d: numpy's flatnonzero is several times faster than a 2-d nonzero
        return np.flatnonzero(mask.reshape(-1))

    def update(self, block: np.ndarray, offset: int) -> None:
        """Take the (n_rows, b) ``block`` whose first column is column ``offset``; its
        values must be finite (the writer checks before calling)."""
        held, (n_rows, width) = self.values.shape[1], block.shape
        if width == 0:
            return
        block = np.ascontiguousarray(block)
        flat = self._candidates(block)
        if flat.size == 0:
            return
        rows_of, columns = np.divmod(flat, width)
        counts = np.bincount(rows_of, minlength=n_rows)
        rows = np.flatnonzero(counts)
        compact = (np.cumsum(counts > 0) - 1)[rows_of]
        within = np.arange(flat.size) - (np.cumsum(counts) - counts)[rows_of]
        worst = -self.sign * np.inf
        candidates = np.full((rows.size, int(counts.max())), worst, np.float32)
        candidate_positions = np.zeros(candidates.shape, np.int64)
        candidates[compact, within] = block.reshape(-1)[flat]
        candidate_positions[compact, within] = columns + offset
        values = np.concatenate([self.values[rows], candidates], axis=1)
        positions = np.concatenate([self.positions[rows], candidate_positions], axis=1)
        # stable: kept values (earlier columns) stay ahead of equal candidates
        order = np.argsort(-self.sign * values, axis=1, kind="stable")
        if held < self.k:  # every row takes part (the first blocks)
            held = min(self.k, held + width)
            order = order[:, :held]
            self.values = np.take_along_axis(values, order, 1)
            self.positions = np.take_along_axis(positions, order, 1)
        else:
            order = order[:, :held]
            self.values[rows] = np.take_along_axis(values, order, 1)
            self.positions[rows] = np.take_along_axis(positions, order, 1)


class ShardWriter:
    """Writes the scores of one allocated training shard (see the module docstring).

    ``add`` hands each block to a background thread, which checks it, updates the
    summaries and fills the column-block buffer; a full buffer goes to a second thread that
    encodes and writes it while the first fills the other buffer. So the caller computes
    the next scores meanwhile; at most two score blocks wait, and at most two column blocks
    are held. Errors of either thread surface at the next ``add`` or at ``finish``; nothing
    is marked complete unless ``finish`` returns.
    """

    def __init__(
        self,
        store: InfluenceStore,
        test_set: str,
        shard: str,
        *,
        top_k: int = 10,
        mode: Any = InfluenceMode.Up,
    ) -> None:
        mode = InfluenceMode(mode_value(mode))
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
        self._scores_key = store._scores_path(test_set, mode)
        if mode is InfluenceMode.Perturbation and not store._exists(self._scores_key):
            raise StoreError(
                f"No perturbation scores array for {test_set!r}: allocate the shards with "
                "input_shape (the shape of one input x) to write perturbation scores."
            )
        self.array = store._array(self._scores_key)
        self.n_test = int(self.array.shape[0])
        self._row_chunks = -(-self.n_test // self.array.chunks[0])  # chunk directories c/<r>
        if self.stop > self.array.shape[1]:
            raise StoreError(
                f"Shard {shard!r} is allocated columns {self.start}..{self.stop} but the "
                f"{mode.value} scores array of {test_set!r} has {self.array.shape[1]} columns: "
                "allocate the shards with input_shape to write perturbation scores."
            )
        self._lease = store.location.lease(
            f"_status/{self._scores_key}/{shard}.lease",
            f"Shard {shard!r} of test set {test_set!r} ({mode.value} scores)",
        )
        # the claim: the marker this writer writes is valid only while the claim is its own,
        # so on a store without leases a later writer's start voids an earlier writer's
        # marker, and an earlier writer that finishes after it writes none
        self._token = uuid.uuid4().hex
        self._claim_key = store._claim_key(test_set, shard, mode)
        store.location.write_json(self._claim_key, {"writer": self._token})
        store.location.delete(store._shard_marker(test_set, shard, mode))
        self.buffer = np.full((self.n_test, self.width, *self.array.shape[2:]), np.nan, np.float32)
        self.filled = 0
        self.next_column = self.start
        self.rows = 0  # rows handed to add()
        self._helpful = _RunningTopK(self.n_test, top_k, largest=True)
        self._harmful = _RunningTopK(self.n_test, top_k, largest=False)
        self._stats: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        self._ids: list[np.ndarray] = []
        self._pending: list[Future[None]] = []
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="shard-writer")
        self._io = ThreadPoolExecutor(max_workers=1, thread_name_prefix="shard-writer-io")
        self._writing: Future[None] | None = None  # the write of the other buffer
        self._spare: np.ndarray | None = None
        self._started = time.perf_counter()

    # ---------------------------------------------------------------- caller thread
    def add(self, scores: torch.Tensor | np.ndarray, ids: Any = None) -> None:
        """Append the scores of the next ``b`` training rows: (n_test, b[, *x.shape])."""
        if scores.shape[0] != self.n_test or tuple(scores.shape[2:]) != tuple(self.array.shape[2:]):
            raise StoreError(
                f"Score blocks must have shape ({self.n_test}, b, {tuple(self.array.shape[2:])}), "
                f"got {tuple(scores.shape)}."
            )
        n = int(scores.shape[1])
        if self.rows + n > self.stop - self.start:
            raise StoreError(
                f"Shard {self.shard!r} yields more rows than its {self.stop - self.start}-column "
                f"allocation ({self.expected_rows} rows): allocate it again with its new size."
            )
        if ids is not None:
            self._ids.append(_as_ids(ids, n, "Batch ids"))
        # the block is used after add() returns: never keep a view of the caller's memory
        if isinstance(scores, torch.Tensor):
            cpu = scores.detach().to("cpu", torch.float32)
            block = (cpu.clone() if cpu.data_ptr() == scores.data_ptr() else cpu).numpy()
        else:
            block = np.array(scores, dtype=np.float32, copy=True)
        while len(self._pending) >= 2:
            self._pending.pop(0).result()  # re-raises a failure of the writer thread
        self._pending.append(self._executor.submit(self._consume, block, self.rows))
        self.rows += n

    def _drain(self) -> None:
        while self._pending:
            self._pending.pop(0).result()

    def _stop(self) -> None:
        """Wait for the writer threads and stop them (also after a failure)."""
        try:
            self._drain()
        finally:
            self._executor.shutdown(wait=True)
            try:
                self._wait_for_write()
            finally:
                self._io.shutdown(wait=True)

    def close(self) -> None:
        """Stop the writer threads and give up the shard's lease (also after a failure)."""
        try:
            self._stop()
        finally:
            self._lease.release()

    # ---------------------------------------------------------------- writer thread
    def _consume(self, block: np.ndarray, offset: int) -> None:
        n = block.shape[1]
        # float64 sums of float32 values cannot overflow: a non-finite sum means NaN/inf
        sums = block.reshape(self.n_test, n, -1).sum(axis=(0, 2), dtype=np.float64)
        if not np.isfinite(sums).all():
            raise ValueError(
                f"Scores of shard {self.shard!r} rows {offset}..{offset + n - 1} against "
                f"{self.test_set!r} are not finite; the shard is not marked complete."
            )
        if self.mode is InfluenceMode.Up:
            self._helpful.update(block, offset)
            self._harmful.update(block, offset)
            self._stats.append((sums, block.min(axis=0), block.max(axis=0)))
        done = 0
        while done < n:
            take = min(self.width - self.filled, n - done)
            self.buffer[:, self.filled : self.filled + take] = block[:, done : done + take]
            self.filled += take
            done += take
            if self.filled == self.width:
                self._flush()

    def _wait_for_write(self) -> None:
        writing, self._writing = self._writing, None
        if writing is not None:
            writing.result()  # re-raises a failure of the io thread

    def _write_block(self, buffer: np.ndarray, column: int) -> None:
        """Write one column block and make it durable (here, so that the fsync overlaps
        with filling the other buffer rather than delaying ``finish``). A writer whose claim
        was taken over stops before writing over the new writer's blocks."""
        self._check_claim()
        self.array[:, column : column + self.width] = buffer
        block = column // self.width
        for row_chunk in range(self._row_chunks):
            self.store.location.sync_tree(f"{self._scores_key}/c/{row_chunk}/{block}")

    def _flush(self) -> None:
        self._wait_for_write()  # the spare buffer is free again
        self._writing = self._io.submit(self._write_block, self.buffer, self.next_column)
        self.next_column += self.width
        if self._spare is None:
            self._spare = np.empty_like(self.buffer)
        self.buffer, self._spare = self._spare, self.buffer
        self.buffer[...] = np.nan
        self.filled = 0

    def _write_remaining(self) -> None:
        while self.next_column < self.stop:  # the last, partly filled block and stale ones
            self._flush()
        self._wait_for_write()

    # ---------------------------------------------------------------- completion
    def finish(
        self, data_fingerprint: str, ids: Sequence[int] | np.ndarray | None = None
    ) -> ShardResult:
        """Write what is left, the summaries, sync, and mark the shard complete."""
        shard = self.shard
        if self.rows != self.expected_rows:
            self.close()
            raise StoreError(
                f"Shard {shard!r} yielded {self.rows} rows but was allocated with "
                f"{self.expected_rows}; the shard is not marked complete (allocate it again if "
                "its data changed)."
            )
        try:
            self._pending.append(self._executor.submit(self._write_remaining))
            self._stop()
            return self._complete(data_fingerprint, ids)
        finally:
            self._lease.release()

    def _check_claim(self) -> None:
        claim = self.store.location.read_json(self._claim_key)
        if claim is None or claim.get("writer") != self._token:
            raise StoreError(
                f"Another writer claimed shard {self.shard!r} of {self.test_set!r} while this "
                "one was writing; this writer marks nothing complete (the other writer's "
                "finish does, or run it again)."
            )

    def _complete(
        self, data_fingerprint: str, ids: Sequence[int] | np.ndarray | None
    ) -> ShardResult:
        store, test_set, shard = self.store, self.test_set, self.shard
        width = self.width
        chunks = {self._scores_key: manifest(self.array, (self.start // width, self.stop // width))}
        if ids is not None:
            shard_ids = _as_ids(ids, self.rows, f"ids of shard {shard!r}")
        elif self._ids:
            shard_ids = np.concatenate(self._ids)
        else:
            shard_ids = np.arange(self.start, self.start + self.rows, dtype=np.int64)
        self._check_claim()
        stats = _require_group(store.root, f"train_stats/{test_set}/{shard}")
        chunks.update(_write(stats, "ids", shard_ids, ("train",)))
        score_min = score_max = float("nan")
        if self.mode is InfluenceMode.Up:
            total, low, high = (np.concatenate(column) for column in zip(*self._stats, strict=True))
            score_min, score_max = float(low.min()), float(high.max())
            chunks.update(_write(stats, "sum", total, ("train",)))
            chunks.update(_write(stats, "min", low, ("train",)))
            chunks.update(_write(stats, "max", high, ("train",)))
            topk = _require_group(store.root, f"topk/{test_set}/{shard}")
            for name, tracker in (("helpful", self._helpful), ("harmful", self._harmful)):
                chunks.update(_write(topk, f"{name}_values", tracker.values, ("test", "k")))
                chunks.update(_write(topk, f"{name}_rows", tracker.positions, ("test", "k")))
        # the column blocks were synced as they were written; their directory entries now
        for row_chunk in range(self._row_chunks):
            store.location.sync_dir(f"{self._scores_key}/c/{row_chunk}")
        store.location.sync_tree(f"train_stats/{test_set}/{shard}")
        store.location.sync_tree(f"topk/{test_set}/{shard}")
        seconds = time.perf_counter() - self._started
        columns = (self.start, self.start + self.rows)
        self._check_claim()
        store.location.write_json(
            store._shard_marker(test_set, shard, self.mode),
            {
                "n_rows": self.rows,
                "columns": list(columns),
                "data_fingerprint": data_fingerprint,
                "factors_fingerprint": self.record["factors_fingerprint"],
                "block_mapper_digest": self.record.get("block_mapper_digest"),
                "loss": self.record.get("loss"),
                "mode": self.mode.value,
                "top_k": self.top_k,
                "seconds": seconds,
                "score_min": score_min,
                "score_max": score_max,
                "chunks": chunks,
                "writer": self._token,
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
    query_rank: Any = "any",
    hold_bytes: int | None = None,
) -> ShardResult:
    """Compute and write the scores of one shard with ``influence`` (see the module
    docstring). Against per-layer query factors (``write_query_factors``) the scores are
    the EK-FAC per-layer ones, with the factors held in memory up to ``hold_bytes``, else
    read one test row block at a time per training batch (default
    :data:`~influence_pipeline.store.query_factors.HOLD_BYTES`); ``query_rank`` (not
    "any") refuses factors of another rank."""
    record = store.factors_record(test_set)
    stored = Provenance.from_json(record["provenance"])
    stored.check_matches(Provenance.of(influence), f"The factors of test set {test_set!r}")
    made_with = record.get("block_mapper_digest")
    if made_with is not None and state_digest(influence) != made_with:
        raise ProvenanceMismatchError(
            f"The factors of test set {test_set!r} were computed with the fitted state "
            f"{made_with}, the influence model given has {state_digest(influence)}: score with "
            "the block mapper the factors were computed with, or compute the factors again."
        )
    loss = loss_name(influence.loss)
    if record.get("loss") is not None and loss != record["loss"]:
        raise ProvenanceMismatchError(
            f"The factors of test set {test_set!r} were computed with loss {record['loss']!r}, "
            f"the influence model given uses {loss!r}."
        )
    if record.get("kind") == "query":
        if mode is not InfluenceMode.Up:
            raise StoreError(
                f"The factors of test set {test_set!r} are per-layer query factors, which "
                "score up-weighting only; write dense factors (write_factors) for "
                "perturbation scores."
            )
        check_query_factors(record, test_set, influence, query_rank)
        queries = store.query_factors(test_set)
        held = (
            queries.all().to(influence.model_device, influence.model_dtype)
            if queries.nbytes <= (query_factors.HOLD_BYTES if hold_bytes is None else hold_bytes)
            else None
        )

        def score(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return query_scores(influence, queries, x, y, held)
    else:
        if query_rank != "any":
            raise ProvenanceMismatchError(
                f"The factors of test set {test_set!r} are dense (n_test, P) factors, not "
                f"query factors of rank {query_rank!r}: compute them again "
                "(write_query_factors)."
            )
        values, _ = store.read_factors(test_set)
        if not np.isfinite(values).all():
            raise IncompleteArtifactError(f"The stored factors of {test_set!r} contain NaN/inf.")
        factors = torch.from_numpy(values).to(
            device=influence.model_device, dtype=influence.model_dtype
        )

        def score(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return influence.influences_from_factors(factors, x, y, mode=mode)

    writer = ShardWriter(store, test_set, shard, top_k=top_k, mode=mode)
    hasher = DataHasher()
    try:
        for item in loader:
            x, y, batch_ids = _split_item(item)
            hasher.update(x, y)
            writer.add(score(x, y), batch_ids)
        return writer.finish(hasher.hexdigest(), ids)
    except BaseException:
        with contextlib.suppress(Exception):  # report the first error, not a follow-up
            writer.close()
        raise


def _write(group: Any, name: str, data: np.ndarray, dims: tuple[str, ...]) -> dict[str, Any]:
    """Write one summary array; returns its manifest entry {path: grid}."""
    array = group.create_array(
        name,
        data=data,
        compressors=_checksum_codecs(),
        dimension_names=dims,
        overwrite=True,
        config=WRITE_ALL_CHUNKS,
    )
    return {array.path: manifest(array)}
