"""The delta of a reindex: the source's documents (id -> content hash) against the live rows of the
published version, as a distributed full outer join (Ray Data), so no process holds every id.

  new side   normalized rows of the source: valid documents that are not duplicates (id, new_hash, fragment)
  live side  one Ray task per base shard: its rows not tombstoned, grouped by id (id, old_hash, ordinals)
  join       on id -> added (new only), deleted (live only), changed (hashes differ), unchanged

The driver receives the counts and the rows of the delta only (ids to embed, ordinals to tombstone).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ..index.shards import read_table
from ..storage import Storage, StorageOptions

ADDED, CHANGED, DELETED, UNCHANGED = "added", "changed", "deleted", "unchanged"
LIVE_SCHEMA = pa.schema([("id", pa.string()), ("old_hash", pa.string()), ("ordinals", pa.list_(pa.int64()))])
ROWS_PER_PARTITION = 1_000_000  # join partitions: about this many ids each


@dataclass
class Delta:
    to_embed: set[str]  # added and changed ids
    fragments: set[str]  # fragments holding them
    dead: np.ndarray  # sorted ordinals hidden from now on (the base's tombstones included)
    dead_ids: list[str]  # the id of each of `dead`
    added: int
    changed: int
    deleted: int
    unchanged: int

    def summary(self) -> dict[str, int]:
        return {"added": self.added, "changed": self.changed, "deleted": self.deleted, "unchanged": self.unchanged}


def new_side(ds: Any, duplicates: set[str]) -> Any:
    """(id, new_hash, fragment) of the source's valid documents; duplicated ids are rejects, not documents."""
    dup = pa.array(sorted(duplicates), pa.string())

    def documents(batch: pa.Table) -> pa.Table:
        keep = pc.is_null(batch.column("reject"))
        if len(dup):
            keep = pc.and_(keep, pc.invert(pc.is_in(batch.column("id"), value_set=dup)))
        docs = batch.filter(keep)
        return pa.table({"id": docs.column("id"), "new_hash": docs.column("content_hash"),
                         "fragment": docs.column("fragment")})

    return ds.select_columns(["id", "content_hash", "reject", "fragment"]).map_batches(
        documents, batch_format="pyarrow", batch_size=None)


def live_shard_rows(batch: pa.Table, root: str, storage: dict[str, Any], tombstones: str | None) -> pa.Table:
    """Ray Data step over (path, offset) rows, one shard each: the shard's rows that are not tombstoned,
    one row per id with the ordinals of all its rows (chunks)."""
    store = Storage(root, StorageOptions.from_dict(storage))
    out = []
    for path, offset in zip(batch.column("path").to_pylist(), batch.column("offset").to_pylist()):
        t = read_table(store, path, columns=["id", "content_hash"])
        ordinals = pa.array(np.arange(offset, offset + t.num_rows, dtype=np.int64))
        rows = t.append_column("ordinal", ordinals)
        if tombstones:
            dead = _tombstones_between(store, tombstones, offset, offset + t.num_rows)
            rows = rows.filter(pc.invert(pc.is_in(rows.column("ordinal"), value_set=dead)))
        grouped = rows.group_by("id").aggregate([("content_hash", "max"), ("ordinal", "list")])
        out.append(pa.table({"id": grouped.column("id"), "old_hash": grouped.column("content_hash_max"),
                             "ordinals": grouped.column("ordinal_list")}, schema=LIVE_SCHEMA))
    return pa.concat_tables(out) if out else LIVE_SCHEMA.empty_table()


def _tombstones_between(store: Storage, rel: str, lo: int, hi: int) -> pa.Array:
    """Tombstoned ordinals in [lo, hi): the file is sorted by ordinal, so row-group statistics skip the rest."""
    with store.fs.open(store.fs_path(rel), "rb") as f:
        t = pq.read_table(f, columns=["ordinal"], filters=[("ordinal", ">=", lo), ("ordinal", "<", hi)])
    return t.column("ordinal").combine_chunks()


def live_side(store: Storage, shards: Sequence[tuple[str, int]], tombstones: str | None) -> Any:
    """(id, old_hash, ordinals) of the live rows of a version with these (path, rows) shards."""
    import ray.data

    offsets = np.concatenate([[0], np.cumsum([n for _, n in shards])[:-1]]).astype(np.int64)
    items = [{"path": p, "offset": int(o)} for (p, _), o in zip(shards, offsets)]
    return ray.data.from_items(items, override_num_blocks=max(1, len(items))).map_batches(
        live_shard_rows, batch_format="pyarrow", batch_size=1,
        fn_kwargs={"root": store.root, "storage": asdict(store.options), "tombstones": tombstones})


def classify(batch: pa.Table) -> pa.Table:
    """Status of each joined id (ADDED / CHANGED / DELETED / UNCHANGED)."""
    new, old = pc.is_valid(batch.column("new_hash")), pc.is_valid(batch.column("old_hash"))
    same = pc.fill_null(pc.equal(batch.column("new_hash"), batch.column("old_hash")), False)
    status = pc.case_when(pc.make_struct(pc.and_(new, pc.invert(old)), pc.and_(old, pc.invert(new)),
                                         pc.invert(same)),
                          ADDED, DELETED, CHANGED, UNCHANGED)
    return batch.append_column("status", status)


def _changed_only(batch: pa.Table) -> pa.Table:
    return batch.filter(pc.not_equal(batch.column("status"), UNCHANGED))


def compute_delta(new: Any, live: Any, base_dead: pa.Table, expected_ids: int) -> Delta:
    """Join the two sides and collect the delta. `base_dead`: the base's tombstones (ordinal, id)."""
    partitions = max(1, min(256, expected_ids // ROWS_PER_PARTITION + 1))
    joined = new.join(live, join_type="full_outer", num_partitions=partitions, on=("id",))
    classified = joined.map_batches(classify, batch_format="pyarrow", batch_size=None).materialize()
    counts = {ADDED: 0, CHANGED: 0, DELETED: 0}
    to_embed: set[str] = set()
    fragments: set[str] = set()
    dead = [base_dead.column("ordinal").to_numpy(zero_copy_only=False)]
    dead_ids = base_dead.column("id").to_pylist()
    changes = classified.map_batches(_changed_only, batch_format="pyarrow", batch_size=None)
    for b in changes.iter_batches(batch_format="pyarrow", batch_size=None):
        for status, n in zip(*pc.value_counts(b.column("status")).flatten()):
            counts[status.as_py()] += n.as_py()
        embed = b.filter(pc.is_valid(b.column("new_hash")))
        to_embed.update(embed.column("id").to_pylist())
        fragments.update(embed.column("fragment").to_pylist())
        gone = b.filter(pc.is_valid(b.column("old_hash")))
        ords = gone.column("ordinals")
        lengths = pc.list_value_length(ords).to_numpy(zero_copy_only=False)
        dead.append(pc.list_flatten(ords).to_numpy(zero_copy_only=False))
        dead_ids.extend(np.repeat(np.asarray(gone.column("id").to_pylist(), dtype=object), lengths).tolist())
    ordinals = np.concatenate(dead).astype(np.int64)
    order = np.argsort(ordinals, kind="stable")
    unchanged = classified.count() - sum(counts.values())
    return Delta(to_embed, fragments, ordinals[order], [dead_ids[i] for i in order],
                 counts[ADDED], counts[CHANGED], counts[DELETED], unchanged)


def tombstone_table(ordinals: np.ndarray, ids: list[str]) -> pa.Table:
    return pa.table({"ordinal": pa.array(ordinals, pa.int64()), "id": pa.array(ids, pa.string())})


def keep_delta_rows(batch: pa.Table, embed_ids: pa.Array) -> pa.Table:
    """Ray Data step of a reindex: rejects and the documents to embed (`embed_ids`, a string array built
    once by the driver); unchanged documents are dropped (their rows are reused from the previous version)."""
    if batch.num_rows == 0:
        return batch
    keep = pc.or_(pc.is_valid(batch.column("reject")),
                  pc.fill_null(pc.is_in(batch.column("id"), value_set=embed_ids), False))
    return batch.filter(keep)
