"""Build every Matryoshka tier of a version from its Parquet shards and measure their quality."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from ..config import IndexConfig
from ..storage import Storage
from . import layout, tiers
from .manifest import TierEntry
from .shards import read_table, vectors_of


def load_vectors(store: Storage, shard_paths: Sequence[str], dim: int) -> np.ndarray:
    """Full-width vectors of all shards in manifest order (row ordinal = FAISS id)."""
    arrays = [vectors_of(read_table(store, p, columns=["vector"])) for p in shard_paths]
    return np.concatenate(arrays) if arrays else np.zeros((0, dim), np.float32)


def build_tiers(store: Storage, shard_paths: Sequence[str], dim: int, tier_dims: Sequence[int],
                cfg: IndexConfig, run_id: str) -> tuple[list[TierEntry], dict]:
    """Write one FAISS index per tier under the run's folder; return manifest entries and the quality report."""
    vectors = load_vectors(store, shard_paths, dim)
    entries, built = [], {}
    for d in tier_dims:
        factory = cfg.factory_for(d)
        rel = layout.tier_path(run_id, d)
        bpv, seconds = None, None
        if len(vectors):
            index, stats = tiers.build_tier(vectors, d, factory)
            factory, seconds = stats["factory"], stats["build_seconds"]
            data = tiers.serialize(index)
            store.write_bytes(rel, data)
            built[d] = index
            bpv = round(len(data) / index.ntotal, 2)
        entries.append(TierEntry(dim=d, factory=factory, metric=cfg.metric, files=[rel], bytes_per_vector=bpv,
                                 build_seconds=seconds))
    quality = tiers.quality_report(vectors, built, cfg.quality_sample, cfg.rescore)
    return entries, quality
