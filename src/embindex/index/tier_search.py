"""Search one Matryoshka tier: open a manifest tier as one FAISS index, search it at its width.

`open_tier` gives the reader's index of a tier (one file, an on-disk IVF, or a `faiss.IndexShards` over
its shard files and delta indexes); `ShardedIndex` searches shard files loaded one at a time (build
time, memory of one shard); `TierSearcher` truncates queries to the tier width, applies the tier's
search parameters and, where FAISS can, skips hidden rows inside the search (selectors.py).
"""

from __future__ import annotations

from typing import Any, Sequence

from .faiss_lib import faiss
import numpy as np

from . import tiers
from .factories import apply_search_params
from .selectors import RowFilter, search_parameters, sub_indexes, supports_filter
from .tier_io import ONDISK, SHARDS, SINGLE, TierCache, read_ondisk, tier_local_paths
from ..storage import Storage


class ShardedIndex:
    """Shard indexes holding disjoint global ids, loaded one at a time per search so that memory stays
    at one shard (build time); each shard's top k is merged in FAISS's `ResultHeap`. Shards are
    indexes, or zero-argument loaders (then `ntotals` and `d` are required). A reader's tier of several
    files is a `faiss.IndexShards` instead (`shards_index`), which holds every shard."""

    def __init__(self, shards: Sequence[Any], higher_is_better: bool = True,
                 ntotals: Sequence[int] | None = None, d: int | None = None):
        if not shards:
            raise ValueError("a sharded index needs at least one shard")
        self.shards = list(shards)
        self.lazy = callable(self.shards[0]) and not isinstance(self.shards[0], faiss.Index)
        if self.lazy and (ntotals is None or d is None):
            raise ValueError("lazy shards need their ntotals and d")
        self.ntotals = list(ntotals) if ntotals is not None else [int(s.ntotal) for s in self.shards]
        self.d = d if d is not None else self.shards[0].d
        self.higher_is_better = higher_is_better
        self.ntotal = int(sum(self.ntotals))

    def search(self, x: np.ndarray, k: int, params: dict[str, int] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Each shard's top k (searched with `params`: nprobe / efSearch), merged."""
        heap = faiss.ResultHeap(len(x), k, keep_max=self.higher_is_better)
        for shard, n in zip(self.shards, self.ntotals):
            if n:
                shard = shard() if self.lazy else shard
                apply_search_params(shard, params or {}, k)
                heap.add_result(*shard.search(x, min(k, n)))
        heap.finalize()
        return heap.D, heap.I


def shards_index(parts: Sequence[faiss.Index]) -> faiss.Index:
    """Indexes holding disjoint global ids as one FAISS index: each shard's top k, merged, ids kept as
    stored (successive_ids off). Not threaded: a shard search already uses FAISS's threads, and IDMap
    shards rewrite the shared selector of filtered searches while they run."""
    index = faiss.IndexShards(parts[0].d, False, False)
    for p in parts:
        index.add_shard(p)  # the Python wrapper keeps a reference to each shard
    return index


def open_tier(store: Storage, entry: Any, cache: TierCache | None = None) -> faiss.Index:
    """The searchable index of a manifest tier; a tier of several files (shards layout, or a tier with
    delta indexes) is a `faiss.IndexShards` over them. Files of a remote index are read from the local
    tier cache (downloaded there once)."""
    layout = getattr(entry, "layout", SINGLE) or SINGLE
    if layout not in (SINGLE, SHARDS, ONDISK):
        raise ValueError(f"unknown tier layout {layout!r}")
    paths = tier_local_paths(store, entry, cache)
    if layout == SINGLE:
        parts = [faiss.read_index(paths[0])]
    elif layout == SHARDS:
        parts = [faiss.read_index(p) for p in paths]
    else:
        parts = [read_ondisk(paths[0])]
    # rows added by reindexes: delta indexes with global ids, searched with the tier's own files
    parts += [faiss.read_index(p) for p in tier_local_paths(store, entry, cache, deltas=True)]
    if len(parts) == 1 and layout != SHARDS:
        return parts[0]
    return shards_index(parts)


class TierSearcher:
    """ANN search on one tier: truncates queries to the tier width; scores are 'higher is better'
    (inner product, or minus the Hamming distance for binary tiers)."""

    def __init__(self, index: Any, metric: str = "ip", params: dict[str, int] | None = None):
        self.index = index
        self.dim = index.d
        self.binary = metric == "hamming"
        self.params = dict(params or {})

    @property
    def filters(self) -> bool:
        """Whether `search(..., skip=)` skips hidden rows inside FAISS (else callers over-fetch)."""
        return supports_filter(self.index)

    def search(self, queries: np.ndarray, k: int, skip: RowFilter | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Top k per query; `skip`: ordinals to skip, applied by FAISS (only where `filters`)."""
        k = max(1, min(k, self.index.ntotal))
        x = tiers.truncate(queries, self.dim)
        if isinstance(self.index, ShardedIndex):
            dist, ids = self.index.search(x, k, self.params)
        else:
            for part in sub_indexes(self.index):
                apply_search_params(part, self.params, k)
            params = None if skip is None else search_parameters(self.index, self.params, k, skip)
            dist, ids = self.index.search(x, k, params=params)
        scores = -dist if self.binary else dist
        return np.where(ids < 0, -np.inf, scores).astype(np.float32), ids
