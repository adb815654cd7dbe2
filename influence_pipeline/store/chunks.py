"""Chunk-level integrity: which chunk files an array region has, and which one is bad.

Zarr names the chunk at grid coordinates (i, j, ...) ``c/i/j/...`` (``c`` for a 0-d
array). A completion record keeps an array's grid (shape, chunk shape and, for a shard's
column range of the scores, the range of chunk columns): :func:`grid_keys` lists the files
that must exist, with no per-chunk bookkeeping, so the record's size does not grow with
the data. :func:`selection_chunks` gives the chunks a read touches, so every read checks
exactly the files it needs. Arrays are written with :data:`WRITE_ALL_CHUNKS`.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import zarr

#: Write every chunk, even one equal to the fill value, so that a missing chunk file is
#: always damage (Zarr's default skips such chunks and reads them back as fill values).
WRITE_ALL_CHUNKS: Any = {"write_empty_chunks": True}


def grid_keys(
    shape: Sequence[int], chunks: Sequence[int], columns: tuple[int, int] | None = None
) -> list[str]:
    """Chunk keys ('c/i/j', 'c' for 0-d) of an array's chunk grid; ``columns`` restricts
    the second axis to the chunk indices [first, stop)."""
    if any(int(s) == 0 for s in shape):
        return []
    grid: list[Iterable[int]] = [
        range(math.ceil(s / c)) for s, c in zip(shape, chunks, strict=True)
    ]
    if columns is not None:
        grid[1] = range(*columns)
    return ["/".join(["c", *map(str, coords)]) for coords in itertools.product(*grid)]


def manifest(array: zarr.Array, columns: tuple[int, int] | None = None) -> dict[str, Any]:
    """What a completion record keeps of an array: its grid, to find missing chunks."""
    entry: dict[str, Any] = {"shape": list(array.shape), "chunks": list(array.chunks)}
    if columns is not None:
        entry["columns"] = list(columns)
    return entry


def selection_chunks(
    selection: Any, shape: Sequence[int], chunks: Sequence[int]
) -> list[list[int]]:
    """Per axis, the chunk indices that ``array[selection]`` (or an orthogonal selection)
    touches."""
    items = list(selection) if isinstance(selection, tuple) else [selection]
    if any(item is Ellipsis for item in items):
        at = next(i for i, item in enumerate(items) if item is Ellipsis)
        items = items[:at] + [slice(None)] * (len(shape) - len(items) + 1) + items[at + 1 :]
    items += [slice(None)] * (len(shape) - len(items))
    result: list[list[int]] = []
    for item, n, c in zip(items, shape, chunks, strict=True):
        if n == 0:
            result.append([])
        elif isinstance(item, slice):
            start, stop, step = item.indices(n)
            if step == 1:
                result.append(list(range(start // c, (stop - 1) // c + 1)) if stop > start else [])
            else:
                result.append(sorted({i // c for i in range(start, stop, step)}))
        elif isinstance(item, (int, np.integer)):
            result.append([(int(item) % n) // c])
        else:
            index = np.asarray(item)
            if index.dtype == bool:
                index = np.flatnonzero(index)
            result.append(sorted(set((index.astype(np.int64) % n // c).tolist())))
    return result


def looks_like_corruption(error: BaseException) -> bool:
    text = str(error).lower()
    return any(
        s in text for s in ("checksum", "decompress", "corrupt", "unexpected", "buffer", "invalid")
    )


def locate_bad_chunk(
    array: zarr.Array, candidates: Sequence[Sequence[int]]
) -> tuple[int, ...] | None:
    """The first of the ``candidates`` chunks (grid coordinates) that cannot be read back."""
    chunks = array.chunks
    for coords in candidates:
        region = tuple(
            slice(i * c, min((i + 1) * c, s))
            for i, c, s in zip(coords, chunks, array.shape, strict=True)
        )
        try:
            array[region]
        except Exception:
            return tuple(int(i) for i in coords)
    return None
