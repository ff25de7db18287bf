"""Where a tier's files live and how to open them for search.

Layouts (TierEntry.layout; paths relative to the index root, next to the Parquet shards):

  single   shards/<run>/tier-<dim>.faiss                       one index, ids = row ordinals
  shards   shards/<run>/tier-<dim>/shard-<i>.faiss              one index per Parquet shard (IDMap2,
                                                                global ids), searched as one
  ondisk   shards/<run>/tier-<dim>.faiss + tier-<dim>.ivfdata   IVF header + on-disk inverted lists

A reader opens tier files from local paths: a remote index's files are copied once into the tier
cache (`TierCache`, content-addressed by the sha256 the manifest records per file, LRU-evicted past
a size limit; $EMBINDEX_CACHE, $EMBINDEX_CACHE_MAX_MB), which every reader on the machine shares.
On-disk lists are memory-mapped from there. Searching a tier (any layout) is tier_search.py's job.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import sys
import tempfile
from typing import Any, Iterator, Sequence

from .faiss_lib import faiss

from ..storage import Storage, is_remote

SINGLE, SHARDS, ONDISK = "single", "shards", "ondisk"


@contextlib.contextmanager
def quiet_stdout() -> Iterator[None]:
    """FAISS prints a line to C stdout when it re-points on-disk lists: keep it off our stdout (JSON output)."""
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):
        yield
        return
    sys.stdout.flush()
    saved = os.dup(fd)
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), fd)
            try:
                yield
            finally:
                os.dup2(saved, fd)
    finally:
        os.close(saved)


def read_ondisk(index_path: str) -> faiss.Index:
    """Open an on-disk IVF index; its data file is found next to `index_path` (same base name)."""
    with quiet_stdout():
        return faiss.read_index(index_path, faiss.IO_FLAG_ONDISK_SAME_DIR)


CACHE_ENV = "EMBINDEX_CACHE"  # cache root (default ~/.cache/embindex); tier files under <root>/tiers
CACHE_MAX_ENV = "EMBINDEX_CACHE_MAX_MB"  # size limit of the tier cache
DEFAULT_CACHE_MAX_MB = 10240


def file_sha256(path: str, block: int = 2**22) -> str:
    """sha256 of a local file, streamed."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()


def default_cache_dir() -> str:
    root = os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "embindex")
    return os.path.join(root, "tiers")


def default_cache_max_bytes() -> int:
    return int(float(os.environ.get(CACHE_MAX_ENV) or DEFAULT_CACHE_MAX_MB) * 2**20)


class TierCache:
    """Local copies of remote tier files, shared by every reader and process on the machine.

    An entry is a folder `<dir>/<key>/` holding files under their own names (an on-disk IVF tier's two
    files share one entry: FAISS finds the lists file next to the header). The key is the sha256 the
    manifest records for the files (content-addressed: versions sharing a file share its copy), else a
    digest of URI + size + ETag/mtime. Entries are used in place; each use touches the folder, and the
    least recently used entries are removed once the cache holds more than `max_bytes` (an entry in use
    is never removed by its own fetch; a file already open or mapped stays readable after removal)."""

    def __init__(self, directory: str | None = None, max_bytes: int | None = None):
        self.directory = directory or default_cache_dir()
        self.max_bytes = default_cache_max_bytes() if max_bytes is None else int(max_bytes)
        self.downloads = 0  # files copied from the store by this object

    def paths(self, store: Storage, rels: Sequence[str], sha256: dict[str, str] | None = None) -> list[str]:
        """Local paths of files that must sit together in one folder, downloaded on a miss."""
        key = self._key(store, rels, sha256 or {})
        entry = os.path.join(self.directory, key)
        if not os.path.isdir(entry):
            self._fetch(store, rels, sha256 or {}, entry)
        os.utime(entry)
        self.evict(keep=entry)
        return [os.path.join(entry, os.path.basename(r)) for r in rels]

    def _key(self, store: Storage, rels: Sequence[str], sha256: dict[str, str]) -> str:
        parts = []
        for r in rels:
            if sha256.get(r):
                parts.append(sha256[r])
                continue
            info = store.fs.info(store.fs_path(r))
            stamp = info.get("ETag") or info.get("LastModified") or info.get("mtime") or ""
            parts.append(f"{store.uri(r)}|{info.get('size')}|{stamp}")
        if len(parts) == 1 and sha256.get(rels[0]):
            return parts[0]
        return hashlib.sha256("\n".join(parts).encode()).hexdigest()

    def _fetch(self, store: Storage, rels: Sequence[str], sha256: dict[str, str], entry: str) -> None:
        """Download into a temporary folder, check recorded hashes, then rename it into place."""
        os.makedirs(self.directory, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=".tmp-", dir=self.directory)
        try:
            for r in rels:
                dst = os.path.join(tmp, os.path.basename(r))
                store.fs.get_file(store.fs_path(r), dst)
                self.downloads += 1
                if sha256.get(r) and file_sha256(dst) != sha256[r]:
                    raise OSError(f"{r}: downloaded file does not match the manifest's sha256")
            try:
                os.rename(tmp, entry)
            except OSError:  # another process put the same entry in place first
                if not os.path.isdir(entry):
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def entries(self) -> list[tuple[float, int, str]]:
        """(last use, bytes, folder) of every entry, least recently used first."""
        out = []
        if not os.path.isdir(self.directory):
            return out
        for name in os.listdir(self.directory):
            path = os.path.join(self.directory, name)
            if name.startswith(".tmp-") or not os.path.isdir(path):
                continue
            try:
                size = sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path))
                out.append((os.path.getmtime(path), size, path))
            except FileNotFoundError:  # removed meanwhile by another process
                continue
        return sorted(out)

    def evict(self, keep: str | None = None) -> None:
        """Remove least recently used entries (never `keep`) until the cache fits `max_bytes`."""
        entries = self.entries()
        total = sum(size for _, size, _ in entries)
        for _, size, path in entries:
            if total <= self.max_bytes:
                break
            if path != keep:
                shutil.rmtree(path, ignore_errors=True)
                total -= size


def tier_local_paths(store: Storage, entry: Any, cache: TierCache | None = None, deltas: bool = False) -> list[str]:
    """Local paths of a tier's files (or with `deltas`, of its delta indexes): themselves for a local
    index, else copies in the tier cache."""
    files = list(getattr(entry, "deltas", []) if deltas else entry.files)
    if not is_remote(store.root):
        return [store.fs_path(r) for r in files]
    cache = cache or TierCache()
    sha = getattr(entry, "sha256", None) or {}
    if (getattr(entry, "layout", SINGLE) or SINGLE) == ONDISK and not deltas:
        return cache.paths(store, files, sha)
    return [cache.paths(store, [r], sha)[0] for r in files]


def local_copy(store: Storage, rels: list[str], cache_dir: str | None = None) -> list[str]:
    """Local paths of the given files (kept together): themselves for a local index, else copies in the
    tier cache (`cache_dir`: another cache folder)."""
    if not is_remote(store.root):
        return [store.fs_path(r) for r in rels]
    return TierCache(cache_dir).paths(store, rels)
