"""Shared steps of the assets: devices, fingerprints, restoring the fitted block mapper."""

import functools
import hashlib
import json
from collections.abc import Callable
from typing import Any, TypeVar, cast

import dagster as dg
import torch

from ..store import InfluenceStore
from ..store.provenance import DataHasher
from ..workload import ShardData, Workload, method_of_class


def resolve_device(requested: Any) -> torch.device:
    """``auto`` is CUDA when torch sees a GPU, else the CPU (a string or a config enum)."""
    requested = str(getattr(requested, "value", requested))
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(requested)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' was requested but torch sees no CUDA device.")
    return device


def fit_fingerprint(workload: Workload) -> str:
    """Digest of the fit shards' names and fingerprints (cheap; no data is read)."""
    items = [[name, workload.shards.fingerprint(name)] for name in workload.fit_shard_names()]
    return hashlib.blake2b(json.dumps(items).encode(), digest_size=16).hexdigest()


def data_fingerprint(data: ShardData, batch_size: int = 4096) -> str:
    """Content digest of a shard's (x, y), the same the store's writers record."""
    hasher = DataHasher()
    for start in range(0, len(data), batch_size):
        hasher.update(data.x[start : start + batch_size], data.y[start : start + batch_size])
    return hasher.hexdigest()


def restore(
    store: InfluenceStore, workload: Workload, device: torch.device, batch_size: int
) -> Any:
    """The stored block mapper on a freshly loaded model (with the fit data loader when the
    method streams it at query time)."""
    info = store.block_mapper_info()
    if info is None:
        raise ValueError(f"{store!r} has no fitted block mapper: materialize block_mapper first.")
    model = workload.load_model(device)
    data = None
    if method_of_class(info["provenance"]["method"]).streams_fit_data:
        data = workload.fit_data().fit_loader(batch_size)
    return store.load_block_mapper(model, workload.loss, data=data)


def combine(*parts: str) -> str:
    return hashlib.blake2b("|".join(parts).encode(), digest_size=16).hexdigest()


F = TypeVar("F", bound=Callable[..., Any])


def fail_clearly(fn: F) -> F:
    """Turn the engine's and the store's input errors (ValueError, TypeError, StoreError:
    bad checkpoint, non-finite data, shapes, provenance) into a Dagster Failure that names
    the problem and is not retried (retrying would fail the same way); other errors keep
    the asset's retry policy."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (ValueError, TypeError) as error:
            raise dg.Failure(
                description=f"{type(error).__name__}: {error}", allow_retries=False
            ) from error

    return cast(F, wrapper)
