"""Search-time filters: the ANN search itself skips hidden row ordinals (tombstones, another modality).

A `RowFilter` is a FAISS `IDSelectorNot(IDSelectorBitmap)` over the hidden ordinals (n / 8 bytes).
`search_parameters` builds the typed `SearchParameters` an index needs to apply it, carrying the
index's own search settings (nprobe, efSearch) since typed parameters override them. Support in
faiss-cpu 1.15.1, through IndexIDMap/IDMap2, IndexPreTransform (OPQ) and IndexShards (a tier of
several files) and on-disk lists:

    Flat, ScalarQuantizer (SQ8), HNSW* (Flat, SQ, PQ),                     filtered
    IVF* (Flat, SQ8, PQ, PQ fast scan; in memory or on disk)
    LSH ("Binary"), PQ or PQ fast scan without IVF, Refine, NSG, anything  not: FAISS raises on a
    else; tier_search.ShardedIndex (build time, shards loaded per search)       selector, callers over-fetch
"""

from __future__ import annotations

from typing import Any

from .faiss_lib import faiss
import numpy as np


class RowFilter:
    """Hidden ordinals as a FAISS selector (keeps the bitmap and selectors alive while searches use them)."""

    def __init__(self, hidden: np.ndarray, ntotal: int):
        mask = np.zeros(max(int(ntotal), 1), dtype=bool)
        hidden = np.asarray(hidden, dtype=np.int64)
        mask[hidden[(hidden >= 0) & (hidden < ntotal)]] = True
        self.hidden = int(mask.sum())
        self._bits = np.packbits(mask, bitorder="little")
        self._bitmap = faiss.IDSelectorBitmap(len(self._bits), faiss.swig_ptr(self._bits))  # n: bytes
        self.selector = faiss.IDSelectorNot(self._bitmap)


def _inner(index: faiss.Index) -> faiss.Index:
    return faiss.downcast_index(index.index)


def sub_indexes(index: faiss.Index) -> list[faiss.Index]:
    """The shards of a `faiss.IndexShards`, else the index itself."""
    idx = faiss.downcast_index(index)
    if isinstance(idx, faiss.IndexShards):
        return [faiss.downcast_index(idx.at(i)) for i in range(idx.count())]
    return [index]


def supports_filter(index: Any) -> bool:
    """Whether FAISS applies a selector inside this index's search (see the module docstring)."""
    if not isinstance(index, faiss.Index):  # tier_search.ShardedIndex
        return False
    idx = faiss.downcast_index(index)
    if isinstance(idx, faiss.IndexShards):
        return all(supports_filter(s) for s in sub_indexes(idx))
    if isinstance(idx, (faiss.IndexIDMap, faiss.IndexIDMap2, faiss.IndexPreTransform)):
        return supports_filter(_inner(idx))
    return isinstance(idx, (faiss.IndexFlat, faiss.IndexScalarQuantizer, faiss.IndexHNSW, faiss.IndexIVF))


def search_parameters(index: faiss.Index, params: dict[str, int], k: int, rows: RowFilter) -> Any:
    """Typed search parameters applying `rows` with the index's nprobe / efSearch (as
    factories.apply_search_params sets them). The returned object keeps its nested parameters alive.
    IndexShards passes one object to every shard: its shards are of one kind (a tier's files and deltas)."""
    idx = faiss.downcast_index(index)
    if isinstance(idx, faiss.IndexShards):
        return search_parameters(sub_indexes(idx)[0], params, k, rows)
    if isinstance(idx, (faiss.IndexIDMap, faiss.IndexIDMap2)):
        return search_parameters(_inner(idx), params, k, rows)  # IDMap translates the selector to its ids
    if isinstance(idx, faiss.IndexPreTransform):
        inner = search_parameters(_inner(idx), params, k, rows)
        p = faiss.SearchParametersPreTransform()
        p.index_params = inner
        p.sel = rows.selector
        p.keep = (inner, rows)
        return p
    if isinstance(idx, faiss.IndexIVF):
        p = faiss.SearchParametersIVF()
        p.nprobe = int(params.get("nprobe", min(32, idx.nlist)))
    elif isinstance(idx, faiss.IndexHNSW):
        p = faiss.SearchParametersHNSW()
        p.efSearch = int(max(params.get("efSearch", 64), 2 * k))
    else:
        p = faiss.SearchParameters()
    p.sel = rows.selector
    p.keep = rows
    return p
