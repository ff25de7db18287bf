"""A bounded-memory uniform sample of vectors across shards (reservoir sampling, Algorithm R).

Rows stream in shard by shard; the reservoir never holds more than `capacity` rows, and after `n`
rows every row is in it with probability min(1, capacity / n), independently of shard boundaries.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from ..storage import Storage
from .vector_io import read_vectors


class Reservoir:
    """Uniform sample of at most `capacity` rows of width `dim`, with their global ordinals."""

    def __init__(self, capacity: int, dim: int, seed: int = 0, dtype: np.dtype | type = np.float16):
        if capacity <= 0:
            raise ValueError("reservoir capacity must be positive")
        self.capacity = capacity
        self.vectors = np.empty((capacity, dim), dtype=dtype)
        self.ordinals = np.empty(capacity, dtype=np.int64)
        self.seen = 0
        self._rng = np.random.default_rng(seed)

    @property
    def size(self) -> int:
        return min(self.seen, self.capacity)

    def add(self, batch: np.ndarray, ordinals: np.ndarray | None = None) -> None:
        """Offer a batch of rows (in stream order); `ordinals` default to their stream positions."""
        n = len(batch)
        if n == 0:
            return
        if ordinals is None:
            ordinals = np.arange(self.seen, self.seen + n, dtype=np.int64)
        fill = max(0, min(self.capacity - self.seen, n))
        if fill:
            self.vectors[self.seen:self.seen + fill] = batch[:fill]
            self.ordinals[self.seen:self.seen + fill] = ordinals[:fill]
        if fill < n:
            # Algorithm R: stream item i (0-based) replaces slot j ~ U[0, i] when j < capacity.
            i = np.arange(self.seen + fill, self.seen + n, dtype=np.int64)
            j = (self._rng.random(len(i)) * (i + 1)).astype(np.int64)
            src = np.nonzero(j < self.capacity)[0] + fill
            slots = j[src - fill]
            # several items may hit the same slot in one batch: sequentially the last one wins
            last = len(slots) - 1 - np.unique(slots[::-1], return_index=True)[1]
            self.vectors[slots[last]] = batch[src[last]]
            self.ordinals[slots[last]] = ordinals[src[last]]
        self.seen += n

    def sample(self) -> tuple[np.ndarray, np.ndarray]:
        """(vectors, ordinals) held now, sorted by ordinal."""
        k = self.size
        order = np.argsort(self.ordinals[:k], kind="stable")
        return self.vectors[:k][order], self.ordinals[:k][order]


@dataclass
class ShardScan:
    """What one pass over the shards learned: rows per shard (hence ordinal offsets) and the sample."""

    rows: list[int]
    vectors: np.ndarray  # sampled full-width rows, float16
    ordinals: np.ndarray  # their global row ordinals

    @property
    def offsets(self) -> list[int]:
        return [int(x) for x in np.cumsum([0] + self.rows[:-1])] if self.rows else []

    @property
    def total(self) -> int:
        return int(sum(self.rows))

    @property
    def complete(self) -> bool:
        """The sample holds every row, in ordinal order (the corpus fits the reservoir)."""
        return len(self.ordinals) == self.total


def sample_shards(store: Storage, shard_paths: Sequence[str], capacity: int, dim: int,
                  seed: int = 0) -> ShardScan:
    """One pass over the shards in manifest order: row counts and a reservoir sample of `capacity` rows."""
    res = Reservoir(capacity, dim, seed=seed)
    rows = []
    for rel in shard_paths:
        v = read_vectors(store, rel, dtype=np.float16)
        rows.append(len(v))
        res.add(v)
        del v
    vectors, ordinals = res.sample()
    return ShardScan(rows=rows, vectors=vectors, ordinals=ordinals)
