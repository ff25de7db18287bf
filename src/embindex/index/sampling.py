"""Uniform samples of vectors across shards, in bounded memory.

- `sample_shards` (the tiers' training + quality sample): the driver splits the sample size over the
  shards with a multivariate hypergeometric draw on their row counts, then one task per shard draws
  its share uniformly without replacement. Together that is a uniform sample without replacement of
  the whole corpus, and the driver only ever holds the sample (never a shard), read in parallel.
- `Reservoir` (Algorithm R): for streams whose counts are not known up front (token vectors). Rows
  stream in shard by shard; it never holds more than `capacity` rows, and after `n` rows every row is
  in it with probability min(1, capacity / n), independently of shard boundaries.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import pyarrow.parquet as pq

from ..ray_runtime import run_tasks
from ..storage import Storage, StorageOptions
from .vector_io import as_matrix, read_rows, shard_rows


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


def _count_rows(root: str, options: StorageOptions, rel: str) -> int:
    return shard_rows(Storage(root, options), rel)


def _draw_from_shard(root: str, options: StorageOptions, rel: str, take: int,
                     seed: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Task: `take` rows of one shard drawn uniformly without replacement (float16, in row order, read
    from the row groups that hold them only), their row positions, and the shard's row count."""
    store = Storage(root, options)
    with store.fs.open(store.fs_path(rel), "rb") as f:
        pf = pq.ParquetFile(f)
        n = pf.metadata.num_rows
        if take >= n:
            pos = np.arange(n, dtype=np.int64)
            table = pf.read(columns=["vector"])
        else:
            pos = np.sort(np.random.default_rng(seed).choice(n, size=take, replace=False)).astype(np.int64)
            table = read_rows(pf, pos, ["vector"])
    return as_matrix(table.column("vector"), np.float16), pos, n


def sample_shards(store: Storage, shard_paths: Sequence[str], capacity: int, dim: int,
                  seed: int = 0, rows: Sequence[int] | None = None) -> ShardScan:
    """Row counts and a uniform sample of min(capacity, rows) full-width rows, one task per shard.

    `rows` are the shards' row counts when the caller knows them (manifest / commit records); else
    they are read from the Parquet footers, in tasks."""
    calls = [(store.root, store.options, rel) for rel in shard_paths]
    rows = [int(r) for r in (rows if rows is not None else run_tasks(_count_rows, calls))]
    if len(rows) != len(shard_paths):
        raise ValueError(f"{len(rows)} row counts for {len(shard_paths)} shards")
    total = sum(rows)
    rng = np.random.default_rng(seed)
    take = (np.asarray(rows, dtype=np.int64) if capacity >= total
            else rng.multivariate_hypergeometric(np.asarray(rows, dtype=np.int64), capacity))
    seeds = rng.integers(0, 2**31, size=len(rows))
    picked = [(i, int(t)) for i, t in enumerate(take) if t > 0]
    drawn = run_tasks(_draw_from_shard, [(*calls[i], t, int(seeds[i])) for i, t in picked])
    offsets = np.cumsum([0] + rows[:-1])
    vectors, ordinals = [np.zeros((0, dim), np.float16)], [np.zeros(0, np.int64)]
    for (i, _), (v, pos, n) in zip(picked, drawn):
        if n != rows[i]:
            raise ValueError(f"shard {shard_paths[i]} holds {n} rows, not the {rows[i]} its count says")
        vectors.append(v)
        ordinals.append(offsets[i] + pos.astype(np.int64))
    return ShardScan(rows=rows, vectors=np.concatenate(vectors), ordinals=np.concatenate(ordinals))
