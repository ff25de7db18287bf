"""Arrow columns of the embed stages: vectors and token vectors as float16 lists, token id lists, and the
chunk columns (`chunk`, `start`, `end`) of every row."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

VECTOR_COLUMN = "vector"
TOKEN_VECTORS_COLUMN = "token_vectors"
CHUNK_COLUMNS = ("chunk", "start", "end")


def list_array(arrays: list[np.ndarray]) -> pa.ListArray:
    offsets = np.zeros(len(arrays) + 1, dtype=np.int32)
    np.cumsum([len(a) for a in arrays], out=offsets[1:])
    flat = np.concatenate(arrays).astype(np.int32) if arrays else np.zeros(0, np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat, pa.int32()))


def lists_of(col: pa.ChunkedArray, rows: np.ndarray) -> list[np.ndarray]:
    arr = col.combine_chunks()
    offsets, values = arr.offsets.to_numpy(), arr.values.to_numpy()
    return [values[offsets[i] : offsets[i + 1]] for i in rows]


def with_chunk_columns(batch: pa.Table, chunk=None, start=None, end=None) -> pa.Table:
    n = batch.num_rows
    for name, values in zip(CHUNK_COLUMNS, (chunk, start, end)):
        batch = batch.append_column(name, pa.array(values if values is not None else [None] * n, pa.int32()))
    return batch


def vectors_to_arrow(vectors: np.ndarray, valid: np.ndarray | None = None) -> pa.FixedSizeListArray:
    """[N, d] float -> fixed_size_list<float16>[d]; rows where `valid` is False are null."""
    n, d = vectors.shape
    values = pa.array(np.ascontiguousarray(vectors, dtype=np.float16).reshape(-1))
    mask = None if valid is None else pa.array(~valid)
    return pa.FixedSizeListArray.from_arrays(values, d, mask=mask)


def token_vectors_to_arrow(per_row: list[np.ndarray | None], dim: int) -> pa.ListArray:
    """Per-row [n_i, d] token vectors -> list<fixed_size_list<float16>[d]> (null for rejects)."""
    lengths = [0 if v is None else len(v) for v in per_row]
    offsets = np.zeros(len(per_row) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    flat = [v for v in per_row if v is not None and len(v)]
    values = np.concatenate(flat).astype(np.float16) if flat else np.zeros((0, dim), np.float16)
    inner = pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1)), dim)
    mask = pa.array([v is None for v in per_row])
    return pa.ListArray.from_arrays(pa.array(offsets), inner, mask=mask)
