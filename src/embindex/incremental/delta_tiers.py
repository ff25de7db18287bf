"""Extend a version's tiers with a delta: one more index file per tier holding the new rows under their
global ordinals, built from the previous tier's trained (emptied) index, so IVF/PQ training is reused.

The extended tier is searched as shards (every file returns global ordinals). Tiers merged on disk and
binary tiers are not extended in place: a reindex over them rebuilds (see reindex.py)."""

from __future__ import annotations

from typing import Sequence

import faiss
import numpy as np

from ..index import layout, tiers
from ..index.filling import fill_index
from ..index.manifest import TierEntry
from ..index.vector_io import read_vectors
from ..storage import Storage

EXTENDABLE = ("single", "shards")


def extendable(entries: Sequence[TierEntry]) -> bool:
    return all((e.layout or "single") in EXTENDABLE and e.metric == "ip" for e in entries)


def delta_tier_path(run_id: str, dim: int) -> str:
    return f"{layout.run_dir(run_id)}/tier-{dim:05d}-delta.faiss"


def _empty_trained(store: Storage, entry: TierEntry) -> faiss.Index:
    """The tier's trained index with no vectors (IDMap2 wrappers peeled off)."""
    index = tiers.deserialize(store.read_bytes(entry.files[0]))
    inner = faiss.downcast_index(index.index) if isinstance(index, faiss.IndexIDMap) else index
    empty = faiss.clone_index(inner)
    empty.reset()
    return empty


def extend_tiers(store: Storage, base: Sequence[TierEntry], delta_paths: Sequence[str], offset: int,
                 run_id: str) -> list[TierEntry]:
    """New tier entries: the base files plus one delta file per tier (ids offset .. offset + n - 1)."""
    full = [read_vectors(store, p, dtype=np.float32) for p in delta_paths]
    vectors = np.concatenate(full) if full else None
    out = []
    for entry in base:
        files = list(entry.files)
        n_delta = 0 if vectors is None else len(vectors)
        if n_delta:
            trained = _empty_trained(store, entry)
            wrap = not isinstance(trained, faiss.IndexIVF)
            index = fill_index(trained, tiers.truncate(vectors, entry.dim), offset, wrap)
            rel = delta_tier_path(run_id, entry.dim)
            store.write_bytes(rel, tiers.serialize(index))
            files.append(rel)
        data = entry.model_dump()
        data.update(files=files, layout="shards" if len(files) > 1 else (entry.layout or "single"),
                    ntotal=offset + n_delta)
        out.append(TierEntry(**data))
    return out
