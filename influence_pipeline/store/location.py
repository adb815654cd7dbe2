"""Where a store lives: a Zarr store for arrays, an fsspec filesystem for small JSON files.

Local paths (and ``file://`` URLs) use Zarr's ``LocalStore``; other URLs use
``FsspecStore``. Small JSON documents (completion markers) are written atomically: a
temporary file renamed into place (and fsynced) locally, a single PUT elsewhere; one that
no longer decodes (truncated, a flipped byte) raises :class:`StoreCorruptionError` naming
the file. Allocation of training shards runs under :meth:`StoreLocation.lock`, an
exclusive file lock on a local store and a process-wide lock in memory; object stores have
no lock (``has_lock`` is False), so allocation must come from one process there (the
pipeline does it before fanning out). :meth:`StoreLocation.lease` is a non-blocking
exclusive claim (a shard writer holds one while it writes): an ``flock`` on a local store,
released by the kernel when its process dies, a process-wide claim in memory.
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

from .errors import StoreCorruptionError, StoreError

_MEMORY_LOCK = threading.Lock()
_MEMORY_LEASES: set[tuple[str, str]] = set()


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
        """The JSON document ``key``, or None when there is none; one that does not decode
        raises :class:`StoreCorruptionError` naming the file."""
        try:
            with self.fs.open(self._join(key), "rb") as handle:
                data = handle.read()
        except FileNotFoundError:
            return None
        try:
            return json.loads(data)
        except ValueError as error:  # JSONDecodeError, UnicodeDecodeError
            raise StoreCorruptionError(
                f"The file {self._join(key)!r} is damaged ({type(error).__name__}: {error}); "
                "delete it and re-run the step that writes it."
            ) from error

    def exists_key(self, key: str) -> bool:
        if self.is_local:
            return os.path.exists(self.local_path(key))
        return bool(self.fs.exists(self._join(key)))

    def list_files(self, prefix: str) -> set[str]:
        """Keys (relative to ``prefix``) of every file under ``prefix``."""
        base = self._join(prefix).rstrip("/")
        if self.is_local:
            top = self.local_path(prefix)
            found: set[str] = set()
            for directory, _, files in os.walk(top):
                rel = os.path.relpath(directory, top)
                for name in files:
                    found.add(name if rel == "." else f"{rel.replace(os.sep, '/')}/{name}")
            return found
        try:
            entries = self.fs.find(base)
        except FileNotFoundError:
            return set()
        strip = base.lstrip("/") + "/"
        return {
            str(e).lstrip("/")[len(strip) :]
            for e in entries
            if str(e).lstrip("/").startswith(strip)
        }

    def remove_tree(self, key: str) -> None:
        """Delete ``key`` and everything under it (nothing if absent)."""
        path = self._join(key)
        with contextlib.suppress(FileNotFoundError):
            if self.fs.exists(path):
                self.fs.rm(path, recursive=True)
        if self.is_local:
            fsync_dir(os.path.dirname(self.local_path(key)))

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

    @property
    def has_lock(self) -> bool:
        """Whether :meth:`lock` excludes other writers (local and in-memory stores)."""
        return self.is_local or "memory" in _protocols(self.fs)

    def lease(self, key: str, what: str) -> Lease:
        """Claim ``key`` exclusively without waiting; raises :class:`StoreError` naming
        ``what`` when another writer holds it. Release with :meth:`Lease.release`."""
        return Lease(self, key, what)

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


class Lease:
    """An exclusive, non-blocking claim of one key (see :meth:`StoreLocation.lease`).
    Object stores have no exclusion: there the lease only records its holder."""

    def __init__(self, location: StoreLocation, key: str, what: str) -> None:
        self.location, self.key = location, key
        self._handle: Any = None
        self._memory: tuple[str, str] | None = None
        if location.is_local:
            import fcntl

            path = location.local_path(key)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            handle = open(path, "a+b")  # noqa: SIM115 - held until release()
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.close()
                raise StoreError(
                    f"{what} is being written by another writer (it holds the lease "
                    f"{path!r}); wait for it to finish or stop it, then run again."
                ) from None
            self._handle = handle
        elif "memory" in _protocols(location.fs):
            claim = (location.url, key)
            with _MEMORY_LOCK:
                if claim in _MEMORY_LEASES:
                    raise StoreError(
                        f"{what} is being written by another writer (lease {key!r}); wait for "
                        "it to finish, then run again."
                    )
                _MEMORY_LEASES.add(claim)
            self._memory = claim

    def release(self) -> None:
        if self._handle is not None:
            import fcntl

            with contextlib.suppress(OSError, ValueError):
                fcntl.flock(self._handle.fileno(), fcntl.LOCK_UN)
            self._handle.close()
            self._handle = None
        if self._memory is not None:
            with _MEMORY_LOCK:
                _MEMORY_LEASES.discard(self._memory)
            self._memory = None


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
