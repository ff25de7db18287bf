"""End to end on a real local Ray: each input format, bad rows, tiers, search, manifest, publish order."""

from __future__ import annotations

import gzip
import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import embindex
from conftest import job_config, sample_docs
from embindex.index import layout
from embindex.index.tiers import truncate
from embindex.models import ModelSpec, load_family
from embindex.models.embedder import Embedder
from embindex.sources.normalize import Reasons

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


def _write_jsonl(path, rows, compress=False):
    data = b"".join((r if isinstance(r, bytes) else json.dumps(r).encode()) + b"\n" for r in rows)
    path.write_bytes(gzip.compress(data) if compress else data)


def _check_index(index_uri: str, docs: list[dict], result, minilm_path: str):
    """Counts, manifest fields, tier math, rank-1 self retrieval on every tier."""
    m = result.manifest
    assert m.counts.documents == len(docs) == m.counts.vectors
    assert m.counts.rows_in == m.counts.documents + m.counts.rejected
    for key in ("version", "created_at", "model", "outputs", "dim", "tiers", "shards", "counts", "quality"):
        assert getattr(m, key) is not None
    assert m.model.checkpoint_hash.startswith("sha256:") and m.model.max_length == 128
    assert [t.dim for t in m.tiers] == [32, 64, 128, 384] and m.dim == 384
    assert all(t.factory == "Flat" and t.metric == "ip" for t in m.tiers)
    assert set(m.quality["tiers"]) == {"32", "64", "128", "384"}
    assert m.quality["tiers"]["384"]["recall@10"] == 1.0
    assert sum(s.rows for s in m.shards) == len(docs)

    reader = embindex.open_index(index_uri)
    # Stored vectors equal an in-process encoding of the same texts (fp16 storage).
    emb = Embedder(load_family(ModelSpec(name="hf-encoder", path=minilm_path, dtype="float32", max_length=128)))
    by_id = {d["id"]: d["text"] for d in docs}
    ref = emb.encode([by_id[i] for i in reader.ids])
    assert np.min(np.sum(ref * reader.vectors, axis=1)) > 0.9999

    # A tier-d vector is the first d dims of the full vector, renormalized.
    for t in m.tiers:
        index = reader.tier_index(t.dim)
        stored = index.reconstruct_n(0, index.ntotal)
        np.testing.assert_allclose(stored, truncate(reader.vectors, t.dim), atol=1e-6)

    # Each tier finds a document from its own text at rank 1, with and without rescoring.
    probe = docs[:: max(1, len(docs) // 8)][:8]
    for t in m.tiers:
        for rescore in (1, 10):
            hits = reader.search([d["text"] for d in probe], k=3, tier=t.dim, rescore=rescore)
            assert [h[0].id for h in hits] == [d["id"] for d in probe], (t.dim, rescore)
            assert all(h[0].score > 0.99 for h in hits)
    return reader


def test_jsonl_gz_with_metadata(ray_cluster, tmp_path, minilm_path):
    docs = sample_docs(150)
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    _write_jsonl(corpus / "a.jsonl.gz", docs[:100], compress=True)
    _write_jsonl(corpus / "b.jsonl", docs[100:])
    index_uri = str(tmp_path / "index")
    result = embindex.build(job_config(str(corpus), index_uri), log=None)
    assert result.counts["rejected"] == 0
    reader = _check_index(index_uri, docs, result, minilm_path)
    hit = reader.search(docs[3]["text"], k=1)[0][0]
    assert hit.meta == {"module": docs[3]["module"], "kind": docs[3]["kind"]}
    assert result.manifest.source["format"] == "jsonl" and result.manifest.source["files"] == 2
    assert result.manifest.model.dtype == "float32 (cpu)"  # what the actors ran, not the config's "auto"
    # start-up (job start until the first embed batch) is measured and published with the timings
    t = result.manifest.timings
    assert 0 < t["first_batch_s"] < t["read_s"] + t["pipeline_s"] <= t["total_s"]
    # and the embed actor's busy time on the fragments (one actor: at most the embed+write time)
    assert 0 < t["embed_busy_s"] <= t["pipeline_s"]
    assert "first batch at" in result.summary() and "embed actors busy" in result.summary()


def test_parquet_with_column_mapping_and_bad_rows(ray_cluster, tmp_path, minilm_path):
    docs = sample_docs(120)
    good = {"doc_id": [d["id"] for d in docs], "body": [d["text"].encode() for d in docs],
            "module": [d["module"] for d in docs]}
    bad = {
        "doc_id": [None, "", "dup", "dup", "empty", "big", "bad-utf8"],
        "body": [b"no id", b"empty id", b"first", b"second", b"   ", b"x" * 5000, b"\xff\xfe\xfd"],
        "module": ["m"] * 7,
    }
    schema = pa.schema([("doc_id", pa.string()), ("body", pa.binary()), ("module", pa.string())])
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    pq.write_table(pa.table(good, schema=schema), corpus / "part-0.parquet")
    pq.write_table(pa.table(bad, schema=schema), corpus / "part-1.parquet")
    index_uri = str(tmp_path / "index")
    cfg = job_config(str(corpus), index_uri,
                     source={"id_column": "doc_id", "text_column": "body", "max_text_bytes": 4000})
    result = embindex.build(cfg, log=None)
    docs_std = [{"id": d["id"], "text": d["text"]} for d in docs]
    _check_index(index_uri, docs_std, result, minilm_path)
    assert result.counts == {"rows_in": 127, "documents": 120, "chunks": 120, "vectors": 120, "rejected": 7}
    rejects = pa.concat_tables([pq.read_table(os.path.join(index_uri, r.path)) for r in result.manifest.rejects])
    got = sorted(zip(rejects.column("id").to_pylist(), rejects.column("reject").to_pylist()),
                 key=lambda x: (x[0] or "", x[1]))
    assert got == sorted([(None, Reasons.MISSING_ID), ("", Reasons.EMPTY_ID), ("dup", Reasons.DUPLICATE_ID),
                          ("dup", Reasons.DUPLICATE_ID), ("empty", Reasons.EMPTY_TEXT),
                          ("big", Reasons.TEXT_TOO_LARGE), ("bad-utf8", Reasons.INVALID_UTF8)],
                         key=lambda x: (x[0] or "", x[1]))
    assert all(rejects.column("reject_detail").to_pylist())
    reasons = {}
    for r in result.manifest.rejects:
        for k, n in r.reasons.items():
            reasons[k] = reasons.get(k, 0) + n
    assert reasons == {"missing_id": 1, "empty_id": 1, "duplicate_id": 2, "empty_text": 1, "text_too_large": 1,
                       "invalid_utf8": 1}


def test_text_folder_ids_are_relative_paths(ray_cluster, tmp_path, minilm_path):
    docs = sample_docs(40)
    corpus = tmp_path / "corpus"
    out = []
    for i, d in enumerate(docs):
        rel = f"{d['module'].replace('.', '/')}/{i:03d}.txt"
        p = corpus / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(d["text"], encoding="utf-8")
        out.append({"id": rel, "text": d["text"]})
    (corpus / "broken.txt").write_bytes(b"caf\xe9 latin-1")
    (corpus / "blank.md").write_text("\n\n")
    index_uri = str(tmp_path / "index")
    result = embindex.build(job_config(str(corpus), index_uri), log=None)
    assert result.counts["rows_in"] == 42 and result.counts["rejected"] == 2
    _check_index(index_uri, out, result, minilm_path)
    reasons = {k for r in result.manifest.rejects for k in r.reasons}
    assert reasons == {Reasons.INVALID_UTF8, Reasons.EMPTY_TEXT}


def test_jsonl_bad_rows_and_versions(ray_cluster, tmp_path):
    corpus = tmp_path / "c.jsonl"
    rows = [{"id": f"d{i}", "text": f"document number {i} about files"} for i in range(20)]
    rows += [
        {"text": "no id"}, {"id": 5, "text": "int id"}, {"id": "e", "text": ""}, {"id": "n", "text": None},
        {"id": "l", "text": ["a", "list"]}, b"{broken json", b'{"id": "u", "text": "\xc3\x28"}', b"42",
        {"id": "d1", "text": "duplicate of d1"},
    ]
    _write_jsonl(corpus, rows)
    index_uri = str(tmp_path / "index")
    first = embindex.build(job_config(str(corpus), index_uri), log=None)
    # d1 appears twice: both occurrences are rejected
    assert first.counts == {"rows_in": 29, "documents": 19, "chunks": 19, "vectors": 19, "rejected": 10}
    assert first.version == "v000001" and first.manifest.parent is None
    second = embindex.build(job_config(str(corpus), index_uri), log=None)
    assert second.version == "v000002" and second.manifest.parent == "v000001"
    assert (tmp_path / "index" / layout.LATEST).read_text().strip() == "v000002"
    # the old version stays readable
    old = embindex.open_index(index_uri, version="v000001")
    assert len(old.ids) == 19
    # _latest is written after every file of the version it points to
    latest_mtime = os.path.getmtime(tmp_path / "index" / layout.LATEST)
    for root, _, names in os.walk(tmp_path / "index"):
        for n in names:
            if n != layout.LATEST:
                assert os.path.getmtime(os.path.join(root, n)) <= latest_mtime


def test_two_actors_share_the_work(ray_cluster, tmp_path):
    docs = sample_docs(200)
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(4):
        _write_jsonl(corpus / f"{i}.jsonl", docs[i * 50:(i + 1) * 50])
    cfg = job_config(str(corpus), str(tmp_path / "index"),
                     resources={"actors": 2, "cpus_per_actor": 1})
    result = embindex.build(cfg, log=None)
    assert result.counts["documents"] == 200
    assert len(result.manifest.shards) == 4 and {s.rows for s in result.manifest.shards} == {50}
    reader = embindex.open_index(str(tmp_path / "index"))
    assert sorted(reader.ids) == sorted(d["id"] for d in docs)


def test_errors_before_any_work(ray_cluster, tmp_path):
    corpus = tmp_path / "c.jsonl"
    _write_jsonl(corpus, [{"id": "a", "text": "x"}])
    with pytest.raises(ValueError, match="wider than the model"):
        embindex.build(job_config(str(corpus), str(tmp_path / "i"), index={"tiers": [512]}), log=None)
    with pytest.raises(FileNotFoundError):
        embindex.build(job_config(str(tmp_path / "missing"), str(tmp_path / "i")), log=None)
    with pytest.raises(FileNotFoundError, match="model path"):
        embindex.build(job_config(str(corpus), str(tmp_path / "i"), model={"path": str(tmp_path / "nomodel")}),
                       log=None)
    assert not (tmp_path / "i" / layout.LATEST).exists()
