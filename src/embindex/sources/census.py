"""The pre-pass of a build or reindex: rows and rejects per fragment, and the ids that occur more than
once among documents, computed by a distributed aggregation (Ray Data groupby) so the driver receives
O(fragments + duplicated ids) values, never one value per document."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

FRAGMENT, REJECTS, DOCUMENT = 0, 1, 2
FRAGMENTS_PER_PARTITION = 50  # ~500k ids a partition at the default 10k rows a fragment
MAX_PARTITIONS = 200
SCHEMA = pa.schema([("kind", pa.int8()), ("key", pa.string()), ("n", pa.int64())])


@dataclass
class Census:
    rows: Counter = field(default_factory=Counter)  # fragment -> rows (documents and rejects)
    rejects: Counter = field(default_factory=Counter)  # fragment -> rows rejected while normalizing
    duplicates: set[str] = field(default_factory=set)  # ids of more than one document

    @property
    def rows_in(self) -> int:
        return sum(self.rows.values())


def block_keys(batch: pa.Table) -> pa.Table:
    """One block's counts: rows and rejected rows per fragment, and occurrences of each document id."""
    rejected = pc.is_valid(batch.column("reject"))
    columns = ((FRAGMENT, batch.column("fragment")), (REJECTS, batch.filter(rejected).column("fragment")),
               (DOCUMENT, batch.filter(pc.invert(rejected)).column("id")))
    parts = []
    for kind, column in columns:
        counts = pc.value_counts(column)
        if len(counts):
            parts.append(pa.table({"kind": pa.array([kind] * len(counts), pa.int8()),
                                   "key": counts.field("values").cast(pa.string()),
                                   "n": counts.field("counts").cast(pa.int64())}))
    return pa.concat_tables(parts) if parts else SCHEMA.empty_table()


def _kept(batch: pa.Table) -> pa.Table:
    """After the sum: the per-fragment rows, and only the ids seen more than once."""
    total = batch.column(batch.column_names[-1])
    return batch.filter(pc.or_(pc.not_equal(batch.column("kind"), DOCUMENT), pc.greater(total, 1)))


def partitions_for(fragments: int) -> int:
    """Shuffle partitions of the aggregation: about FRAGMENTS_PER_PARTITION fragments' ids each (Ray Data's
    default of 200 costs seconds of task overhead on a small corpus)."""
    return max(1, min(MAX_PARTITIONS, fragments // FRAGMENTS_PER_PARTITION))


def take_census(ds: Any, fragments: int) -> Census:
    """The census of a dataset of normalized rows (id, reject, fragment) of `fragments` fragments."""
    keys = ds.select_columns(["id", "reject", "fragment"]).map_batches(block_keys, batch_format="pyarrow",
                                                                      batch_size=None)
    summed = keys.groupby(["kind", "key"], num_partitions=partitions_for(fragments)).sum("n").map_batches(_kept, batch_format="pyarrow", batch_size=None)
    census = Census()
    for batch in summed.iter_batches(batch_format="pyarrow", batch_size=None):
        for kind, key, total in zip(*(batch.column(i).to_pylist() for i in range(3))):
            if kind == FRAGMENT:
                census.rows[key] = total
            elif kind == REJECTS:
                census.rejects[key] = total
            else:
                census.duplicates.add(key)
    return census


def fragments_holding(ds: Any, ids: set[str]) -> set[str]:
    """The fragments in which any of `ids` occurs (one more pass, only when `ids` is not empty)."""
    if not ids:
        return set()
    wanted = pa.array(sorted(ids), pa.string())

    def hits(batch: pa.Table) -> pa.Table:
        found = batch.filter(pc.fill_null(pc.is_in(batch.column("id"), value_set=wanted), False))
        return pa.table({"fragment": pc.unique(found.column("fragment"))})

    frags = ds.select_columns(["id", "fragment"]).map_batches(hits, batch_format="pyarrow", batch_size=None)
    return {f for b in frags.iter_batches(batch_format="pyarrow", batch_size=None)
            for f in b.column("fragment").to_pylist()}
