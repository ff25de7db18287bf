"""Vectors to rescore candidates with: the inner product of queries with the stored vectors of given ids.

`ArrayVectors` (vectors in memory), `ParquetVectors` (full-width vectors of a version's parts: by row
offset from each part's float16 row matrix, else from the Parquet row groups holding the candidates)
and `TierVectors` (vectors a Flat-like tier index can reconstruct). `full_width_source` picks the
build's or a reader's. Sources with `blocks()` also stream every row, for exact search.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Iterator, Protocol, Sequence

from .faiss_lib import faiss
import numpy as np

from . import tiers
from .selectors import sub_indexes
from .vector_io import RowMatrix, ShardRows, as_matrix, read_vectors
from ..storage import Storage

IN_MEMORY_RESCORE_MAX_BYTES = 512 * 2**20  # below this, the build scores full-width vectors from memory
READER_GROUP_CACHE_BYTES = 64 * 2**20  # a reader keeps the float16 row groups it rescored, up to this
BLOCK_ROWS = 4096  # rows per exact-search block: [queries x 4096] scores at a time
PAIR_CHUNK = 16384


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
