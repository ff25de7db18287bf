"""Read Parquet shards: whole vector columns, or only some rows (any columns) of one or many shards.

Shards hold `vector` as fixed_size_list<float16>[dim]. Readers here touch one shard at a time, so
memory is bounded by the largest shard (or, for row takes, by the row groups holding the rows).
`ShardRows` maps row ordinals over all shards to (shard, row) and reads only the row groups that hold
the rows asked for: the hits' ids and metadata and MaxSim's token vectors. `RowMatrix` reads single
rows of a part's float16 row matrix: the full-width rescoring.
"""

from __future__ import annotations

import io
import os
from typing import Any, Callable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..storage import Storage, is_remote


def as_matrix(col: pa.ChunkedArray | pa.Array, dtype: np.dtype | type) -> np.ndarray:
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    d = col.type.list_size
    flat = col.flatten().to_numpy(zero_copy_only=False)
    return flat.reshape(-1, d).astype(dtype, copy=False)


def shard_rows(store: Storage, rel: str) -> int:
    """Row count of a shard from its Parquet footer (no data read)."""
    with store.fs.open(store.fs_path(rel), "rb") as f:
        return pq.ParquetFile(f).metadata.num_rows


def read_vectors(store: Storage, rel: str, column: str = "vector",
                 dtype: np.dtype | type = np.float32) -> np.ndarray:
    """All vectors of one shard, [rows, dim] in `dtype` (float16 keeps the stored precision at half the memory)."""
    with store.fs.open(store.fs_path(rel), "rb") as f:
        table = pq.read_table(f, columns=[column])
    return as_matrix(table.column(column), dtype)


def row_group_starts(md: pq.FileMetaData) -> np.ndarray:
    """First row of each row group, plus the row count at the end: [g0, g1, ..., num_rows]."""
    return np.cumsum([0] + [md.row_group(i).num_rows for i in range(md.num_row_groups)]).astype(np.int64)


def read_rows(pf: pq.ParquetFile, rows: np.ndarray, columns: Sequence[str]) -> pa.Table:
    """The given local rows of an open Parquet file (in the order given), reading only their row groups."""
    rows = np.asarray(rows, dtype=np.int64)
    starts = row_group_starts(pf.metadata)
    group_of = np.searchsorted(starts, rows, side="right") - 1
    groups = np.unique(group_of)
    table = pf.read_row_groups([int(g) for g in groups], columns=list(columns))
    # local row -> position inside the concatenation of the row groups read
    sizes = starts[groups + 1] - starts[groups]
    base = np.cumsum(np.concatenate([[0], sizes[:-1]]))
    g_pos = np.searchsorted(groups, group_of)
    return table.take(pa.array(base[g_pos] + rows - starts[group_of]))


def take_vectors(store: Storage, rel: str, rows: Sequence[int] | np.ndarray, column: str = "vector",
                 dtype: np.dtype | type = np.float32) -> np.ndarray:
    """Vectors of the given local rows of one shard (in the order given), reading only their row groups."""
    with store.fs.open(store.fs_path(rel), "rb") as f:
        table = read_rows(pq.ParquetFile(f), np.asarray(rows, dtype=np.int64), [column])
    return as_matrix(table.column(column), dtype)


class RowMatrix:
    """Rows of a part's float16 row matrix (.npy, `shards.put_part`) by offset: the header once, then one
    read per run of consecutive rows asked for (`pread` on a local disk, concurrent byte-range requests
    on an object store). Not memory-mapped: a mapping's readahead would bring neighbouring pages into
    the process (a 10M-row build's quality step mapped 1.3 GB of them)."""

    HEADER_BYTES = 4096  # an .npy header of a 2-d array is ~128 bytes

    def __init__(self, store: Storage, rel: str):
        self.store, self.rel = store, rel
        self.path = store.fs_path(rel)
        self.local = not is_remote(store.root)
        head = self._ranges([0], [self.HEADER_BYTES])[0]
        f = io.BytesIO(head)
        major, _ = np.lib.format.read_magic(f)
        read = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read(f)
        if fortran or len(shape) != 2:
            raise ValueError(f"{rel}: not a C-order 2-d row matrix")
        self.offset, (self.n, self.dim), self.dtype = f.tell(), shape, dtype

    def _ranges(self, starts: Sequence[int], ends: Sequence[int]) -> list[bytes]:
        if not self.local:
            return self.store.fs.cat_ranges([self.path] * len(starts), list(starts), list(ends))
        fd = os.open(self.path, os.O_RDONLY)
        try:
            return [os.pread(fd, e - s, s) for s, e in zip(starts, ends)]
        finally:
            os.close(fd)

    def take(self, rows: np.ndarray) -> np.ndarray:
        """[len(rows), dim] in the stored dtype, in the order given."""
        rows = np.asarray(rows, dtype=np.int64)
        if not len(rows):
            return np.empty((0, self.dim), dtype=self.dtype)
        if rows.min() < 0 or rows.max() >= self.n:
            raise IndexError(f"{self.rel}: rows outside 0..{self.n - 1}")
        uniq, inverse = np.unique(rows, return_inverse=True)
        runs = np.split(uniq, np.flatnonzero(np.diff(uniq) != 1) + 1)  # consecutive rows: one read each
        row_bytes = self.dim * self.dtype.itemsize
        blobs = self._ranges([self.offset + int(r[0]) * row_bytes for r in runs],
                             [self.offset + (int(r[-1]) + 1) * row_bytes for r in runs])
        got = np.frombuffer(b"".join(blobs), dtype=self.dtype).reshape(len(uniq), self.dim)
        return got[inverse]


class ShardRows:
    """Row ordinals over a version's shards (manifest order) -> columns of those rows, reading only the row
    groups that hold them. Each shard's Parquet footer is read once and cached; `groups_read` and
    `footers_read` count what was touched."""

    def __init__(self, store: Storage, shard_paths: Sequence[str], shard_rows: Sequence[int]):
        self.store = store
        self.paths = list(shard_paths)
        self.offsets = np.concatenate([[0], np.cumsum(np.asarray(shard_rows, dtype=np.int64))]).astype(np.int64)
        self.n = int(self.offsets[-1])
        self._footers: dict[int, pq.FileMetaData] = {}
        self._starts: dict[int, np.ndarray] = {}
        self.groups_read = 0
        self.footers_read = 0

    def locate(self, ordinals: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(shard index, row in shard) of each ordinal."""
        ordinals = np.asarray(ordinals, dtype=np.int64)
        shard = np.searchsorted(self.offsets, ordinals, side="right") - 1
        return shard, ordinals - self.offsets[shard]

    def footer(self, s: int) -> pq.FileMetaData:
        """Parquet footer of shard s (read on first use)."""
        if s not in self._footers:
            with self.store.fs.open(self.store.fs_path(self.paths[s]), "rb") as f:
                self._footers[s] = pq.ParquetFile(f).metadata
            self.footers_read += 1
        return self._footers[s]

    def group_starts(self, s: int) -> np.ndarray:
        """First row of each row group of shard s, then its row count."""
        if s not in self._starts:
            self._starts[s] = row_group_starts(self.footer(s))
        return self._starts[s]

    def columns(self, s: int) -> list[str]:
        """Top-level column names of shard s."""
        return self.footer(s).schema.to_arrow_schema().names

    def read(self, s: int, local_rows: np.ndarray, columns: Sequence[str]) -> pa.Table:
        """Some rows of shard s (in the order given); columns the shard lacks are left out."""
        md = self.footer(s)
        cols = [c for c in columns if c in self.columns(s)]
        local_rows = np.asarray(local_rows, dtype=np.int64)
        if not cols or not len(local_rows):
            return pa.table({c: pa.nulls(len(local_rows)) for c in cols})  # no columns: no rows either
        starts = self.group_starts(s)
        self.groups_read += len(np.unique(np.searchsorted(starts, local_rows, side="right") - 1))

        with self.store.fs.open(self.store.fs_path(self.paths[s]), "rb") as f:
            return read_rows(pq.ParquetFile(f, metadata=md), local_rows, cols)

    def read_column(self, s: int, column: str) -> pa.ChunkedArray | None:
        """One whole column of shard s (None when the shard lacks it)."""
        md = self.footer(s)
        if column not in self.columns(s):
            return None
        self.groups_read += md.num_row_groups

        with self.store.fs.open(self.store.fs_path(self.paths[s]), "rb") as f:
            return pq.ParquetFile(f, metadata=md).read(columns=[column]).column(column)

    def gather(self, ordinals: np.ndarray, columns: Sequence[str],
               convert: Callable[[pa.Table], Sequence[Any]]) -> list[Any]:
        """convert(table of some rows of one shard) -> one value per row, for each ordinal in the order
        given. Each shard holding some of the rows is read once, only the row groups holding them."""
        ordinals = np.asarray(ordinals, dtype=np.int64)
        out: list[Any] = [None] * len(ordinals)
        shard, local = self.locate(ordinals)
        for s in np.unique(shard):
            where = np.flatnonzero(shard == s)
            uniq, inv = np.unique(local[where], return_inverse=True)
            values = convert(self.read(int(s), uniq, columns))
            for pos, j in zip(where, inv):
                out[pos] = values[j] if j < len(values) else None  # a shard without any of the columns
        return out

    def take(self, ordinals: np.ndarray, columns: Sequence[str]) -> list[dict[str, Any]]:
        """One {column: Python value} per ordinal (None where a shard lacks a column)."""
        rows = self.gather(ordinals, columns, lambda table: table.to_pylist())
        return [{c: (r or {}).get(c) for c in columns} for r in rows]
