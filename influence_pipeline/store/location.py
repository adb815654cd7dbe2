"""Where a store lives: a Zarr store for arrays, an fsspec filesystem for small JSON files.

Local paths (and ``file://`` URLs) use Zarr's ``LocalStore``; other URLs use
``FsspecStore``. Small JSON documents (completion markers) are written atomically: a
temporary file renamed into place (and fsynced) locally, a single PUT elsewhere.
Allocation of training shards runs under :meth:`StoreLocation.lock`, an exclusive file
lock on a local store and a process-wide lock in memory; object stores have no lock, so
allocation must come from one process there (the pipeline does it before fanning out).
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
import uuid
from collections.abc import Iterator
from typing import Any

import fsspec
import zarr
from zarr.storage import FsspecStore, LocalStore

_MEMORY_LOCK = threading.Lock()


class StoreLocation:
    def __init__(self, root: str | os.PathLike[str], storage_options: dict[str, Any] | None = None):
        url = os.fspath(root)
        self.url = url
        self.storage_options = dict(storage_options or {})
        fs, path = fsspec.core.url_to_fs(url, **self.storage_options)
        self.fs = fs
        self.path = path.rstrip("/")
        self.is_local = "file" in _protocols(fs)
        if self.is_local:
            self.path = os.path.abspath(self.path)

    def __repr__(self) -> str:
        return f"StoreLocation({self.url!r})"

    def exists(self) -> bool:
        return bool(self.fs.exists(self._join("zarr.json")))

    def zarr_store(self, read_only: bool) -> Any:
        if self.is_local:
            return LocalStore(self.path, read_only=read_only)
        return FsspecStore.from_url(
            self.url, storage_options=self.storage_options or None, read_only=read_only
        )

    def open_group(self, mode: str) -> zarr.Group:
        return zarr.open_group(self.zarr_store(read_only=mode == "r"), mode=mode)  # type: ignore[arg-type]

    def _join(self, key: str) -> str:
        return f"{self.path}/{key}" if key else self.path

    def local_path(self, key: str) -> str:
        assert self.is_local
        return os.path.join(self.path, *key.split("/"))

    # -------------------------------------------------------------- small JSON documents
    def write_json(self, key: str, value: Any) -> None:
        data = json.dumps(value, indent=1, sort_keys=True).encode()
        if self.is_local:
            path = self.local_path(key)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            tmp = f"{path}.{uuid.uuid4().hex}.tmp"
            with open(tmp, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, path)
            fsync_dir(os.path.dirname(path))
        else:
            self.fs.pipe_file(self._join(key), data)

    def read_json(self, key: str) -> Any | None:
        try:
            with self.fs.open(self._join(key), "rb") as handle:
                return json.loads(handle.read())
        except FileNotFoundError:
            return None

    def delete(self, key: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm_file(self._join(key))
        if self.is_local:
            fsync_dir(os.path.dirname(self.local_path(key)))

    def list_json(self, prefix: str) -> list[str]:
        """Names (without .json) of the JSON documents directly under ``prefix``."""
        try:
            entries = self.fs.ls(self._join(prefix), detail=False)
        except FileNotFoundError:
            return []
        names = [os.path.basename(str(e).rstrip("/")) for e in entries]
        return sorted(n[: -len(".json")] for n in names if n.endswith(".json"))

    def list_dirs(self, key: str) -> list[str]:
        """Names of the sub-directories of ``key`` on a local store (empty elsewhere)."""
        if not self.is_local:
            return []
        try:
            return sorted(e.name for e in os.scandir(self.local_path(key)) if e.is_dir())
        except FileNotFoundError:
            return []

    def sync_tree(self, key: str) -> None:
        """fsync the file ``key`` or every file under it (local stores; object stores are
        durable once a PUT returns)."""
        if not self.is_local:
            return
        top = self.local_path(key)
        if os.path.isfile(top):
            with open(top, "rb") as handle:
                os.fsync(handle.fileno())
            return
        for directory, _, files in os.walk(top):
            for name in files:
                with open(os.path.join(directory, name), "rb") as handle:
                    os.fsync(handle.fileno())
            fsync_dir(directory)

    def sync_dir(self, key: str) -> None:
        """fsync the directory ``key`` itself (its entries; local stores only)."""
        if self.is_local:
            fsync_dir(self.local_path(key))

    @contextlib.contextmanager
    def lock(self, name: str = "allocation") -> Iterator[None]:
        if self.is_local:
            import fcntl

            os.makedirs(self.local_path("_status"), exist_ok=True)
            with open(self.local_path(f"_status/{name}.lock"), "a+b") as handle:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
                try:
                    yield
                finally:
                    fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
        elif "memory" in _protocols(self.fs):
            with _MEMORY_LOCK:
                yield
        else:
            yield


def fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _protocols(fs: Any) -> tuple[str, ...]:
    protocol = fs.protocol
    return (protocol,) if isinstance(protocol, str) else tuple(protocol)
