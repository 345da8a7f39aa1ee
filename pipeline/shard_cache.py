"""A bounded local cache of the files of datasets in an object store, least recently used out.

A dataset opened by URI (`TokenDataset("s3://bucket/datasets/en")`) maps its shards from here, so the
mixer reads a cached shard exactly as it reads one on local disk: memory-mapped, zero-copy. A shard is
fetched when a read first touches it, as byte ranges in parallel (`FETCH_PARTS` at a time, each range a
read the store layer retries), into a temporary file that becomes the cache entry only once its sha256
equals the manifest's; a mismatch (the object changed after the dataset was written, or is damaged)
raises DatasetError naming the object, and nothing of it is served.

Entries are named by their sha256, so they are immutable and shared by every process using the folder
(the service, each trainer rank), and a later process starts warm. A file found in the folder is trusted
by its name and size: it was renamed into place only after its hash matched.

The folder holds at most `max_bytes` of entries: before a fetch the least recently used are removed
until the new one fits (a shard larger than the whole cache is refused, naming both sizes). A removed
shard that some read still has mapped stays readable (the kernel keeps an unlinked file's pages while
they are mapped) and its space returns when that read ends. If the folder is deleted under a running
process, mapped shards keep working and the next fetch recreates it. A disk that fills up anyway (other
users of the file system) makes the cache drop everything else it holds and try once more, then
raises CacheError naming the folder.
"""

from __future__ import annotations

import errno
import os
import secrets
import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline import storage
from pipeline.errors import DatasetError, PipelineError
from pipeline.file_digest import sha256_file

DEFAULT_CACHE_BYTES = 64 << 30
PART_BYTES = 8 << 20  # one ranged read
FETCH_PARTS = 8  # ranged reads in flight per shard


class CacheError(PipelineError):
    """The local cache cannot hold what a read needs; the message names the folder and what to do."""


def default_cache_dir() -> Path:
    """$REPLAYMIX_CACHE_DIR, else ~/.cache/replaymix (under $XDG_CACHE_HOME when set)."""
    if os.environ.get("REPLAYMIX_CACHE_DIR"):
        return Path(os.environ["REPLAYMIX_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "replaymix"


@dataclass(frozen=True)
class CacheConfig:
    """Where remote datasets are cached, and how many bytes of shards the folder may hold."""

    folder: Path
    max_bytes: int = DEFAULT_CACHE_BYTES

    @classmethod
    def default(cls) -> "CacheConfig":
        size = os.environ.get("REPLAYMIX_CACHE_BYTES")
        return cls(default_cache_dir(), int(size) if size else DEFAULT_CACHE_BYTES)


@dataclass
class _Entry:
    path: Path
    size: int
    array: np.ndarray | None = None  # the mapped tokens, once asked for as an array


class ShardCache:
    """Files of remote datasets, fetched on demand, checked against their sha256, evicted LRU."""

    def __init__(self, config: CacheConfig):
        if config.max_bytes < 1:
            raise CacheError(f"--cache-bytes {config.max_bytes}: must be positive")
        self.folder, self.max_bytes = Path(config.folder), config.max_bytes
        self._entries: OrderedDict[str, _Entry] = OrderedDict()  # sha256 -> entry, least recent first
        self._lock = threading.Lock()  # guards _entries
        self._fetching = threading.Lock()  # one fetch at a time: a shard is never fetched twice at once
        self.fetched_bytes = 0  # bytes read from stores by this process (for tests and benchmarks)
        self._adopt_existing()

    def _adopt_existing(self) -> None:
        """Entries left by earlier processes, oldest use first."""
        if not self.folder.is_dir():
            return
        found = []
        for path in self.folder.iterdir():
            if len(path.name) == 64 and path.is_file():
                stat = path.stat()
                found.append((stat.st_mtime, path.name, _Entry(path, stat.st_size)))
        for _, name, entry in sorted(found):
            self._entries[name] = entry

    @property
    def used_bytes(self) -> int:
        return sum(entry.size for entry in self._entries.values())

    def tokens(self, location: storage.Location, size: int, sha256: str, dtype: np.dtype) -> np.ndarray:
        """The object's bytes as a read-only array of `dtype`, mapped from the cache (fetched if needed)."""
        with self._lock:
            entry = self._entries.get(sha256)
            if entry is not None and entry.array is not None:
                self._entries.move_to_end(sha256)
                return entry.array
        with self._fetching:
            path = self._ensure(location, size, sha256)
            array = np.memmap(path, dtype=dtype, mode="r", shape=(size // dtype.itemsize,)).view(np.ndarray)
            with self._lock:
                if sha256 in self._entries:
                    self._entries[sha256].array = array
            return array

    def path(self, location: storage.Location, size: int, sha256: str) -> Path:
        """A local file holding the object's bytes (fetched if needed); for reads that open files."""
        with self._fetching:
            return self._ensure(location, size, sha256)

    def _ensure(self, location: storage.Location, size: int, sha256: str) -> Path:
        with self._lock:
            entry = self._entries.get(sha256)
            if entry is not None and entry.path.is_file() and entry.path.stat().st_size == size:
                self._entries.move_to_end(sha256)
                return entry.path
            self._entries.pop(sha256, None)  # gone from disk (the folder was deleted): fetch it again
        if size > self.max_bytes:
            raise CacheError(
                f"{location.uri}: {size} bytes, more than the whole cache (--cache-bytes {self.max_bytes}, folder "
                f"{self.folder}); raise --cache-bytes to at least {2 * size} (two shards)"
            )
        self._evict_for(size)
        for attempt in (1, 2):
            try:
                path = self._fetch(location, size, sha256)
                break
            except OSError as e:
                full = e.errno in (errno.ENOSPC, errno.EDQUOT)
                if attempt == 2 or not (full or isinstance(e, FileNotFoundError)):
                    what = "the disk is full" if full else f"cannot write there ({e})"
                    raise CacheError(
                        f"{self.folder}: {what} while fetching {location.uri} ({size} bytes); free space there, "
                        f"lower --cache-bytes (now {self.max_bytes}) or choose another --cache-dir"
                    ) from e
                if full:  # everything else goes, then one more try
                    self._evict_for(self.max_bytes)
                # FileNotFoundError: the folder was deleted mid-fetch; _fetch makes it again
        with self._lock:
            self._entries[sha256] = _Entry(path, size)
        return path

    def _evict_for(self, size: int) -> None:
        """Remove least recently used entries until `size` more bytes fit within max_bytes."""
        with self._lock:
            while self._entries and self.used_bytes + size > self.max_bytes:
                _, entry = self._entries.popitem(last=False)
                entry.path.unlink(missing_ok=True)  # a read that still maps it keeps its pages

    def _fetch(self, location: storage.Location, size: int, sha256: str) -> Path:
        """Fetch the object in parallel ranges into a temporary file; keep it only if its sha256 matches."""
        self.folder.mkdir(parents=True, exist_ok=True)  # again after every deletion of the folder
        target = self.folder / sha256
        partial = self.folder / f".{sha256}.{os.getpid()}.{secrets.token_hex(4)}.part"
        try:
            with open(partial, "wb") as out:
                out.truncate(size)
                fd = out.fileno()

                def fetch(offset: int) -> None:
                    length = min(PART_BYTES, size - offset)
                    data = storage.read_range(location, offset, length)
                    if len(data) != length:
                        raise DatasetError(
                            f"{location.uri}: ended at {offset + len(data)} bytes but the manifest says {size}; "
                            "the object changed after the dataset was written; re-run the tokenize job"
                        )
                    os.pwrite(fd, data, offset)

                with ThreadPoolExecutor(FETCH_PARTS) as pool:
                    list(pool.map(fetch, range(0, size, PART_BYTES)))
            digest = sha256_file(partial)
            if digest != sha256:
                raise DatasetError(
                    f"{location.uri}: sha256 {digest[:12]}... differs from the manifest's {sha256[:12]}...: the "
                    "object changed after the dataset was written (or is damaged); nothing of it was served. "
                    "Restore it or re-run the tokenize job, then restart the reader"
                )
            os.replace(partial, target)
        except BaseException:
            partial.unlink(missing_ok=True)
            raise
        self.fetched_bytes += size
        return target


_CACHES: dict[CacheConfig, ShardCache] = {}
_CACHES_LOCK = threading.Lock()


def shared_cache(config: CacheConfig) -> ShardCache:
    """One ShardCache per folder and size in a process, so every dataset opened with it shares the bound."""
    with _CACHES_LOCK:
        if config not in _CACHES:
            _CACHES[config] = ShardCache(config)
        return _CACHES[config]
