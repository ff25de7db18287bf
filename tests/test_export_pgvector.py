"""`embindex export` into Postgres + pgvector (a real server: pgserver bundles Postgres with pgvector): exact
search in Postgres gives embindex's exact top-10; a newer version is applied as a delta; unreachable
servers, wrong passwords, foreign tables and widths pgvector cannot index fail with one clear error
before any row is sent, and the password never shows in logs, summaries or errors."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from typer.testing import CliRunner

from embindex.cli import app
from embindex.export import ConflictError, ExportError, TargetError, export_index
from embindex.export.sinks.pg_sink import parse_pg_uri, vector_type
from embindex.index.tiers import truncate
from export_support import live_ids, reader_top10, shared_index

pgserver = pytest.importorskip("pgserver")
psycopg = pytest.importorskip("psycopg")
pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

PASSWORD = "s3cr3t-Pw-4-export"


@pytest.fixture(scope="session")
def pg(tmp_path_factory):
    """One Postgres (with pgvector) for the module; a role `exporter` that must give its password."""
    data = tmp_path_factory.mktemp("pg")
    server = pgserver.get_server(data, cleanup_mode="stop")
    admin = server.get_uri()
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
        conn.execute(f"CREATE ROLE exporter LOGIN SUPERUSER PASSWORD '{PASSWORD}'")
        hba = data / "pg_hba.conf"
        hba.write_text("local all exporter scram-sha-256\n" + hba.read_text())
        conn.execute("SELECT pg_reload_conf()")
    yield {"admin": admin, "socket": str(data)}
    server.cleanup()


def target(pg, table: str, password: str = PASSWORD) -> str:
    return f"postgresql://exporter:{password}@/postgres?host={pg['socket']}&table={table}"


@pytest.fixture(scope="module")
def idx(ray_cluster, tmp_path_factory):
    return shared_index(tmp_path_factory)


def pg_top10(pg, table: str, queries: np.ndarray, width: int, exact: bool = True) -> list[list[str]]:
    out = []
    with psycopg.connect(pg["admin"]) as conn:
        if exact:
            conn.execute("SET enable_indexscan = off")  # a sequential scan: exhaustive, exact
        for q in truncate(queries, width):
            v = "[" + ",".join(repr(float(x)) for x in q) + "]"
            rows = conn.execute(f"SELECT id FROM {table} ORDER BY embedding <#> %s::vector LIMIT 10", (v,)).fetchall()
            out.append([r[0] for r in rows])
    return out


def _sql(pg, query: str, params=None):
    with psycopg.connect(pg["admin"]) as conn:
        return conn.execute(query, params).fetchall()


def test_round_trip_same_top10_and_no_password_in_logs(idx, pg):
    logs: list[str] = []
    result = export_index(idx.uri, target(pg, "docs"), version="v000001", tier=64, log=logs.append)
    assert result.rows_upserted == 300 and result.shards_written == 3 and "HNSW" in result.finish["index"]
    assert pg_top10(pg, "docs", idx.queries, 64) == reader_top10(idx.uri, "v000001", 64, idx.queries)
    assert _sql(pg, "SELECT format_type(atttypid, atttypmod) FROM pg_attribute WHERE attrelid = 'docs'::regclass "
                    "AND attname = 'embedding'") == [("vector(64)",)]
    doc = idx.docs[0]
    meta, chunk = _sql(pg, "SELECT meta, chunk FROM docs WHERE id = %s", (doc["id"],))[0]
    assert meta == {"module": doc["module"], "kind": doc["kind"]} and chunk is None
    indexes = dict(_sql(pg, "SELECT indexname, indexdef FROM pg_indexes WHERE tablename = 'docs'"))
    assert "hnsw (embedding vector_ip_ops)" in indexes["docs_embedding_hnsw_idx"]
    # the HNSW index answers too (approximate: just 10 rows)
    assert all(len(r) == 10 for r in pg_top10(pg, "docs", idx.queries[:3], 64, exact=False))
    state = _sql(pg, "SELECT state FROM embindex_exports WHERE target = 'docs'")[0][0]
    assert state["version"] == "v000001" and state["pending"] is None and len(state["shards"]) == 3
    text = "\n".join(logs + [result.summary()])
    assert PASSWORD not in text and "exporter:***@" in text


def test_newer_version_is_a_delta(idx, pg):
    t = target(pg, "docs_delta")
    assert export_index(idx.uri, t, version="v000001", tier=128).rows_upserted == 300
    second = export_index(idx.uri, t)
    assert (second.previous, second.version, second.width) == ("v000001", "v000002", 128)
    assert second.shards_written == 2 and second.rows_upserted == 25 and second.rows_deleted == 5
    ids = [r[0] for r in _sql(pg, "SELECT id FROM docs_delta")]
    assert len(ids) == len(set(ids)) == 315 and set(ids) == live_ids(idx.uri, "v000002")
    assert pg_top10(pg, "docs_delta", idx.queries, 128) == reader_top10(idx.uri, "v000002", 128, idx.queries)
    edited = _sql(pg, "SELECT shard FROM docs_delta WHERE id = %s", (idx.edited[0],))[0][0]
    assert edited not in _sql(pg, "SELECT state FROM embindex_exports WHERE target = 'docs_delta'")[0][0]["shards"][:3]
    assert export_index(idx.uri, t).up_to_date


def test_unrelated_index_and_foreign_table_are_refused(idx, pg, tmp_path):
    t = target(pg, "docs_owned")
    export_index(idx.uri, t, tier=32)
    other = tmp_path / "copy"
    shutil.copytree(idx.uri, other)
    with pytest.raises(ConflictError, match="another index"):
        export_index(str(other), t)
    with psycopg.connect(pg["admin"], autocommit=True) as conn:
        conn.execute("CREATE TABLE foreign_docs (key text PRIMARY KEY, note text)")
        conn.execute("INSERT INTO foreign_docs VALUES ('a', 'mine')")
    with pytest.raises(ConflictError, match="holds no embindex export"):
        export_index(idx.uri, target(pg, "foreign_docs"), tier=32)
    assert _sql(pg, "SELECT count(*) FROM foreign_docs") == [(1,)]


def test_unreachable_and_wrong_password_fail_clearly(idx, pg, tmp_path):
    with pytest.raises(TargetError, match="unreachable") as e:
        export_index(idx.uri, f"postgresql://exporter:{PASSWORD}@127.0.0.1:1/postgres?table=docs",
                     tier=64)
    assert PASSWORD not in str(e.value)
    with pytest.raises(TargetError, match="authentication failed") as e:
        export_index(idx.uri, target(pg, "docs_auth", password="wrong-" + PASSWORD), tier=64)
    assert PASSWORD not in str(e.value)
    assert _sql(pg, "SELECT to_regclass('docs_auth')") == [(None,)]  # nothing created
    out = CliRunner().invoke(app, ["export", idx.uri, "--to", target(pg, "docs_cli", password="wrong-" + PASSWORD),
                                   "--tier", "64"])
    assert out.exit_code == 1 and "authentication failed" in out.output and PASSWORD not in out.output
    out = CliRunner().invoke(app, ["export", idx.uri, "--to", target(pg, "docs_cli"), "--tier", "32", "--no-index"])
    assert out.exit_code == 0 and "315 rows upserted" in out.output and PASSWORD not in out.output
    assert not [r for r in _sql(pg, "SELECT indexname FROM pg_indexes WHERE tablename = 'docs_cli'") if "hnsw" in r[0]]


def test_pgvector_limits():
    assert vector_type(384, "0.6.2", index=True) == "vector(384)"
    assert vector_type(3000, "0.7.4", index=True) == "halfvec(3000)"
    with pytest.raises(ExportError, match="up to 2000 dims.*halfvec"):
        vector_type(3000, "0.6.2", index=True)
    assert vector_type(3000, "0.6.2", index=False) == "vector(3000)"
    with pytest.raises(ExportError, match="up to 4000 dims"):
        vector_type(4096, "0.8.0", index=True)
    with pytest.raises(ExportError, match="halfvec limit of 16000"):
        vector_type(16001, "0.8.0", index=False)
    with pytest.raises(ExportError, match="vector limit of 16000"):
        vector_type(16001, "0.6.2", index=False)  # no halfvec before pgvector 0.7
    assert parse_pg_uri("postgresql://u:p@h:5/db?sslmode=require&table=s.t") == (
        "postgresql://u:p@h:5/db?sslmode=require", "s.t")
    with pytest.raises(ValueError, match="name the table"):
        parse_pg_uri("postgresql://u:p@h/db")
