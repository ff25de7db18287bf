"""Late chunking, naive chunking and multi-vector outputs through `embindex build` from the loopback
S3 server, and search over them (document-level hits, MaxSim)."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

import embindex
from conftest import FIXTURES, job_config, sample_docs
from embindex.index.multivector import maxsim_scores
from embindex.models import ModelSpec, load_family
from embindex.text.chunking import ChunkSpec, chunk_spans, token_spans

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


def _put_corpus(client, bucket, docs, key="corpus/docs.jsonl"):
    client.put_object(Bucket=bucket, Key=key, Body="".join(json.dumps(d) + "\n" for d in docs).encode())
    return f"s3://{bucket}/{key}"


def test_late_chunking_from_s3(ray_cluster, s3_bucket, tmp_path, minilm_path):
    bucket, opts, client = s3_bucket
    docs = sample_docs(40)
    uri = _put_corpus(client, bucket, docs + [{"id": "blank", "text": " "}])
    index_uri = f"s3://{bucket}/idx/late"
    cfg = job_config(uri, index_uri, source={"storage": opts}, index={"storage": opts},
                     outputs={"late_chunking": {"chunker": "sentences", "n_sentences": 2}})
    result = embindex.build(cfg, log=None)
    c = result.counts
    assert c["rows_in"] == 41 and c["documents"] == 40 and c["rejected"] == 1 and c["chunks"] > 40
    assert result.manifest.outputs["mode"] == "late"
    assert result.manifest.outputs["late_chunking"]["window"] == 128

    reader = embindex.open_index(index_uri, storage=opts)
    # every stored chunk vector equals the span mean of a whole-document forward pass (fp16 storage)
    fam = load_family(ModelSpec(name="hf-encoder", path=minilm_path, dtype="float32", max_length=128))
    tok, enc = fam.load_tokenizer(), fam.load_encoder("cpu")
    by_id = {d["id"]: d["text"] for d in docs}
    rows = {}
    for i, (doc_id, ch) in enumerate(zip(reader.ids, reader._chunks)):
        rows.setdefault(doc_id, []).append((ch["index"], ch["start"], ch["end"], reader.vectors[i]))
    checked = 0
    for doc_id in list(by_id)[:12]:
        text = by_id[doc_id]
        t = tok.encode_with_offsets(text, "document", truncate=False)
        if len(t.ids) > 128:
            continue  # windowed documents are covered by test_chunking
        chars = chunk_spans(text, ChunkSpec("sentences", n_sentences=2))
        spans = token_spans(t.offsets, chars)
        ids = torch.from_numpy(t.ids.astype(np.int64))[None]
        states = enc.forward_token_states(ids, torch.ones_like(ids))[0].float()
        stored = sorted(rows[doc_id], key=lambda r: r[0])
        assert [(s, e) for _, s, e, _ in stored] == chars
        for (_, _, _, vec), (s, e) in zip(stored, spans):
            ref = states[s:e].mean(0)
            assert float(np.dot(vec, (ref / ref.norm()).numpy())) > 0.9995
        checked += 1
    assert checked >= 5

    # document-level hits with the best chunk's offsets
    target = docs[7]
    hits = reader.search(target["text"][:200], k=5)[0]
    assert len({h.id for h in hits}) == len(hits)
    assert hits[0].id == target["id"] and hits[0].chunk["index"] == 0 and hits[0].chunk["start"] == 0


def test_naive_chunking_rows_and_offsets(ray_cluster, tmp_path):
    docs = sample_docs(25)
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps(d) + "\n" for d in docs))
    cfg = job_config(str(corpus), str(tmp_path / "idx"),
                     outputs={"chunking": {"chunker": "tokens", "chunk_size": 48, "overlap": 8}})
    result = embindex.build(cfg, log=None)
    assert result.counts["documents"] == 25 and result.counts["chunks"] > 25
    table = pq.read_table(tmp_path / "idx" / result.manifest.shards[0].path)
    by_id = {d["id"]: d["text"] for d in docs}
    for doc_id, s, e in zip(*(table.column(n).to_pylist() for n in ("id", "start", "end"))):
        assert 0 <= s < e <= len(by_id[doc_id])
    reader = embindex.open_index(str(tmp_path / "idx"))
    probe = docs[3]
    hit = reader.search(probe["text"][:150], k=3)[0][0]
    assert hit.id == probe["id"] and hit.chunk["start"] == 0


def test_chunked_search_returns_k_documents_even_when_one_document_dominates(ray_cluster, tmp_path):
    docs = [{"id": "a", "text": " ".join(f"The cat sat on the mat number {i}." for i in range(120))},
            {"id": "b", "text": "A dog slept on the rug. It was warm."},
            {"id": "c", "text": "Stock markets fell sharply on Monday."}]
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps(d) + "\n" for d in docs))
    cfg = job_config(str(corpus), str(tmp_path / "idx"), index={"tiers": ["full"]},
                     outputs={"chunking": {"chunker": "sentences", "n_sentences": 1}})
    embindex.build(cfg, log=None)
    hits = embindex.open_index(str(tmp_path / "idx")).search("a cat on a mat", k=3)[0]
    assert [h.id for h in hits][0] == "a" and sorted(h.id for h in hits) == ["a", "b", "c"]


def test_multivector_colbert_from_s3_and_maxsim(ray_cluster, s3_bucket):
    bucket, opts, client = s3_bucket
    docs = sample_docs(30)
    uri = _put_corpus(client, bucket, docs)
    model_dir = str(FIXTURES / "jina-colbert-v2-tiny")
    index_uri = f"s3://{bucket}/idx/mv"
    cfg = job_config(uri, index_uri, source={"storage": opts}, index={"storage": opts, "tiers": [16, "full"]},
                     model={"name": "jina-colbert-v2", "path": model_dir, "max_length": 256},
                     outputs={"multivector": {"candidates": "tokens", "token_k": 100_000}})
    result = embindex.build(cfg, log=None)
    mv = result.manifest.outputs["multivector"]
    assert result.counts["documents"] == 30
    assert mv["codec"] == "float16" and mv["bytes_per_token"] == 2 * mv["dim"] and mv["tokens"] > 30 * 10
    assert mv["token_index"]["vectors"] == mv["tokens"]

    reader = embindex.open_index(index_uri, storage=opts)
    stored = reader.token_vectors()
    assert sum(len(m) for m in stored) == mv["tokens"]
    # stored token vectors equal the model's (fp16), punctuation dropped
    fam = load_family(ModelSpec(name="jina-colbert-v2", path=model_dir, dtype="float32", max_length=256))
    emb = embindex.models.embedder.Embedder(fam)
    ref = emb.encode_tokens([d["text"] for d in docs], role="document")
    order = {d["id"]: i for i, d in enumerate(docs)}
    for row, doc_id in enumerate(reader.ids):
        r = ref[order[doc_id]]
        assert stored[row].shape == r.shape and np.abs(stored[row] - r).max() < 2e-3

    # MaxSim over candidates (token_k covers the corpus) equals brute-force MaxSim over every document
    queries = ["read a file", "abstract base class registration", docs[4]["text"][:80]]
    q_tokens = emb.encode_tokens(queries, role="query")
    results = reader.search(queries, k=10)
    for q, hits in zip(q_tokens, results):
        brute = maxsim_scores(q, stored)
        top = np.argsort(-brute, kind="stable")[:10]
        assert [h.id for h in hits] == [reader.ids[i] for i in top]
        np.testing.assert_allclose([h.score for h in hits], brute[top], rtol=1e-4)

    # the pooled-vector candidate path (no token index) ranks its candidates by MaxSim too
    cfg["outputs"] = {"multivector": {"candidates": "pooled"}}
    cfg["index"]["uri"] = f"s3://{bucket}/idx/mv-pooled"
    pooled = embindex.build(cfg, log=None)
    assert "token_index" not in pooled.manifest.outputs["multivector"]
    r2 = embindex.open_index(cfg["index"]["uri"], storage=opts)
    hits = r2.search(queries[:1], k=5, rescore=100)[0]  # shortlist of 500 covers the corpus
    brute = maxsim_scores(q_tokens[0], r2.token_vectors())
    assert [h.id for h in hits] == [r2.ids[i] for i in np.argsort(-brute, kind="stable")[:5]]


def test_output_model_mismatch_fails_early(ray_cluster, tmp_path):
    corpus = tmp_path / "c.jsonl"
    corpus.write_text(json.dumps({"id": "a", "text": "x"}) + "\n")
    colbert = {"name": "jina-colbert-v2", "path": str(FIXTURES / "jina-colbert-v2-tiny"), "max_length": None}
    with pytest.raises(ValueError, match="multi-vector: set outputs.multivector"):
        embindex.build(job_config(str(corpus), str(tmp_path / "i"), model=colbert), log=None)
    with pytest.raises(ValueError, match="no multi-vector output"):
        embindex.build(job_config(str(corpus), str(tmp_path / "i"), outputs={"multivector": True}), log=None)
    with pytest.raises(ValueError, match="window_overlap"):
        embindex.build(job_config(str(corpus), str(tmp_path / "i"),
                                  outputs={"late_chunking": {"window": 64, "window_overlap": 64}}), log=None)
