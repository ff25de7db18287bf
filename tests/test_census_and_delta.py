"""The driver-light passes of build and reindex, on real Ray Data: the census (rows and rejects per
fragment, duplicated ids) and the reindex delta (a distributed join of the source against the live rows)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from embindex.incremental import diff
from embindex.index.shards import DuplicateRowError, count_documents
from embindex.sources.census import take_census
from embindex.storage import Storage

pytestmark = [pytest.mark.timeout(300)]


def _rows(ids, fragment, rejected=(), hashes=None):
    return [{"id": i, "reject": "empty_text" if i in rejected else None, "fragment": fragment,
             "content_hash": None if i in rejected else (hashes or {}).get(i, f"h-{i}")} for i in ids]


def _dataset(blocks):
    import ray.data

    return ray.data.from_arrow([pa.Table.from_pylist(b) for b in blocks])


@pytest.mark.parametrize("fragments", [1, 500])  # one shuffle partition, and ten
def test_census_counts_fragments_rejects_and_duplicates(ray_cluster, fragments):
    blocks = [_rows(["a", "b", "c"], "f1"), _rows(["d", "a", "x"], "f2", rejected={"x"}),
              _rows(["e", "x", "b", "b"], "f3", rejected={"x"}), _rows([], "f4")]
    census = take_census(_dataset([b for b in blocks if b]), fragments)
    assert census.rows == {"f1": 3, "f2": 3, "f3": 4} and census.rows_in == 10
    assert census.rejects == {"f2": 1, "f3": 1}
    assert census.duplicates == {"a", "b"}  # "x" occurs twice, but only as a reject


def test_a_fragment_with_a_repeated_chunk_is_refused():
    docs = pa.table({"id": ["a", "a", "b"], "chunk": [0, 1, None]})
    assert count_documents(docs) == 2
    with pytest.raises(DuplicateRowError):
        count_documents(pa.table({"id": ["a", "a"], "chunk": [0, 0]}))
    with pytest.raises(DuplicateRowError):
        count_documents(pa.table({"id": ["b", "b"], "chunk": pa.array([None, None], pa.int64())}))


def _write_shard(store: Storage, rel: str, rows: list[tuple[str, str]]) -> tuple[str, int]:
    path = store.fs_path(rel)
    import os

    os.makedirs(os.path.dirname(path), exist_ok=True)
    pq.write_table(pa.table({"id": [r[0] for r in rows], "content_hash": [r[1] for r in rows]}), path,
                   row_group_size=2)
    return rel, len(rows)


def test_delta_is_a_join_of_the_source_and_the_live_rows(ray_cluster, tmp_path, monkeypatch):
    monkeypatch.setattr(diff, "ROWS_PER_PARTITION", 4)  # several join partitions
    store = Storage(str(tmp_path))
    # the base version: ordinals 0..8; "c" has 3 chunks (a document's rows share one shard); ordinal 5
    # (an older "e") was already tombstoned
    shards = [_write_shard(store, "s/0.parquet", [("a", "h-a"), ("b", "h-b"), ("c", "h-c"), ("c", "h-c"),
                                                  ("c", "h-c")]),
              _write_shard(store, "s/1.parquet", [("e", "h-e-old"), ("d", "h-d"), ("e", "h-e"), ("g", "h-g")])]
    base_dead = diff.tombstone_table(np.array([5], np.int64), ["e"])
    pq.write_table(base_dead, store.fs_path("s/tomb.parquet"))
    # the source now: a same, b changed, c changed, d deleted, e same, g deleted, f and h added,
    # "dup" is duplicated (a reject, not a document)
    source = _dataset([_rows(["a", "b", "f", "dup"], "F1", hashes={"b": "h-b2"}),
                       _rows(["c", "e", "h", "dup"], "F2", hashes={"c": "h-c2"})])
    delta = diff.compute_delta(diff.new_side(source, {"dup"}), diff.live_side(store, shards, "s/tomb.parquet"),
                               base_dead, expected_ids=20)
    assert delta.summary() == {"added": 2, "changed": 2, "deleted": 2, "unchanged": 2}
    assert delta.to_embed == {"b", "c", "f", "h"} and delta.fragments == {"F1", "F2"}
    assert delta.dead.tolist() == [1, 2, 3, 4, 5, 6, 8]  # b, c (3 chunks), the older e, d, g
    assert delta.dead_ids == ["b", "c", "c", "c", "e", "d", "g"]
