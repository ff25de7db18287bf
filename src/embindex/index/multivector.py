"""Multi-vector storage and candidate generation: a token-level FAISS index whose ids are the row
ordinals of the documents the tokens belong to, and MaxSim over stored token vectors."""

from __future__ import annotations

from typing import Sequence

import faiss
import numpy as np
import pyarrow as pa

from ..storage import Storage
from . import layout
from .shards import read_table


def token_matrix(cell: pa.ListScalar | pa.Array) -> np.ndarray:
    """One row's list<fixed_size_list<float16>[d]> -> [n, d] float32."""
    arr = cell.values if isinstance(cell, pa.ListScalar) else cell
    if arr is None or len(arr) == 0:
        return np.zeros((0, 0), np.float32)
    d = arr.type.list_size
    return arr.flatten().to_numpy(zero_copy_only=False).reshape(-1, d).astype(np.float32)


def shard_token_vectors(table: pa.Table) -> list[np.ndarray]:
    """All rows' token matrices of a shard table with a `token_vectors` column."""
    col = table.column("token_vectors").combine_chunks()
    d = col.type.value_type.list_size
    offsets = col.offsets.to_numpy()
    flat = col.values.flatten().to_numpy(zero_copy_only=False).reshape(-1, d).astype(np.float32)
    return [flat[offsets[i] : offsets[i + 1]] for i in range(len(col))]


def build_token_index(store: Storage, shard_paths: Sequence[str], dim: int, run_id: str) -> tuple[str, int]:
    """Flat inner-product index over every stored token vector, id = the token's row ordinal.
    Reads one shard at a time. Returns the file path and the number of token vectors."""
    index = faiss.IndexIDMap2(faiss.IndexFlatIP(dim))
    base = 0
    for path in shard_paths:
        mats = shard_token_vectors(read_table(store, path, columns=["token_vectors"]))
        if mats:
            lengths = [len(m) for m in mats]
            ids = np.repeat(np.arange(base, base + len(mats), dtype=np.int64), lengths)
            vecs = np.concatenate(mats) if sum(lengths) else np.zeros((0, dim), np.float32)
            if len(vecs):
                index.add_with_ids(np.ascontiguousarray(vecs), ids)
        base += len(mats)
    rel = layout.token_index_path(run_id)
    store.write_bytes(rel, faiss.serialize_index(index).tobytes())
    return rel, int(index.ntotal)


def maxsim_scores(query: np.ndarray, docs: Sequence[np.ndarray]) -> np.ndarray:
    """ColBERT MaxSim of one [q, d] query against each [n_i, d] document: sum over query tokens of the
    best dot product over the document's tokens (0 for a document without tokens)."""
    out = np.zeros(len(docs), dtype=np.float32)
    for j, d in enumerate(docs):
        if len(d):
            out[j] = float((query @ d.T).max(axis=1).sum())
    return out


def token_candidates(index: faiss.Index, query: np.ndarray, token_k: int) -> np.ndarray:
    """Row ordinals whose tokens are among the `token_k` nearest of any query token."""
    _, ids = index.search(np.ascontiguousarray(query, dtype=np.float32), min(token_k, index.ntotal))
    return np.unique(ids[ids >= 0])
