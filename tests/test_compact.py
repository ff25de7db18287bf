"""Compaction at scale: the shards are rewritten by tasks (the driver reads none), and the result holds
exactly the base version's live rows, searchable."""

from __future__ import annotations

import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest

import embindex
from embindex.incremental import compact as compact_mod
from embindex.index.publish import read_manifest
from embindex.storage import Storage
from export_support import live_ids, shared_index

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


@pytest.fixture(scope="module")
def idx(ray_cluster, tmp_path_factory):
    return shared_index(tmp_path_factory)


def _rows(uri: str, manifest) -> dict[str, np.ndarray]:
    out = {}
    for s in manifest.shards:
        t = pq.read_table(f"{uri}/{s.path}", columns=["id", "vector"])
        for i, v in zip(t.column("id").to_pylist(), t.column("vector").to_pylist()):
            out[i] = np.asarray(v, dtype=np.float32)
    return out


def test_compact_rewrites_shards_in_tasks_and_keeps_exactly_the_live_rows(idx, tmp_path, monkeypatch):
    copy = str(tmp_path / "index")
    shutil.copytree(idx.uri, copy)
    base = read_manifest(Storage(copy), "v000002")
    live = live_ids(copy, "v000002")
    assert base.tombstones.get("rows") == 10 and len(live) == 315

    def refuse(*a, **k):
        raise AssertionError("the driver read a shard")

    monkeypatch.setattr(compact_mod, "read_table", refuse)  # tasks import their own copy of the module
    compacted = compact_mod.compact(copy, force=True)
    assert compacted.version == "v000003" and not compacted.tombstones
    assert sum(s.rows for s in compacted.shards) == compacted.counts.chunks == 315
    rows = _rows(copy, compacted)
    assert set(rows) == live
    before = _rows(copy, base)  # later rows of an id replace earlier ones: the live copy of an edited doc
    for i in live:
        np.testing.assert_array_equal(rows[i], before[i])
    reader = embindex.open_index(copy)
    hits = reader.search([d["text"] for d in idx.docs[300:303]], k=1)
    assert [h[0].id for h in hits] == [d["id"] for d in idx.docs[300:303]]
