"""Funnel search over Matryoshka tiers, and exact search.

A funnel is a first stage that shortlists `k * factor` candidates on a (narrow, cheap) tier
(`tier_search.TierSearcher`), then rescoring stages that re-rank the candidates with better vectors
(`rescore_vectors`) and keep fewer:

    Funnel(TierSearcher(tier64), [Rescore(TierVectors(tier256), keep=50), Rescore(ParquetVectors(...))])

A stage is anything with `rerank(queries, ids, keep) -> (scores, ids)`, so MaxSim over multi-vectors or
a cross-encoder can be appended. `exact_topk` is the exhaustive full-width search (the quality ground
truth), streamed over a vector source's blocks.
"""

from __future__ import annotations

from typing import Any, Sequence

from .faiss_lib import faiss
import numpy as np

from . import tiers
from .rescore_vectors import VectorSource
from .selectors import RowFilter
from .tier_search import TierSearcher


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
