"""Snapshot of a source (id -> content hash) against the live rows of the current version."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ..index.shards import read_table
from ..storage import Storage


@dataclass
class Snapshot:
    """What the source holds now: valid documents' hashes, rows per fragment, and where ids live."""

    hashes: dict[str, str] = field(default_factory=dict)
    fragment_of: dict[str, str] = field(default_factory=dict)
    per_fragment: Counter = field(default_factory=Counter)
    fragments_with_rejects: set[str] = field(default_factory=set)
    duplicates: set[str] = field(default_factory=set)


def take_snapshot(ds: Any) -> Snapshot:
    """One pass over the normalized rows (documents and rejects) of every fragment."""
    snap = Snapshot()
    seen: Counter[str] = Counter()
    cols = ["id", "content_hash", "reject", "fragment"]
    for batch in ds.select_columns(cols).iter_batches(batch_format="pyarrow", batch_size=None):
        frags = batch.column("fragment").to_pylist()
        snap.per_fragment.update(frags)
        rejected = pc.is_valid(batch.column("reject")).to_numpy(zero_copy_only=False)
        for frag in {f for f, r in zip(frags, rejected) if r}:
            snap.fragments_with_rejects.add(frag)
        docs = batch.filter(pc.invert(pc.is_valid(batch.column("reject"))))
        for i, h, f in zip(*(docs.column(c).to_pylist() for c in ("id", "content_hash", "fragment"))):
            seen[i] += 1
            snap.hashes[i] = h
            snap.fragment_of[i] = f
    snap.duplicates = {i for i, n in seen.items() if n > 1}
    for i in snap.duplicates:  # rejected as duplicate_id in the run: not documents
        snap.hashes.pop(i, None)
        snap.fragments_with_rejects.add(snap.fragment_of.pop(i))
    return snap


@dataclass
class LiveRows:
    """The rows a version serves: ordinal -> id for every row, hashes of live documents, tombstones."""

    ids: list[str]
    hashes: dict[str, str]
    tombstones: np.ndarray  # sorted ordinals hidden from search
    total: int


def live_rows(store: Storage, shard_paths: Sequence[str], tombstones: np.ndarray) -> LiveRows:
    ids: list[str] = []
    hashes: dict[str, str] = {}
    for p in shard_paths:
        t = read_table(store, p, columns=["id", "content_hash"])
        ids.extend(t.column("id").to_pylist())
        hashes_col = t.column("content_hash").to_pylist()
        start = len(ids) - t.num_rows
        for j, h in enumerate(hashes_col):
            hashes[ids[start + j]] = h
    dead = set(tombstones.tolist())
    live: dict[str, str] = {}
    for ordinal, i in enumerate(ids):
        if ordinal not in dead:
            live[i] = hashes[i]
    return LiveRows(ids, live, np.asarray(sorted(dead), dtype=np.int64), len(ids))


@dataclass
class Delta:
    added: set[str]
    changed: set[str]
    deleted: set[str]
    unchanged: int

    @property
    def to_embed(self) -> set[str]:
        return self.added | self.changed

    def summary(self) -> dict[str, int]:
        return {"added": len(self.added), "changed": len(self.changed), "deleted": len(self.deleted),
                "unchanged": self.unchanged}


def diff(snapshot: Snapshot, live: LiveRows) -> Delta:
    new, old = snapshot.hashes, live.hashes
    added = {i for i in new if i not in old}
    changed = {i for i, h in new.items() if i in old and old[i] != h}
    deleted = {i for i in old if i not in new}
    return Delta(added, changed, deleted, len(new) - len(added) - len(changed))


def new_tombstones(live: LiveRows, delta: Delta) -> np.ndarray:
    """Previous tombstones plus every live row of a changed or deleted document (all its chunks)."""
    gone = delta.changed | delta.deleted
    dead = set(live.tombstones.tolist())
    dead.update(o for o, i in enumerate(live.ids) if i in gone)
    return np.asarray(sorted(dead), dtype=np.int64)


def tombstone_table(ordinals: np.ndarray, ids: list[str]) -> pa.Table:
    return pa.table({"ordinal": pa.array(ordinals, pa.int64()), "id": pa.array([ids[o] for o in ordinals])})


def keep_delta_rows(batch: pa.Table, embed_ids: pa.Array) -> pa.Table:
    """Ray Data step of a reindex: rejects and the documents to embed (`embed_ids`, a string array built
    once by the driver); unchanged documents are dropped (their rows are reused from the previous version)."""
    if batch.num_rows == 0:
        return batch
    keep = pc.or_(pc.is_valid(batch.column("reject")),
                  pc.fill_null(pc.is_in(batch.column("id"), value_set=embed_ids), False))
    return batch.filter(keep)
