"""`embindex export` to Elasticsearch, through the official client against a loopback server that answers
like Elasticsearch and records the requests (no Elasticsearch server runs here): the mapping follows the
manifest and the documented dense_vector / rank_vectors constraints, bulk bodies carry unit vectors of the
exported width, a 429 is retried, a refused document is reported with its id and its shard resumes on the
next run, a newer version is a delta, and bad targets fail before any document is sent. Also the
`file://` target (mapping.json + bulk NDJSON per shard)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from typer.testing import CliRunner

from embindex.cli import app
from embindex.export import ConflictError, ExportError, TargetError, export_index
from embindex.export.sinks.es_docs import build_mapping
from embindex.export.sinks.es_sink import parse_es_uri
from embindex.index.tiers import truncate
from es_recorder import Recorder
from export_support import live_ids, reader_top10, shared_index

pytest.importorskip("elasticsearch")
pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]
FAST = {"initial_backoff": 0.01}  # streaming_bulk's backoff before retrying a 429


@pytest.fixture(scope="module")
def idx(ray_cluster, tmp_path_factory):
    return shared_index(tmp_path_factory)


@pytest.fixture()
def es():
    rec = Recorder().start()
    yield rec
    rec.stop()


def es_top10(docs: dict[str, dict], queries: np.ndarray, width: int) -> list[list[str]]:
    """Exact dot-product top-10 over the documents the server received (what a kNN search would rank)."""
    ids = list(docs)
    mat = np.array([docs[i]["embedding"] for i in ids], dtype=np.float32)
    scores = truncate(queries, width) @ mat.T
    return [[docs[ids[j]]["id"] for j in np.argsort(-s, kind="stable")[:10]] for s in scores]


def test_mapping_bulk_bodies_and_request_flow(idx, es):
    doc0 = idx.docs[0]["id"]
    es.reject_once.add(doc0)  # answered 429 once: streaming_bulk retries it
    result = export_index(idx.uri, f"es://{es.url}/docs", version="v000001", tier=64, options=FAST)
    assert result.rows_upserted == 300 and result.shards_written == 3
    paths = es.paths()
    assert paths[0] == "/" and ("PUT", "/docs") in [(m, p) for m, p, _ in es.requests]
    first_bulk = paths.index(next(p for p in paths if p.endswith("/_bulk")))
    assert paths.index("/docs") < first_bulk and "/docs/_mapping" in paths[:first_bulk]  # state before rows
    mapping = es.indices["docs"]["mappings"]
    vec = mapping["properties"]["embedding"]
    assert vec == {"type": "dense_vector", "dims": 64, "element_type": "float", "index": True,
                   "similarity": "dot_product", "index_options": {"type": "int8_hnsw"}}
    assert mapping["properties"]["meta"]["properties"] == {"module": {"type": "keyword"}, "kind": {"type": "keyword"}}
    state = mapping["_meta"]["embindex"]
    assert state["version"] == "v000001" and state["pending"] is None and len(state["shards"]) == 3
    bulks = es.bulk_lines()
    sent = [line["index"]["_id"] for body in bulks for line in body if "index" in line]
    assert sent.count(doc0) == 2 and len(sent) == 301  # the 429'd document went out twice
    action, source = bulks[0][0], bulks[0][1]
    assert set(action["index"]) == {"_index", "_id"} and action["index"]["_index"] == "docs"
    assert len(source["embedding"]) == 64 and abs(np.linalg.norm(source["embedding"]) - 1) < 1e-5
    assert "chunk" not in source and isinstance(source["meta"], dict) and source["shard"].endswith(".parquet")
    docs = es.docs("docs")
    assert len(docs) == 300
    assert es_top10(docs, idx.queries, 64) == reader_top10(idx.uri, "v000001", 64, idx.queries)


def test_refused_document_is_reported_and_its_shard_resumes(idx, es):
    bad = idx.docs[150]["id"]  # in the second shard
    es.refuse[bad] = "failed to parse field [meta.kind] of type [long]"
    with pytest.raises(ExportError) as e:
        export_index(idx.uri, f"es://{es.url}/docs", version="v000001", tier=32, options=FAST, wave=1)
    assert bad in str(e.value) and "mapper_parsing_exception" in str(e.value) and "run the export again" in str(e.value)
    state = es.indices["docs"]["mappings"]["_meta"]["embindex"]
    assert state["pending"] == "v000001" and state["version"] is None and len(state["shards"]) == 2
    es.refuse.clear()
    es.clear()
    resumed = export_index(idx.uri, f"es://{es.url}/docs", version="v000001", options=FAST)
    assert resumed.shards_written == 1 and resumed.rows_upserted == 100
    assert sum(1 for body in es.bulk_lines() for line in body if "index" in line) == 100  # only that shard
    assert len(es.docs("docs")) == 300
    assert es.indices["docs"]["mappings"]["_meta"]["embindex"]["version"] == "v000001"


def test_newer_version_is_a_delta_and_unrelated_index_is_refused(idx, es, tmp_path):
    target = f"es://{es.url}/docs"
    export_index(idx.uri, target, version="v000001", tier=128, options=FAST)
    second = export_index(idx.uri, target, options=FAST)
    assert second.shards_written == 2 and second.rows_upserted == 25 and second.rows_deleted == 5
    docs = es.docs("docs")
    assert {d["id"] for d in docs.values()} == live_ids(idx.uri, "v000002") and len(docs) == 315
    assert es_top10(docs, idx.queries, 128) == reader_top10(idx.uri, "v000002", 128, idx.queries)
    dbq = [json.loads(b) for m, p, b in es.requests if p.startswith("/docs/_delete_by_query")]
    filters = [q["query"]["bool"]["filter"] for q in dbq]
    assert all(f[0]["term"]["shard"] and f[1]["ids"]["values"] for f in filters)
    assert sum(len(f[1]["ids"]["values"]) for f in filters) == 10  # 5 replaced + 5 deleted rows, by (id, shard)

    other = tmp_path / "copy"
    shutil.copytree(idx.uri, other)
    es.clear()
    with pytest.raises(ConflictError, match="another index"):
        export_index(str(other), target, options=FAST)
    assert not [p for p in es.paths() if p.endswith("/_bulk")]


def test_bad_targets_fail_before_any_document(idx, es, monkeypatch):
    # unreachable
    with pytest.raises(TargetError, match="unreachable"):
        export_index(idx.uri, "es://127.0.0.1:1/docs", tier=64, options={"request_timeout": 2})
    # authentication: the server wants an API key, the environment gives a wrong one
    es.api_key = "right-key"
    monkeypatch.setenv("ELASTIC_API_KEY", "wrong-secret-key")
    with pytest.raises(TargetError, match="authentication failed") as e:
        export_index(idx.uri, f"es://{es.url}/docs", tier=64)
    assert "wrong-secret-key" not in str(e.value)
    out = CliRunner().invoke(app, ["export", idx.uri, "--to", f"es://{es.url}/docs", "--tier", "64"])
    assert out.exit_code == 1 and "authentication failed" in out.output and "wrong-secret-key" not in out.output
    monkeypatch.setenv("ELASTIC_API_KEY", "right-key")
    # a mapping conflict: the index exists with another mapping and no export state
    es.indices["docs"] = {"mappings": {"properties": {"embedding": {"type": "dense_vector", "dims": 3}}},
                          "settings": {}, "docs": {}}
    with pytest.raises(ConflictError, match="holds no embindex export"):
        export_index(idx.uri, f"es://{es.url}/docs", tier=64)
    # dims and options Elasticsearch refuses, before any request
    es.clear()
    with pytest.raises(ExportError, match="at least 64 dims"):
        export_index(idx.uri, f"es://{es.url}/other", tier=32, options={"index_type": "bbq_hnsw"})
    with pytest.raises(ExportError, match="oversample"):
        export_index(idx.uri, f"es://{es.url}/other", tier=64, options={"oversample": 20})
    assert not [p for p in es.paths() if p.endswith("/_bulk")] and "other" not in es.indices
    # an existing export at another width
    export_index(idx.uri, f"es://{es.url}/sized", tier=64)
    with pytest.raises(ConflictError, match="64-dim"):
        export_index(idx.uri, f"es://{es.url}/sized", tier=128)


def test_mapping_constraints_and_options():
    fields = {"module": "keyword", "n": "long", "score": "double", "ok": "boolean",
              "nested": {"object": {"a": "keyword"}}, "mixed": "flattened"}
    m = build_mapping(1024, fields, content=True, full_dim=2048, token_dim=128, index_type="bbq_hnsw",
                      oversample=3, m=32, ef_construction=200)["properties"]
    assert m["embedding"]["index_options"] == {"type": "bbq_hnsw", "m": 32, "ef_construction": 200,
                                               "rescore_vector": {"oversample": 3.0}}
    assert m["embedding_full"] == {"type": "dense_vector", "dims": 2048, "element_type": "float", "index": False}
    assert m["tokens"] == {"type": "rank_vectors", "dims": 128, "element_type": "float"}
    assert m["content"] == {"type": "text"} and m["chunk"]["properties"]["start"] == {"type": "integer"}
    assert m["meta"]["properties"] == {"module": {"type": "keyword"}, "n": {"type": "long"},
                                       "score": {"type": "double"}, "ok": {"type": "boolean"},
                                       "nested": {"type": "object", "properties": {"a": {"type": "keyword"}}},
                                       "mixed": {"type": "flattened"}}
    assert build_mapping(4096, {})["properties"]["embedding"]["dims"] == 4096
    for kwargs, message in [({"width": 4097}, "1 to 4096"), ({"width": 64, "index_type": "hnsw8"}, "unknown"),
                            ({"width": 63, "index_type": "int4_hnsw"}, "even"),
                            ({"width": 64, "index_type": "hnsw", "oversample": 2}, "quantized"),
                            ({"width": 64, "oversample": 0.5}, "between 1.0 and 10.0"),
                            ({"width": 64, "index_type": "int8_flat", "m": 8}, "_hnsw"),
                            ({"width": 64, "token_dim": 5000}, "rank_vectors"),
                            ({"width": 64, "full_dim": 8192}, "full-width")]:
        width = kwargs.pop("width")
        with pytest.raises(ExportError, match=message):
            build_mapping(width, {}, **kwargs)
    assert build_mapping(64, {}, oversample=0)["properties"]["embedding"]["index_options"]["rescore_vector"] == {
        "oversample": 0.0}
    assert parse_es_uri("es://localhost/docs") == ("http://localhost:9200", "docs")
    assert parse_es_uri("ess://search.example.com/docs") == ("https://search.example.com:443", "docs")
    for bad in ("es://localhost:9200/", "es://localhost:9200/Docs", "http://localhost:9200/docs"):
        with pytest.raises(ValueError):
            parse_es_uri(bad)


def test_file_target_writes_mapping_and_bulk_files(idx, tmp_path):
    target = f"file://{tmp_path}/out"
    first = export_index(idx.uri, target, version="v000001", tier=64, full_vector=True)
    assert first.rows_upserted == 300
    mapping = json.loads((tmp_path / "out" / "mapping.json").read_text())["mappings"]["properties"]
    assert mapping["embedding"]["dims"] == 64 and mapping["embedding_full"]["dims"] == 384
    files = sorted((tmp_path / "out" / "v000001").iterdir())
    assert len(files) == 3 and all(f.name.startswith("bulk-") and f.suffix == ".ndjson" for f in files)
    lines = [json.loads(x) for x in files[0].read_text().splitlines()]
    assert len(lines) == 200 and lines[0] == {"index": {"_id": lines[1]["key"]}}
    assert len(lines[1]["embedding"]) == 64 and len(lines[1]["embedding_full"]) == 384
    second = export_index(idx.uri, target, full_vector=True)
    assert second.rows_upserted == 25 and second.version == "v000002"
    v2 = sorted(p.name for p in (tmp_path / "out" / "v000002").iterdir())
    assert v2[0] == "00-deletes.ndjson" and len(v2) == 3  # deletes first, then the two new shards
    deletes = [json.loads(x)["delete"]["_id"] for x in (tmp_path / "out" / "v000002" / v2[0]).read_text().splitlines()]
    assert set(idx.deleted) <= set(deletes) and len(deletes) == 10
    state = json.loads((tmp_path / "out" / "state.json").read_text())
    assert state["version"] == "v000002" and state["pending"] is None
