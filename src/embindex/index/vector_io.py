"""Read the full-width vector column of Parquet shards: whole shards, or only some rows of one.

Shards hold `vector` as fixed_size_list<float16>[dim]. Readers here touch one shard at a time, so
memory is bounded by the largest shard (or, for row takes, by the row groups holding the rows).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..storage import Storage


def _as_matrix(col: pa.ChunkedArray | pa.Array, dtype: np.dtype | type) -> np.ndarray:
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
    return _as_matrix(table.column(column), dtype)


def take_vectors(store: Storage, rel: str, rows: Sequence[int] | np.ndarray, column: str = "vector",
                 dtype: np.dtype | type = np.float32) -> np.ndarray:
    """Vectors of the given local rows of one shard (in the order given), reading only their row groups."""
    rows = np.asarray(rows, dtype=np.int64)
    with store.fs.open(store.fs_path(rel), "rb") as f:
        pf = pq.ParquetFile(f)
        md = pf.metadata
        starts = np.cumsum([0] + [md.row_group(i).num_rows for i in range(md.num_row_groups)])
        groups = np.unique(np.searchsorted(starts, rows, side="right") - 1)
        table = pf.read_row_groups([int(g) for g in groups], columns=[column])
    # local row -> position inside the concatenation of the row groups read
    sizes = starts[groups + 1] - starts[groups]
    base = np.cumsum(np.concatenate([[0], sizes[:-1]]))
    g_of_row = np.searchsorted(groups, np.searchsorted(starts, rows, side="right") - 1)
    pos = base[g_of_row] + rows - starts[groups[g_of_row]]
    return _as_matrix(table.column(column).take(pa.array(pos)), dtype)
