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
