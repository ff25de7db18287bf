"""Funnel search over Matryoshka tiers, and searching a tier stored as several shards.

A funnel is a first stage that shortlists `k * factor` candidates on a (narrow, cheap) tier, then
rescoring stages that re-rank the candidates with better vectors and keep fewer:

    Funnel(TierSearcher(tier64), [Rescore(TierVectors(tier256), keep=50), Rescore(ParquetVectors(...))])

Scorers give the inner product of (truncated, renormalized) queries with stored vectors of given
ids: `ArrayVectors` (full-width vectors in memory), `ParquetVectors` (full-width vectors read from
the Parquet shards, only the shards and row groups holding the candidates, one shard at a time)
and `TierVectors` (vectors a Flat-like tier index can reconstruct). A stage is anything with
`rerank(queries, ids, keep) -> (scores, ids)`, so MaxSim over multi-vectors or a cross-encoder can
be appended later. `exact_topk` is the exhaustive full-width search (the quality ground truth),
streamed over the same sources.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Iterator, Protocol, Sequence

from .faiss_lib import faiss
import numpy as np

from . import tiers
from .factories import apply_search_params
from .tier_io import ONDISK, SHARDS, SINGLE, TierCache, read_ondisk, tier_local_paths
from .vector_io import RowMatrix, ShardRows, as_matrix, read_vectors
from ..storage import Storage
from .selectors import RowFilter, search_parameters, sub_indexes, supports_filter

IN_MEMORY_RESCORE_MAX_BYTES = 512 * 2**20  # below this, the build scores full-width vectors from memory
READER_GROUP_CACHE_BYTES = 64 * 2**20  # a reader keeps the float16 row groups it rescored, up to this
BLOCK_ROWS = 4096  # rows per exact-search block: [queries x 4096] scores at a time
PAIR_CHUNK = 16384


# -- tiers ------------------------------------------------------------------------------------------

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


# -- vectors to rescore with ------------------------------------------------------------------------

def _pair_scores(q: np.ndarray, qi: np.ndarray, x: np.ndarray, xi: np.ndarray, out: np.ndarray,
                 where: np.ndarray) -> None:
    """out[where[p]] = q[qi[p]] . x[xi[p]], in bounded chunks."""
    for s in range(0, len(qi), PAIR_CHUNK):
        sl = slice(s, s + PAIR_CHUNK)
        out[where[sl]] = np.einsum("pd,pd->p", q[qi[sl]], x[xi[sl]].astype(np.float32, copy=False))


class VectorSource(Protocol):
    dim: int

    def score(self, queries: np.ndarray, ids: np.ndarray) -> np.ndarray: ...


class ArrayVectors:
    """Vectors held in memory, row = id."""

    def __init__(self, vectors: np.ndarray):
        self.vectors = vectors
        self.dim = vectors.shape[1]
        self.n = len(vectors)

    def score(self, queries: np.ndarray, ids: np.ndarray) -> np.ndarray:
        """Inner products [nq, m] of queries (at this width) with the rows `ids` (-inf where id < 0)."""
        out = np.full(ids.shape, -np.inf, dtype=np.float32)
        qi, col = np.nonzero(ids >= 0)
        flat = np.full(len(qi), -np.inf, dtype=np.float32)
        _pair_scores(queries, qi, self.vectors, ids[qi, col], flat, np.arange(len(qi)))
        out[qi, col] = flat
        return out

    def blocks(self) -> Iterator[tuple[int, np.ndarray]]:
        for s in range(0, self.n, BLOCK_ROWS):
            yield s, np.asarray(self.vectors[s:s + BLOCK_ROWS], dtype=np.float32)


class ParquetVectors:
    """Full-width vectors read from Parquet shards on demand; id = row ordinal over the shards.

    Rows are L2-renormalized after the float16 round trip (the full-width tier's definition), so scores
    are cosines and agree with a full-width Flat tier. `score` reads only the shards and row groups that
    hold candidates (through `ShardRows`, shared with the reader's id/metadata fetches), one shard at a
    time. Where a shard has a row matrix (`vector_files`, the manifest's `vectors`), candidates are read
    from it by row offset instead (`RowMatrix`: no row group decoded). Caches (float16, LRU, off by
    default): `cache_bytes` keeps whole shards (build-time streaming), `group_cache_bytes` keeps the row
    groups candidates were read from (a reader's warm queries, shards without a row matrix)."""

    def __init__(self, store: Storage, shard_paths: Sequence[str], shard_rows: Sequence[int], dim: int,
                 column: str = "vector", cache_bytes: int = 0, group_cache_bytes: int = 0,
                 rows: ShardRows | None = None, vector_files: Sequence[str | None] | None = None):
        self.store = store
        self.paths = list(shard_paths)
        self.rows = np.asarray(shard_rows, dtype=np.int64)
        self.reader = rows or ShardRows(store, self.paths, self.rows)
        self.offsets = self.reader.offsets
        self.dim = dim
        self.n = int(self.offsets[-1])
        self.column = column
        self.cache_bytes = cache_bytes
        self.group_cache_bytes = group_cache_bytes
        self._cache: OrderedDict[int, np.ndarray] = OrderedDict()
        self._groups: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()
        self._group_bytes = 0
        self.vector_files = list(vector_files or [None] * len(self.paths))
        self._matrices: dict[int, RowMatrix] = {}
        self.rows_read = 0  # counters: what the funnel actually touched
        self.shards_read = 0

    def _shard(self, s: int) -> np.ndarray:
        if s in self._cache:
            self._cache.move_to_end(s)
            return self._cache[s]
        v = read_vectors(self.store, self.paths[s], self.column, dtype=np.float16)
        self.shards_read += 1
        self.rows_read += len(v)
        if self.cache_bytes > 0 and v.nbytes <= self.cache_bytes:
            self._cache[s] = v
            while sum(a.nbytes for a in self._cache.values()) > self.cache_bytes:
                self._cache.popitem(last=False)
        return v

    def take(self, s: int, local_rows: np.ndarray) -> np.ndarray:
        """Vectors of some rows of shard s (only their row groups are read, unless cached)."""
        if self.cache_bytes > 0:
            return self._shard(s)[local_rows]
        self.shards_read += 1
        self.rows_read += len(local_rows)
        if self.vector_files[s]:
            if s not in self._matrices:
                self._matrices[s] = RowMatrix(self.store, self.vector_files[s])
            return self._matrices[s].take(local_rows).astype(np.float16, copy=False)
        if self.group_cache_bytes > 0:
            return self._take_cached(s, np.asarray(local_rows, dtype=np.int64))
        return as_matrix(self.reader.read(s, local_rows, [self.column]).column(self.column), np.float16)

    def _take_cached(self, s: int, local_rows: np.ndarray) -> np.ndarray:
        """Rows of shard s through the row-group cache: missing groups are read in one call, then kept."""
        starts = self.reader.group_starts(s)
        group_of = np.searchsorted(starts, local_rows, side="right") - 1
        blocks = {}  # this call's groups, held here: caching one may evict another before it is used
        for g in np.unique(group_of).tolist():
            if (s, g) in self._groups:
                self._groups.move_to_end((s, g))
                blocks[g] = self._groups[(s, g)]
        missing = [g for g in np.unique(group_of).tolist() if g not in blocks]
        if missing:
            first = np.concatenate([np.arange(starts[g], starts[g + 1]) for g in missing])
            read = as_matrix(self.reader.read(s, first, [self.column]).column(self.column), np.float16)
            at = 0
            for g in missing:
                n = int(starts[g + 1] - starts[g])
                blocks[g] = np.ascontiguousarray(read[at:at + n])
                at += n
        out = np.empty((len(local_rows), next(iter(blocks.values())).shape[1]), dtype=np.float16)
        for g, block in blocks.items():
            sel = group_of == g
            out[sel] = block[local_rows[sel] - starts[g]]
        for g in missing:
            self._keep_group((s, g), blocks[g])
        return out

    def _keep_group(self, key: tuple[int, int], block: np.ndarray) -> None:
        self._groups[key] = block
        self._group_bytes += block.nbytes
        while self._group_bytes > self.group_cache_bytes and len(self._groups) > 1:
            _, old = self._groups.popitem(last=False)
            self._group_bytes -= old.nbytes

    def score(self, queries: np.ndarray, ids: np.ndarray) -> np.ndarray:
        """Inner products [nq, m] of queries (full width) with the rows `ids` (-inf where id < 0)."""
        out = np.full(ids.shape, -np.inf, dtype=np.float32)
        qi, col = np.nonzero(ids >= 0)
        ords = ids[qi, col]
        shard = np.searchsorted(self.offsets, ords, side="right") - 1
        flat = np.full(len(qi), -np.inf, dtype=np.float32)
        for s in np.unique(shard):
            sel = np.nonzero(shard == s)[0]
            local = ords[sel] - self.offsets[s]
            uniq, inv = np.unique(local, return_inverse=True)
            x = tiers.truncate(self.take(int(s), uniq), self.dim)
            _pair_scores(queries, qi[sel], x, inv, flat, sel)
        out[qi, col] = flat
        return out

    def blocks(self) -> Iterator[tuple[int, np.ndarray]]:
        """(first id, float32 rows) over the whole corpus, one shard in memory at a time."""
        for s in range(len(self.paths)):
            v = self._shard(s)
            for b in range(0, len(v), BLOCK_ROWS):
                yield int(self.offsets[s]) + b, tiers.truncate(v[b:b + BLOCK_ROWS], self.dim)
            del v


class TierVectors:
    """Vectors a tier index can reconstruct (Flat, HNSW-Flat, or IndexShards of them): rescoring on a
    higher tier."""

    def __init__(self, index: Any):
        self.index = index
        self.dim = index.d

    def score(self, queries: np.ndarray, ids: np.ndarray) -> np.ndarray:
        out = np.full(ids.shape, -np.inf, dtype=np.float32)
        qi, col = np.nonzero(ids >= 0)
        ords = ids[qi, col]
        uniq, inv = np.unique(ords, return_inverse=True)
        x = reconstruct(self.index, uniq)
        flat = np.empty(len(qi), dtype=np.float32)
        _pair_scores(queries, qi, x, inv, flat, np.arange(len(qi)))
        out[qi, col] = flat
        return out


def reconstruct(index: faiss.Index, ids: np.ndarray) -> np.ndarray:
    """Stored vectors of ids (IndexShards does not reconstruct: its shards hold contiguous id ranges,
    in order, and each reconstructs its own)."""
    parts = sub_indexes(index)
    starts = np.cumsum([0] + [p.ntotal for p in parts])
    shard = np.searchsorted(starts, ids, side="right") - 1
    out = np.zeros((len(ids), index.d), dtype=np.float32)
    for s in np.unique(shard):
        sel = shard == s
        out[sel] = parts[s].reconstruct_batch(ids[sel])
    return out


# -- stages and the funnel --------------------------------------------------------------------------

def top_k(scores: np.ndarray, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Best k per row by score (ties by position), ids -1 last; pads with (-inf, -1)."""
    scores = np.where(ids < 0, -np.inf, scores)
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    s, i = np.take_along_axis(scores, order, axis=1), np.take_along_axis(ids, order, axis=1)
    if s.shape[1] < k:
        pad = k - s.shape[1]
        s = np.pad(s, ((0, 0), (0, pad)), constant_values=-np.inf)
        i = np.pad(i, ((0, 0), (0, pad)), constant_values=-1)
    return s.astype(np.float32), np.where(np.isneginf(s), -1, i)


class Rescore:
    """Re-rank candidates by inner product with `source`'s vectors (queries truncated to its width)."""

    def __init__(self, source: VectorSource, keep: int | None = None):
        self.source = source
        self.keep = keep

    def rerank(self, queries: np.ndarray, ids: np.ndarray, keep: int) -> tuple[np.ndarray, np.ndarray]:
        scores = self.source.score(tiers.truncate(queries, self.source.dim), ids)
        return top_k(scores, ids, keep)


class Funnel:
    """Shortlist `k * factor` on a tier, then each stage re-ranks and keeps `stage.keep` (the last keeps k)."""

    def __init__(self, first: TierSearcher, stages: Sequence[Any] = (), factor: int = 10):
        self.first = first
        self.stages = list(stages)
        self.factor = max(1, int(factor))

    def search(self, queries: np.ndarray, k: int, skip: RowFilter | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Top k per query; `skip`: hidden ordinals the first stage skips (where it `filters`)."""
        q = np.ascontiguousarray(queries, dtype=np.float32)
        width = k * self.factor if self.stages else k
        scores, ids = self.first.search(q, width, skip=skip) if skip is not None else self.first.search(q, width)
        for n, stage in enumerate(self.stages):
            last = n == len(self.stages) - 1
            keep = k if last else max(k, getattr(stage, "keep", None) or ids.shape[1])
            scores, ids = stage.rerank(q, ids, keep)
        return top_k(scores, ids, k)


def tier_funnel(index: Any, entry: Any, full_dim: int, rescore: int, vectors: VectorSource | None) -> Funnel:
    """The reader's funnel for one manifest tier: ANN on it, then (unless the tier is exact at full width,
    or rescore <= 1) rescoring of `k * rescore` candidates with `vectors`. Binary tiers are always rescored."""
    first = TierSearcher(index, metric=entry.metric, params=getattr(entry, "search_params", None))
    exact = entry.dim == full_dim and entry.factory == "Flat"
    binary = entry.metric == "hamming"
    if vectors is None or exact or (rescore <= 1 and not binary):
        return Funnel(first)
    return Funnel(first, [Rescore(vectors)], factor=max(1, rescore))


def full_width_source(store: Storage, shard_paths: Sequence[str], shard_rows: Sequence[int], dim: int,
                      load: Any = None, cache_bytes: int = 0, group_cache_bytes: int = 0,
                      rows: ShardRows | None = None, vector_files: Sequence[str | None] | None = None,
                      ) -> VectorSource:
    """In-memory vectors for small corpora when `load()` gives them (the build's sample), else Parquet
    row reads of only the candidates (a reader: `rows` shares its footers, `group_cache_bytes` keeps
    what warm queries reread)."""
    if load is not None and int(sum(shard_rows)) * dim * 4 <= IN_MEMORY_RESCORE_MAX_BYTES:
        return ArrayVectors(load())
    return ParquetVectors(store, shard_paths, shard_rows, dim, cache_bytes=cache_bytes,
                          group_cache_bytes=group_cache_bytes, rows=rows, vector_files=vector_files)


# -- exact search -----------------------------------------------------------------------------------

def exact_topk(source: Any, queries: np.ndarray, k: int,
               exclude: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Exhaustive top k by inner product over `source.blocks()` (streamed): `faiss.knn` per block, merged
    in a `faiss.ResultHeap`; `exclude[q]` drops one id per query (the query's own row, for leave-one-out
    evaluation)."""
    q = np.ascontiguousarray(queries, dtype=np.float32)
    heap = faiss.ResultHeap(len(q), k, keep_max=True)
    extra = 0 if exclude is None else 1  # one more per block, in case the excluded row is among them
    for start, x in source.blocks():
        dist, ids = faiss.knn(q, x, min(k + extra, len(x)), metric=faiss.METRIC_INNER_PRODUCT)
        ids = np.where(ids >= 0, ids + start, -1)
        if exclude is not None:
            dist[ids == exclude[:, None]] = -np.inf  # never enters the heap
        heap.add_result(dist, ids)
    heap.finalize()
    return top_k(heap.D, heap.I, k)
