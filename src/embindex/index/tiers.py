"""Matryoshka tiers: the same vectors truncated to several widths, one FAISS index per width.

A tier-d vector is the first d dims of the full-width vector, L2-renormalized; the metric is inner
product (cosine). FAISS ids are the row ordinals of the shards in manifest order.
"""

from __future__ import annotations

import time
from typing import Sequence

import faiss
import numpy as np

from .factories import FLAT_MAX_ROWS as AUTO_FLAT_MAX  # noqa: F401 - kept for compatibility
from .factories import auto_factory as _auto_factory
from .factories import make_index


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


def auto_factory(n: int, dim: int, memory_budget_mb: float = 4096) -> str:
    """The factory `auto` picks (see factories.auto_factory for the rule)."""
    return _auto_factory(n, dim, memory_budget_mb)


def build_tier(vectors: np.ndarray, dim: int, factory: str, train_sample: int = 100_000,
               seed: int = 0) -> tuple[faiss.Index, dict]:
    """Build the tier-`dim` index over all rows in memory (ids = row ordinals); returns it with build stats.

    Small corpora and tests only: tier_builder.build_tiers is the bounded-memory path."""
    factory = auto_factory(len(vectors), dim) if factory == "auto" else factory
    start = time.perf_counter()
    x = truncate(vectors, dim)
    index = make_index(factory, dim)
    if not index.is_trained:
        rng = np.random.default_rng(seed)
        sample = x if len(x) <= train_sample else x[rng.choice(len(x), train_sample, replace=False)]
        index.train(sample)
    index.add(x)
    stats = {"factory": factory, "build_seconds": round(time.perf_counter() - start, 3)}
    return index, stats


def set_search_params(index: faiss.Index, k: int) -> None:
    """ANN search settings wide enough for a shortlist of k (ignored by exact indexes)."""
    params = faiss.ParameterSpace()
    for name, value in (("efSearch", max(64, 2 * k)), ("nprobe", 32)):
        try:
            params.set_index_parameter(index, name, value)
        except RuntimeError:
            pass


def search_tier(index: faiss.Index, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    dim = index.d
    set_search_params(index, k)
    k = min(k, index.ntotal)
    return index.search(truncate(queries, dim), k)


def exact_topk(vectors: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """Brute-force full-width top-k ids (the ground truth for quality)."""
    flat = faiss.IndexFlatIP(vectors.shape[1])
    flat.add(np.ascontiguousarray(vectors, dtype=np.float32))
    _, ids = flat.search(np.ascontiguousarray(queries, dtype=np.float32), min(k, len(vectors)))
    return ids


def recall_at_k(found: np.ndarray, truth: np.ndarray) -> float:
    k = truth.shape[1]
    hits = sum(len(set(f[f >= 0]) & set(t)) for f, t in zip(found[:, :k], truth))
    return hits / float(truth.size) if truth.size else 1.0


def rescore(vectors: np.ndarray, queries: np.ndarray, shortlist: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Rescore each query's shortlist with full-width vectors; returns (scores, ids) of the top k."""
    out_ids = np.full((len(queries), k), -1, dtype=np.int64)
    out_scores = np.full((len(queries), k), -np.inf, dtype=np.float32)
    for qi, (q, cand) in enumerate(zip(queries, shortlist)):
        cand = cand[cand >= 0]
        if cand.size == 0:
            continue
        s = vectors[cand] @ q
        order = np.argsort(-s, kind="stable")[:k]
        out_ids[qi, : len(order)] = cand[order]
        out_scores[qi, : len(order)] = s[order]
    return out_scores, out_ids


def serialize(index: faiss.Index) -> bytes:
    return faiss.serialize_index(index).tobytes()


def deserialize(data: bytes) -> faiss.Index:
    return faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8))
