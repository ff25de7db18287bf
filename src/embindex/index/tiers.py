"""Matryoshka tiers: the same vectors truncated to several widths, one FAISS index per width.

A tier-d vector is the first d dims of the full-width vector, L2-renormalized; the metric is inner
product (cosine). FAISS ids are the row ordinals of the shards in manifest order.
"""

from __future__ import annotations

from typing import Sequence

from .faiss_lib import faiss
import numpy as np



def truncate(vectors: np.ndarray, dim: int) -> np.ndarray:
    """First `dim` dims, L2-renormalized, float32 contiguous (what FAISS takes)."""
    v = np.ascontiguousarray(vectors[:, :dim], dtype=np.float32)
    norms = np.linalg.norm(v, axis=1, keepdims=True)
    return v / np.maximum(norms, 1e-12)


def resolve_tiers(tiers: Sequence[int | str], full_dim: int) -> list[int]:
    """Config tiers ('full' allowed) -> sorted unique widths; error on a width the model lacks."""
    dims = set()
    for t in tiers:
        d = full_dim if t == "full" else int(t)
        if d > full_dim:
            raise ValueError(f"index tier {d} is wider than the model's {full_dim} dims")
        dims.add(d)
    return sorted(dims)


def serialize(index: faiss.Index) -> bytes:
    return faiss.serialize_index(index).tobytes()


def deserialize(data: bytes) -> faiss.Index:
    return faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8))
