"""The tiers' training + quality sample: a uniform sample of vectors across shards, in bounded memory.

The driver splits the sample size over the shards with a multivariate hypergeometric draw on their
row counts, then one task per shard draws its share uniformly without replacement. Together that is a
uniform sample without replacement of the whole corpus; the driver only ever holds the sample (never a
shard), read in parallel. (The token index samples token vectors the same way, multivector.py.)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import pyarrow.parquet as pq

from ..ray_runtime import run_tasks
from ..storage import Storage, StorageOptions
from .vector_io import as_matrix, read_rows, shard_rows


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
        """The sample holds every row, in ordinal order (the corpus fits the sample size)."""
        return len(self.ordinals) == self.total


def split_sample(counts: Sequence[int], capacity: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """How many of `capacity` uniform draws fall in each of the parts of sizes `counts` (all of every part
    when the capacity covers them; else a multivariate hypergeometric draw), and a seed per part for its
    own draw (`draw_positions`). Together: a uniform sample without replacement of the whole."""
    counts = np.asarray(counts, dtype=np.int64)
    rng = np.random.default_rng(seed)
    take = counts if capacity >= counts.sum() else rng.multivariate_hypergeometric(counts, capacity)
    return take, rng.integers(0, 2**31, size=len(counts))


def draw_positions(n: int, take: int, seed: int) -> np.ndarray:
    """`take` of positions 0..n-1 drawn uniformly without replacement, sorted (all n when take >= n)."""
    if take >= n:
        return np.arange(n, dtype=np.int64)
    return np.sort(np.random.default_rng(seed).choice(n, size=take, replace=False)).astype(np.int64)


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
        pos = draw_positions(n, take, seed)
        table = pf.read(columns=["vector"]) if len(pos) == n else read_rows(pf, pos, ["vector"])
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
    take, seeds = split_sample(rows, capacity, seed)
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
