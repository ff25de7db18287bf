"""Extend a version's tiers with a delta: one more index file per tier (`TierEntry.deltas`) holding the
new rows under their global ordinals, made from the tier's trained index emptied, so IVF/PQ training is
reused and nothing is re-embedded. Any layout extends this way (single, shards, IVF lists on disk): the
reader searches the tier's own files and its deltas as one index.

Binary (Hamming) tiers, and tiers whose deltas reached `index.max_tier_deltas`, are not extended: the
reindex rebuilds its tiers from the vectors already stored in the Parquet shards (see reindex.py)."""

from __future__ import annotations

import hashlib
from typing import Sequence

from ..index.faiss_lib import faiss
import numpy as np

from ..index import layout, tiers
from ..index.factories import ivf_of, make_index
from ..index.filling import fill_index
from ..index.manifest import TierEntry
from ..index.tier_io import ONDISK
from ..index.vector_io import read_vectors
from ..storage import Storage


def extendable(entries: Sequence[TierEntry], max_deltas: int) -> bool:
    """Whether every tier can take one more delta file (inner-product metric, under the delta cap)."""
    return all(e.metric == "ip" and len(e.deltas) < max_deltas for e in entries)


def delta_tier_path(run_id: str, dim: int) -> str:
    return f"{layout.run_dir(run_id)}/tier-{dim:05d}-delta.faiss"


def empty_trained(store: Storage, entry: TierEntry) -> faiss.Index:
    """The tier's trained index with no vectors (IDMap wrappers peeled off). Indexes that need no
    training (Flat, HNSW, ...) are made from the factory string; trained ones are read from the tier's
    first file, whose IVF lists on disk are not read."""
    fresh = make_index(entry.factory, entry.dim)
    if fresh.is_trained:
        return fresh
    if (entry.layout or "single") == ONDISK:
        index = faiss.deserialize_index(np.frombuffer(store.read_bytes(entry.files[0]), np.uint8),
                                        faiss.IO_FLAG_SKIP_IVF_DATA)
    else:
        index = tiers.deserialize(store.read_bytes(entry.files[0]))
    inner = faiss.downcast_index(index.index) if isinstance(index, faiss.IndexIDMap) else index
    ivf = ivf_of(inner)
    if ivf is not None and (entry.layout or "single") == ONDISK:  # lists on disk, not read: swap in empty ones
        lists = faiss.ArrayInvertedLists(ivf.nlist, ivf.code_size)  # owned here, until the clone copied it
        ivf.replace_invlists(lists, False)
        ivf.ntotal = 0
    empty = faiss.clone_index(inner)
    empty.reset()
    return empty


def extend_tiers(store: Storage, base: Sequence[TierEntry], delta_paths: Sequence[str], offset: int,
                 run_id: str) -> list[TierEntry]:
    """New tier entries: the base tier plus one delta file per tier (ids offset .. offset + n - 1)."""
    full = [read_vectors(store, p, dtype=np.float32) for p in delta_paths]
    vectors = np.concatenate(full) if full else np.zeros((0, 1), np.float32)
    out = []
    for entry in base:
        deltas, hashes = list(entry.deltas), dict(entry.sha256)
        if len(vectors):
            trained = empty_trained(store, entry)
            index = fill_index(trained, tiers.truncate(vectors, entry.dim), offset, ivf_of(trained) is None)
            rel = delta_tier_path(run_id, entry.dim)
            data = tiers.serialize(index)
            store.write_bytes(rel, data)
            deltas.append(rel)
            hashes[rel] = hashlib.sha256(data).hexdigest()
        out.append(entry.model_copy(update={"deltas": deltas, "sha256": hashes, "ntotal": offset + len(vectors)}))
    return out
