"""The export plan: export rows of a shard, the delta between what a target holds and a version
(new shards, tombstoned rows by (key, shard), dropped shards after a compaction), the default width,
metadata field inference, the checks that refuse an export, and the state record."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pyarrow as pa
import pytest

import embindex
from embindex.export import ConflictError, ExportState, export_index
from embindex.export.plan import (RowOptions, ShardTask, check_target, default_width, export_rows, infer_fields,
                                  make_plan, open_store, resolve_width)
from embindex.export.sinks import open_sink
from embindex.export.sinks.base import mask_uri
from embindex.export.sinks.lance_sink import meta_columns, parse_lance_uri
from embindex.export.state import index_identity
from embindex.index.publish import read_manifest
from embindex.index.tiers import truncate
from export_support import live_ids, shared_index

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


@pytest.fixture(scope="module")
def idx(ray_cluster, tmp_path_factory):
    return shared_index(tmp_path_factory)


def _manifest(idx, version):
    return read_manifest(open_store(idx.uri, None), version)


def test_export_rows_of_a_shard(idx):
    store = open_store(idx.uri, None)
    m = _manifest(idx, "v000002")
    plan = make_plan(store, m, None, RowOptions(width=64, full_vector=True))
    assert [len(t.skip) for t in plan.upsert].count(0) == 4  # all but one shard have no tombstones
    task = next(t for t in plan.upsert if t.skip)  # the file with 5 edited and 5 deleted documents
    assert len(task.skip) == 10 and task.live == 90
    rows = export_rows(store, task, plan.rows)
    assert rows.num_rows == 90 and rows.column_names == ["key", "id", "chunk", "start", "end", "modality", "meta",
                                                         "shard", "vector", "vector_full"]
    ids = rows.column("id").to_pylist()
    assert rows.column("key").to_pylist() == ids and not set(ids) & set(idx.deleted + idx.edited)
    assert rows.schema.field("vector").type == pa.list_(pa.float32(), 64)
    vec = np.array(rows.column("vector").to_pylist(), dtype=np.float32)
    full = np.array(rows.column("vector_full").to_pylist(), dtype=np.float32)
    np.testing.assert_allclose(np.linalg.norm(vec, axis=1), 1, atol=1e-5)
    np.testing.assert_allclose(vec, truncate(full, 64), atol=1e-6)  # the tier: first 64 dims, renormalized
    reader = embindex.open_index(idx.uri, version="v000002")
    row0 = reader.ids.index(ids[0])
    np.testing.assert_allclose(full[0], truncate(reader.vectors[row0:row0 + 1], 384)[0], atol=1e-6)
    assert set(rows.column("shard").to_pylist()) == {task.path}


def test_chunk_and_token_rows(tmp_path):
    """Chunk rows are keyed `<id>#<chunk>` and keep their offsets; token vectors (multi-vector indexes)
    travel as float32 lists and become the Elasticsearch document's `tokens`."""
    import pyarrow.parquet as pq

    from embindex.export.sinks.es_docs import documents

    v = np.eye(4, dtype=np.float16)[:3]
    tok = pa.list_(pa.list_(pa.float16(), 2))
    table = pa.table({"id": ["a", "a", "b"], "chunk": pa.array([0, 1, None], pa.int32()),
                      "start": pa.array([0, 10, None], pa.int32()), "end": pa.array([10, 20, None], pa.int32()),
                      "meta": ['{"x": 1}', '{"x": 1}', None],
                      "vector": pa.FixedSizeListArray.from_arrays(pa.array(v.reshape(-1)), 4),
                      "token_vectors": pa.array([[[1, 0], [0, 1]], [[1, 0]], [[0, 1]]], tok)})
    (tmp_path / "shards").mkdir()
    pq.write_table(table, tmp_path / "shards" / "part-1.parquet")
    rows = export_rows(open_store(str(tmp_path), None), ShardTask("shards/part-1.parquet", 3, [2]),
                       RowOptions(width=2, tokens=True))
    assert rows.column("key").to_pylist() == ["a#0", "a#1"]
    assert rows.column("modality").to_pylist() == ["text", "text"]  # shards without the column: text rows
    assert rows.column("vector").to_pylist() == [[1.0, 0.0], [0.0, 1.0]]
    assert rows.column("tokens").to_pylist() == [[[1.0, 0.0], [0.0, 1.0]], [[1.0, 0.0]]]
    docs = documents(rows)
    key, source = docs[0]
    assert key == "a#0" and json.loads(source) == {
        "key": "a#0", "id": "a", "modality": "text", "shard": "shards/part-1.parquet", "meta": {"x": 1},
        "chunk": {"index": 0, "start": 0, "end": 10}, "tokens": [[1.0, 0.0], [0.0, 1.0]], "embedding": [1.0, 0.0]}


def test_delta_plan_between_versions(idx):
    store = open_store(idx.uri, None)
    v1, v2 = _manifest(idx, "v000001"), _manifest(idx, "v000002")
    held = ExportState(index=index_identity(idx.uri), fingerprint=v1.fingerprint, width=64, full_dim=v1.dim,
                       version="v000001", shards=[s.path for s in v1.shards], fields={"module": "keyword"})
    plan = make_plan(store, v2, held, RowOptions(width=64))
    assert [t.path for t in plan.upsert] == [s.path for s in v2.shards[3:]]
    assert plan.upsert_rows == 25 and plan.dropped == [] and plan.base == "v000001"
    assert sorted(k for k, _ in plan.deletes) == sorted(idx.edited + idx.deleted)
    shards = {s for _, s in plan.deletes}  # deleted with the shard they came from
    assert len(shards) == 1 and shards <= {s.path for s in v1.shards}
    assert plan.fields == {"module": "keyword"}  # a target's fields stay what they were
    state = plan.state()
    assert state.pending == "v000002" and state.version == "v000001" and state.shards == held.shards
    again = make_plan(store, v2, ExportState(**{**held.__dict__, "version": "v000002",
                                                "shards": [s.path for s in v2.shards]}), RowOptions(width=64))
    assert again.nothing_to_do


def test_compaction_drops_shards_in_the_target(idx, tmp_path):
    """A target at v000001, the index compacted after v000002: every shard is new, and the rows of the
    dropped shards that no new row replaced (the documents deleted in v000002) are deleted by shard."""
    from embindex.incremental.compact import compact

    copy = tmp_path / "index"
    shutil.copytree(idx.uri, copy)
    target = f"lancedb://{tmp_path}/db/docs"
    export_index(str(copy), target, version="v000001", tier=64)
    compacted = compact(str(copy), force=True)
    assert compacted is not None and compacted.version == "v000003"
    result = export_index(str(copy), target)
    old = {s.path for s in _manifest(idx, "v000002").shards}
    assert not old & {s.path for s in compacted.shards}
    assert result.shards_written == len(compacted.shards) and result.rows_upserted == 315
    assert result.rows_deleted == 5
    lancedb = pytest.importorskip("lancedb")
    table = lancedb.connect(str(tmp_path / "db")).open_table("docs").to_arrow()
    assert sorted(table.column("id").to_pylist()) == sorted(live_ids(idx.uri, "v000002"))
    assert not set(table.column("shard").to_pylist()) & old


def test_default_width_and_checks(idx):
    m = _manifest(idx, "v000001")
    quality = m.quality["tiers"]
    assert default_width(m, 0.0) == min(t.dim for t in m.tiers)
    assert default_width(m, 1.01) == m.dim  # no tier reaches it: the full width
    mid = quality[str(128)]["recall@10"]
    assert default_width(m, mid) == min(t.dim for t in m.tiers if quality[str(t.dim)]["recall@10"] >= mid)
    assert resolve_width(m, "full") == resolve_width(m, 384) == 384 and resolve_width(m, "32") == 32
    with pytest.raises(ValueError, match="no tier 100"):
        resolve_width(m, 100)
    with pytest.raises(ValueError, match="'full' or 'auto'"):
        resolve_width(m, "wide")
    me = index_identity(idx.uri)
    state = ExportState(index=me, fingerprint=m.fingerprint, width=64, full_dim=384, version="v000002")
    check_target(None, me, m, 64)
    for change, message in [({"index": "/elsewhere"}, "another index"), ({"fingerprint": "sha256:x"}, "not comparable"),
                            ({"width": 128}, "128-dim"), ({}, "newer than v000001")]:
        with pytest.raises(ConflictError, match=message):
            check_target(ExportState(**{**state.__dict__, **change}), me, m, 64)


def test_fields_state_and_uris():
    assert infer_fields([{"a": "x", "n": 1, "f": 1.5, "b": True, "o": {"k": "v"}, "l": [1, 2]},
                         {"n": 2.5, "a": 3, "o": {"j": 1}, "z": None}]) == {
        "a": "flattened", "n": "double", "f": "double", "b": "boolean",
        "o": {"object": {"k": "keyword", "j": "long"}}, "l": "long"}
    s = ExportState(index="/i", fingerprint="f", width=8, full_dim=16, shards=["a"], fields={"x": "long"})
    assert ExportState.from_json(s.to_json()) == s and json.loads(s.to_json())["updated_at"]
    assert index_identity("file:///a/b/") == "/a/b" and index_identity("s3://b/x/") == "s3://b/x"
    assert mask_uri("postgresql://u:p%40ss@h:5/db?table=t") == "postgresql://u:***@h:5/db?table=t"
    assert parse_lance_uri("lancedb:///srv/db/docs") == ("/srv/db", "docs")
    assert parse_lance_uri("lancedb://rel/db/docs") == ("rel/db", "docs")
    assert parse_lance_uri("lancedb+s3://bucket/prefix/db/docs") == ("s3://bucket/prefix/db", "docs")
    cols = meta_columns({"module": "keyword", "id": "keyword", "n": "long", "o": {"object": {}}, "bad name": "long"})
    assert cols == {"module": ("module", pa.string()), "id": ("meta_id", pa.string()), "n": ("n", pa.int64())}
    with pytest.raises(ValueError, match="unknown export target"):
        open_sink("redis://u:secret@h/0")
    with pytest.raises(ValueError) as e:
        open_sink("mysql://u:secret@h/db")
    assert "secret" not in str(e.value)


def test_ray_job_entrypoint(idx, tmp_path):
    """pipelines/export_index.py: the CLI command on Ray (the session's Ray here), exit codes as the CLI's."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).parent.parent / "pipelines" / "export_index.py"
    spec = importlib.util.spec_from_file_location("export_index_job", path)
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    assert job.main([idx.uri, "--to", f"file://{tmp_path}/out", "--tier", "32", "--quiet"]) == 0
    assert json.loads((tmp_path / "out" / "state.json").read_text())["version"] == "v000002"
    assert job.main([idx.uri, "--to", "redis://host/0"]) == 1
