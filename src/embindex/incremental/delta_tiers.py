"""Extend a version's tiers with a delta: one more index file per tier (`TierEntry.deltas`) holding the
new rows under their global ordinals, made from the tier's trained index emptied, so IVF/PQ training is
reused and nothing is re-embedded. Any layout extends this way (single, shards, IVF lists on disk): the
reader searches the tier's own files and its deltas as one index.

Binary (Hamming) tiers, and tiers whose deltas reached `index.max_tier_deltas`, are not extended: the
reindex rebuilds its tiers from the vectors already stored in the Parquet shards (see reindex.py)."""

from __future__ import annotations

import hashlib
import time
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
    """New tier entries: the base tier plus one delta file per tier (ids offset .. offset + n - 1).

    The delta shards are read one at a time and each goes into every tier's delta index, so memory is
    the delta indexes plus one shard, never all delta vectors at once."""
    indexes: dict[int, faiss.Index] = {}
    seconds = {e.dim: 0.0 for e in base}
    added = 0
    for rel in delta_paths:
        vectors = read_vectors(store, rel, dtype=np.float32)
        if not len(vectors):
            continue
        ids = np.arange(offset + added, offset + added + len(vectors), dtype=np.int64)
        for entry in base:
            t0 = time.perf_counter()
            part = np.ascontiguousarray(tiers.truncate(vectors, entry.dim), dtype=np.float32)
            if entry.dim not in indexes:  # the tier's trained index, emptied, ids kept where it has none
                trained = empty_trained(store, entry)
                indexes[entry.dim] = fill_index(trained, part[:0], 0, ivf_of(trained) is None)
            indexes[entry.dim].add_with_ids(part, ids)
            del part
            seconds[entry.dim] += time.perf_counter() - t0
        added += len(vectors)
        del vectors
    out = []
    for entry in base:
        deltas, hashes = list(entry.deltas), dict(entry.sha256)
        update = {"deltas": deltas, "sha256": hashes, "ntotal": offset + added}
        if entry.dim in indexes:
            t0 = time.perf_counter()
            rel = layout.tier_delta_path(run_id, entry.dim)
            data = tiers.serialize(indexes.pop(entry.dim))
            store.write_bytes(rel, data)
            deltas.append(rel)
            hashes[rel] = hashlib.sha256(data).hexdigest()
            spent = round(seconds[entry.dim] + time.perf_counter() - t0, 3)
            # the tier as this version has it: base files + every delta; this run's cost is the delta's
            if entry.bytes_per_vector is not None and entry.ntotal:
                update["bytes_per_vector"] = round((entry.bytes_per_vector * entry.ntotal + len(data))
                                                   / (offset + added), 2)
            update["build_seconds"] = spent
            update["build"] = {**entry.build, "delta_rows": added, "delta_s": spent}
            del data
        out.append(entry.model_copy(update=update))
    return out
