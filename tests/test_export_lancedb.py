"""`embindex export` into LanceDB: a real Lance table searched exactly gives embindex's exact top-10 at the
exported width; a newer version is applied as a delta; an interrupted export resumes; foreign targets
and other indexes are refused before any row is written."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pyarrow as pa
import pytest
from typer.testing import CliRunner

from embindex.cli import app
from embindex.export import ConflictError, export_index
from embindex.export.sinks.lance_sink import STATE_TABLE, LanceSink
from embindex.index.tiers import truncate
from export_support import live_ids, reader_top10, shared_index

lancedb = pytest.importorskip("lancedb")
pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


@pytest.fixture(scope="module")
def idx(ray_cluster, tmp_path_factory):
    return shared_index(tmp_path_factory)


def lance_top10(db_path, table: str, queries: np.ndarray, width: int) -> list[list[str]]:
    """Exact (brute-force, no ANN index) dot-product top-10 ids of a Lance table."""
    tb = lancedb.connect(str(db_path)).open_table(table)
    out = []
    for q in truncate(queries, width):
        res = (tb.search(q, vector_column_name="vector").distance_type("dot").bypass_vector_index()
               .limit(10).to_arrow())
        out.append(res.column("id").to_pylist())
    return out


def _state(db_path, table: str) -> dict:
    rows = lancedb.connect(str(db_path)).open_table(STATE_TABLE).to_arrow().to_pylist()
    return json.loads(next(r["state"] for r in rows if r["target"] == table))


def test_round_trip_same_top10(idx, tmp_path):
    result = export_index(idx.uri, f"lancedb://{tmp_path}/db/docs", version="v000001", tier=64)
    assert result.rows_upserted == 300 and result.shards_written == 3 and result.width == 64
    tb = lancedb.connect(str(tmp_path / "db")).open_table("docs")
    assert tb.count_rows() == 300
    schema = tb.schema
    assert schema.field("vector").type == pa.list_(pa.float32(), 64)
    assert schema.field("module").type == pa.string() and schema.field("kind").type == pa.string()
    doc = idx.docs[0]
    row = tb.search().where(f"id = '{doc['id']}'").limit(1).to_list()[0]
    assert row["module"] == doc["module"] and json.loads(row["meta"]) == {"module": doc["module"], "kind": doc["kind"]}
    assert row["chunk"] is None and row["shard"].endswith(".parquet")
    assert abs(np.linalg.norm(row["vector"]) - 1) < 1e-5
    assert lance_top10(tmp_path / "db", "docs", idx.queries, 64) == reader_top10(idx.uri, "v000001", 64, idx.queries)
    state = _state(tmp_path / "db", "docs")
    assert state["version"] == "v000001" and state["pending"] is None and state["index"] == idx.uri
    assert state["width"] == 64 and len(state["shards"]) == 3
    again = export_index(idx.uri, f"lancedb://{tmp_path}/db/docs", version="v000001")
    assert again.up_to_date and again.rows_upserted == 0


def test_newer_version_is_a_delta(idx, tmp_path):
    target = f"lancedb://{tmp_path}/db/docs"
    first = export_index(idx.uri, target, version="v000001", tier=128)
    assert first.rows_upserted == 300
    second = export_index(idx.uri, target)  # the latest: v000002, the width the target holds
    assert second.previous == "v000001" and second.version == "v000002" and second.width == 128
    assert second.shards_written == 2 and second.rows_upserted == 25  # 5 edited + 20 added
    assert second.rows_deleted == 5  # the edited rows were replaced in place, only deletions delete
    tb = lancedb.connect(str(tmp_path / "db")).open_table("docs")
    ids = tb.to_arrow().column("id").to_pylist()
    assert len(ids) == len(set(ids)) == 315 and set(ids) == live_ids(idx.uri, "v000002")
    assert not set(ids) & set(idx.deleted)
    assert lance_top10(tmp_path / "db", "docs", idx.queries, 128) == reader_top10(idx.uri, "v000002", 128, idx.queries)
    assert _state(tmp_path / "db", "docs")["version"] == "v000002"

    # another index (a copy of this one elsewhere) is refused before anything is written
    other = tmp_path / "other-index"
    shutil.copytree(idx.uri, other)
    with pytest.raises(ConflictError, match="another index"):
        export_index(str(other), target)
    assert tb.count_rows() == 315
    # an older version, another width: refused too
    with pytest.raises(ConflictError, match="newer than v000001"):
        export_index(idx.uri, target, version="v000001")
    with pytest.raises(ConflictError, match="128-dim"):
        export_index(idx.uri, target, tier=64)


def test_interrupted_export_resumes(idx, tmp_path, monkeypatch):
    target = f"lancedb://{tmp_path}/db/docs"
    calls = []
    real = LanceSink.write

    def failing(self, rows, fresh=False):
        calls.append(rows.num_rows)
        if len(calls) == 2:
            raise OSError("connection reset while writing")
        return real(self, rows, fresh)

    monkeypatch.setattr(LanceSink, "write", failing)
    with pytest.raises(OSError):
        export_index(idx.uri, target, version="v000001", tier=64, wave=1)
    monkeypatch.setattr(LanceSink, "write", real)
    state = _state(tmp_path / "db", "docs")
    assert state["pending"] == "v000001" and state["version"] is None and len(state["shards"]) == 1
    resumed = export_index(idx.uri, target, version="v000001")
    assert resumed.shards_written == 2 and resumed.rows_upserted == 200
    ids = lancedb.connect(str(tmp_path / "db")).open_table("docs").to_arrow().column("id").to_pylist()
    assert len(ids) == len(set(ids)) == 300


def test_foreign_table_and_bad_target_are_refused(idx, tmp_path):
    db = lancedb.connect(str(tmp_path / "db"))
    db.create_table("docs", pa.table({"key": ["x"], "vector": pa.array([[0.0] * 4], pa.list_(pa.float32(), 4))}))
    with pytest.raises(ConflictError, match="holds no embindex export"):
        export_index(idx.uri, f"lancedb://{tmp_path}/db/docs", tier=64)
    assert db.open_table("docs").count_rows() == 1
    with pytest.raises(ValueError, match="index has no tier 100"):
        export_index(idx.uri, f"lancedb://{tmp_path}/db/other", tier=100)
    with pytest.raises(ValueError, match="table name"):
        export_index(idx.uri, "lancedb://docs", tier=64)
    # --replace drops the foreign table and loads the index
    assert export_index(idx.uri, f"lancedb://{tmp_path}/db/docs", tier=64, replace=True).rows_upserted == 315


def test_cli_with_ivf_pq_index(idx, tmp_path):
    target = f"lancedb://{tmp_path}/db/docs"
    out = CliRunner().invoke(app, ["export", idx.uri, "--to", target, "--tier", "full", "--index",
                                   "--opt", "num_partitions=2", "--opt", "num_sub_vectors=8"])
    assert out.exit_code == 0, out.output
    assert "exported v000002 into an empty target" in out.output and "315 rows upserted" in out.output
    tb = lancedb.connect(str(tmp_path / "db")).open_table("docs")
    indexed = {tuple(i.columns) for i in tb.list_indices()}
    assert ("vector",) in indexed and ("key",) in indexed
    assert tb.schema.field("vector").type == pa.list_(pa.float32(), 384)
    q = truncate(idx.queries[:1], 384)[0]
    approx = tb.search(q, vector_column_name="vector").distance_type("dot").limit(10).to_arrow()
    assert approx.num_rows == 10
    out = CliRunner().invoke(app, ["export", idx.uri, "--to", f"lancedb://{tmp_path}/db/docs", "--tier", "64"])
    assert out.exit_code == 1 and "384-dim" in out.output


def test_default_width_is_recall_driven(idx, tmp_path):
    import embindex

    m = embindex.open_index(idx.uri).manifest
    per_tier = m.quality["tiers"]
    expected = min((t.dim for t in m.tiers if per_tier[str(t.dim)]["recall@10"] >= 0.8), default=m.dim)
    result = export_index(idx.uri, f"lancedb://{tmp_path}/db/docs", recall_target=0.8)
    assert result.width == expected < m.dim  # the narrowest tier that serves 0.8 recall@10 without rescoring
