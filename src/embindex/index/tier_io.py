"""Where a tier's files live and how to open them for search.

Layouts (TierEntry.layout; paths relative to the index root, next to the Parquet shards):

  single   shards/<run>/tier-<dim>.faiss                       one index, ids = row ordinals
  shards   shards/<run>/tier-<dim>/shard-<i>.faiss              one index per Parquet shard (IDMap2,
                                                                global ids), searched as one
  ondisk   shards/<run>/tier-<dim>.faiss + tier-<dim>.ivfdata   IVF header + on-disk inverted lists

On-disk lists are memory-mapped from a local file: for a remote index both files are first copied
into a local cache directory. Searching a tier (any layout) is search/funnel.py's job.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from typing import Iterator

import faiss

from ..storage import Storage, is_remote
from . import layout

SINGLE, SHARDS, ONDISK = "single", "shards", "ondisk"


def index_rel(run_id: str, dim: int) -> str:
    return layout.tier_path(run_id, dim)


def ivfdata_rel(run_id: str, dim: int) -> str:
    return f"{layout.run_dir(run_id)}/tier-{dim:05d}.ivfdata"


def shard_index_rel(run_id: str, dim: int, i: int) -> str:
    return f"{layout.run_dir(run_id)}/tier-{dim:05d}/shard-{i:05d}.faiss"


@contextlib.contextmanager
def _quiet_stdout() -> Iterator[None]:
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
    with _quiet_stdout():
        return faiss.read_index(index_path, faiss.IO_FLAG_ONDISK_SAME_DIR)


def local_copy(store: Storage, rels: list[str], cache_dir: str | None = None) -> list[str]:
    """Local paths of the given files: themselves for a local index, else copies in a cache directory."""
    if not is_remote(store.root):
        return [store.fs_path(r) for r in rels]
    cache = cache_dir or tempfile.mkdtemp(prefix="embindex-tier-")
    out = []
    for r in rels:
        dst = os.path.join(cache, os.path.basename(r))
        if not os.path.exists(dst):
            store.fs.get_file(store.fs_path(r), dst)
        out.append(dst)
    return out
