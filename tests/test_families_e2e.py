"""Jina families through `embindex build` and search: stored document vectors and encoded queries
equal the reference goldens of the fixtures (document role/task at build, query role/task at search)."""

from __future__ import annotations

import json

import numpy as np
import pytest

import embindex
from conftest import FIXTURES, job_config

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

CASES = [
    # family, fixture, build task, expected query task, golden key of documents, golden key of queries
    ("jina-embeddings-v3", "jina-embeddings-v3-tiny", "retrieval.passage", "retrieval.query",
     "retrieval.passage", "retrieval.query"),
    ("jina-code-embeddings", "jina-code-embeddings-tiny", "nl2code", "nl2code",
     "nl2code.passage", "nl2code.query"),
]


def _golden(entry) -> np.ndarray:
    return np.asarray(entry["values"], dtype=np.float32).reshape(entry["shape"])


@pytest.mark.parametrize("family,fixture,task,query_task,doc_key,query_key", CASES)
def test_family_builds_and_searches_with_roles(ray_cluster, tmp_path, family, fixture, task, query_task,
                                                doc_key, query_key):
    inputs = json.loads((FIXTURES / fixture / "inputs.json").read_text())
    golden = json.loads((FIXTURES / fixture / "golden.json").read_text())
    texts = inputs["texts"]
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps({"id": f"t{i}", "text": t}) + "\n" for i, t in enumerate(texts)))
    index_uri = str(tmp_path / "index")
    cfg = job_config(str(corpus), index_uri, model={"name": family, "path": str(FIXTURES / fixture),
                                                   "task": task, "max_length": None},
                     index={"tiers": [16, "full"]})
    result = embindex.build(cfg, log=None)
    m = result.manifest
    assert result.counts["documents"] == len(texts) and m.dim == 64
    assert m.model.task == task and m.model.query_task == query_task

    reader = embindex.open_index(index_uri)
    order = [int(i[1:]) for i in reader.ids]
    docs_ref = _golden(golden["tasks"][doc_key]["embeddings"]["64"])[order]
    stored = reader.vectors
    assert stored.shape == docs_ref.shape
    assert np.min(np.sum(stored * docs_ref, axis=1)) > 0.9999  # fp16 storage

    queries = reader.encode_queries(texts)
    q_ref = _golden(golden["tasks"][query_key]["embeddings"]["64"])
    np.testing.assert_allclose(queries, q_ref, atol=1e-5)

    # search ranks by the full-width inner product of query and document vectors
    hits = reader.search(texts[:2], k=3, tier=16)
    exact = q_ref[:2] @ docs_ref.T
    for row, h in zip(exact, hits):
        assert h[0].id == reader.ids[int(np.argmax(row))]
        assert abs(h[0].score - float(row.max())) < 2e-3


def test_jina_v2_builds_and_finds_its_documents(ray_cluster, tmp_path):
    """JinaBERT (no fixture: the tiny checkpoint its model tests generate) through `embindex build`."""
    from test_model_jina_v2 import TEXTS, make_checkpoint

    from embindex.models import ModelSpec, load_family
    from embindex.models.embedder import Embedder

    ckpt = make_checkpoint(tmp_path / "v2")
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps({"id": f"t{i}", "text": t}) + "\n" for i, t in enumerate(TEXTS)))
    cfg = job_config(str(corpus), str(tmp_path / "index"),
                     model={"name": "jina-embeddings-v2", "path": ckpt, "max_length": None},
                     index={"tiers": [16, "full"]})
    result = embindex.build(cfg, log=None)
    assert result.counts["documents"] == len(TEXTS) and result.manifest.dim == 48
    reader = embindex.open_index(str(tmp_path / "index"))
    ref = Embedder(load_family(ModelSpec(name="jina-embeddings-v2", path=ckpt, dtype="float32"))).encode(
        [TEXTS[int(i[1:])] for i in reader.ids])
    assert np.min(np.sum(ref * reader.vectors, axis=1)) > 0.9999
    hits = reader.search(TEXTS[:3], k=1, rescore=1, tier=48)
    assert [h[0].id for h in hits] == ["t0", "t1", "t2"]


def test_v3_late_chunking_through_build(ray_cluster, tmp_path):
    """Late chunking with the v3 passage adapter and instruction: each stored chunk vector equals the mean of
    the whole-document token states over the chunk's span."""
    import torch

    from embindex.models import ModelSpec, load_family
    from embindex.text.chunking import ChunkSpec, chunk_spans, token_spans

    path = str(FIXTURES / "jina-embeddings-v3-tiny")
    texts = json.loads((FIXTURES / "jina-embeddings-v3-tiny" / "inputs.json").read_text())["texts"]
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps({"id": f"t{i}", "text": t}) + "\n" for i, t in enumerate(texts)))
    cfg = job_config(str(corpus), str(tmp_path / "index"),
                     model={"name": "jina-embeddings-v3", "path": path, "task": "retrieval.passage",
                            "max_length": None},
                     outputs={"late_chunking": {"chunker": "sentences", "n_sentences": 1}},
                     index={"tiers": [16, "full"]})
    result = embindex.build(cfg, log=None)
    assert result.counts["documents"] == len(texts) and result.counts["chunks"] > len(texts)
    fam = load_family(ModelSpec(name="jina-embeddings-v3", path=path, dtype="float32", task="retrieval.passage"))
    tok, enc = fam.load_tokenizer(), fam.load_encoder("cpu")
    reader = embindex.open_index(str(tmp_path / "index"))
    long_id = max(range(len(texts)), key=lambda i: len(texts[i]))
    t = tok.encode_with_offsets(texts[long_id], "document", "retrieval.passage")
    chars = chunk_spans(texts[long_id], ChunkSpec("sentences", n_sentences=1))
    spans = token_spans(t.offsets, chars)
    ids = torch.from_numpy(t.ids.astype(np.int64))[None]
    states = enc.forward_token_states(ids, torch.ones_like(ids), "retrieval.passage")[0].float()
    rows = sorted((c["index"], v) for i, c, v in zip(reader.ids, reader._chunks, reader.vectors)
                  if i == f"t{long_id}")
    assert len(rows) == len(chars) > 1
    for (_, v), (s, e) in zip(rows, spans):
        ref = states[s:e].mean(0)
        assert float(np.dot(v, (ref / ref.norm()).numpy())) > 0.9995
