"""Fill trained tier indexes shard by shard: one task per Parquet shard, every tier at once.

A task reads its shard's vector column once, and for each tier truncates + renormalizes to the tier
width, copies the shared trained (empty) index, adds the rows with ids = global row ordinals
(shard offset + local row) and writes the shard index next to the tier. Memory per task: one shard
plus its tier indexes. Tasks run as Ray tasks when Ray is initialized, else one after another here.
"""

from __future__ import annotations

import hashlib
import resource
import time
from dataclasses import dataclass
from typing import Any, Sequence

from .faiss_lib import faiss
import numpy as np

from ..storage import Storage, StorageOptions
from . import tiers
from .factories import ivf_of
from .vector_io import read_vectors


@dataclass(frozen=True)
class FillJob:
    """One tier to fill from a shard: width, where the shard index goes, whether ids need an IDMap2."""

    dim: int
    out_rel: str
    wrap_ids: bool


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def fill_index(trained: faiss.Index, vectors: np.ndarray, offset: int, wrap_ids: bool,
               ids: np.ndarray | None = None) -> faiss.Index:
    """Copy of `trained` holding `vectors` (already at tier width) with ids offset .. offset + n - 1,
    or the given `ids` (e.g. token vectors: the row ordinal of each token's document)."""
    index = faiss.clone_index(trained)
    if wrap_ids:
        inner = index
        index = faiss.IndexIDMap2(inner)
        index.own_fields = True
        inner.this.disown()
    if ids is None:
        ids = np.arange(offset, offset + len(vectors), dtype=np.int64)
    index.add_with_ids(np.ascontiguousarray(vectors, dtype=np.float32), np.ascontiguousarray(ids, dtype=np.int64))
    return index


def list_sizes(index: faiss.Index) -> np.ndarray | None:
    """Inverted-list lengths of an IVF index (what the on-disk merge pre-sizes), else None."""
    ivf = ivf_of(index)
    if ivf is None:
        return None
    il = ivf.invlists
    return np.array([il.list_size(j) for j in range(ivf.nlist)], dtype=np.int64)


def fill_shard(root: str, options: StorageOptions, shard_rel: str, offset: int, jobs: Sequence[FillJob],
               trained: dict[int, bytes]) -> list[dict[str, Any]]:
    """Fill every job's tier from one shard; returns, per job, the file written and its statistics."""
    store = Storage(root, options)
    full = read_vectors(store, shard_rel, dtype=np.float32)
    out = []
    for job in jobs:
        t0 = time.perf_counter()
        index = fill_index(tiers.deserialize(trained[job.dim]), tiers.truncate(full, job.dim), offset,
                           job.wrap_ids)
        data = tiers.serialize(index)
        store.write_bytes(job.out_rel, data)
        out.append({"dim": job.dim, "rel": job.out_rel, "bytes": len(data), "rows": int(index.ntotal),
                    "sha256": hashlib.sha256(data).hexdigest(),
                    "list_sizes": list_sizes(index), "seconds": time.perf_counter() - t0,
                    "peak_rss_mb": _peak_rss_mb()})
        del index, data
    return out
