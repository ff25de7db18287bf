"""Rerank at search time and the offline retrieve job, end to end on real Ray, FAISS, Parquet and S3 (moto)."""

from __future__ import annotations

import importlib.util
import io
import json
import os
from pathlib import Path

import boto3
import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml
from typer.testing import CliRunner

import embindex
from conftest import FIXTURES, S3_KEY, S3_REGION, S3_SECRET, job_config, sample_docs
from embindex.cli import app
from embindex.models import load_reranker
from embindex.retrieve.job import retrieve
from embindex.retrieve.metrics import mean_metrics
from embindex.retrieve.trec import read_qrels

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]
V2 = str(FIXTURES / "jina-reranker-v2-tiny")
ROOT = Path(__file__).resolve().parents[1]
QRELS = read_qrels("builtin:sample-qrels")
QUERIES = {json.loads(line)["id"]: json.loads(line)["text"]
           for line in open(os.path.join(os.path.dirname(embindex.__file__), "data", "sample_queries.jsonl"))}


def _corpus() -> list[dict]:
    """Every judged document plus the first 120 others of the sample corpus."""
    judged = {d for j in QRELS.values() for d in j}
    docs = sample_docs()
    return [d for d in docs if d["id"] in judged] + [d for d in docs if d["id"] not in judged][:120]


def _client(s3_server):
    return boto3.client("s3", endpoint_url=s3_server["endpoint_url"], aws_access_key_id=S3_KEY,
                        aws_secret_access_key=S3_SECRET, region_name=S3_REGION)


@pytest.fixture(scope="module")
def s3_index(ray_cluster, s3_server):
    """A MiniLM index with stored content in s3://retrieve/index, its corpus in s3://retrieve/corpus."""
    client = _client(s3_server)
    client.create_bucket(Bucket="retrieve")
    docs = _corpus()
    body = "".join(json.dumps({"id": d["id"], "text": d["text"], "module": d["module"]}) + "\n" for d in docs)
    client.put_object(Bucket="retrieve", Key="corpus/docs.jsonl", Body=body.encode())
    opts = dict(s3_server)
    cfg = job_config("s3://retrieve/corpus/", "s3://retrieve/index", source={"storage": opts},
                     index={"storage": opts, "store_content": True})
    embindex.build(cfg)
    return {"uri": "s3://retrieve/index", "storage": opts, "client": client, "docs": {d["id"]: d for d in docs}}


def test_search_reranks_the_funnel_top_n(s3_index):
    reader = embindex.open_index(s3_index["uri"], storage=s3_index["storage"])
    query = QUERIES["q06"]
    plain = reader.search(query, k=20)[0]
    hits = reader.search(query, k=5, rerank={"path": V2}, rerank_depth=20)[0]
    reranker = load_reranker(None, V2, dtype="float32")
    want = reranker.score(query, [s3_index["docs"][h.id]["text"] for h in plain]).scores
    order = np.argsort(-want, kind="stable")[:5]
    assert [h.id for h in hits] == [plain[i].id for i in order]
    for h, i in zip(hits, order):
        assert h.rerank_score == pytest.approx(want[i], abs=1e-6) and h.score == h.rerank_score
        assert h.retrieval_score == pytest.approx(plain[i].score, abs=1e-6)
    assert set(hits[0].to_dict()) >= {"retrieval_score", "rerank_score", "rerank_reject"}

    result = CliRunner().invoke(app, ["search", s3_index["uri"], query, "-k", "3", "--rerank", V2,
                                      "--rerank-depth", "20", "--json"],
                                env={"AWS_ENDPOINT_URL": s3_index["storage"]["endpoint_url"],
                                     "AWS_ACCESS_KEY_ID": S3_KEY, "AWS_SECRET_ACCESS_KEY": S3_SECRET})
    assert result.exit_code == 0, result.output
    line = json.loads(result.output.strip().splitlines()[-1])
    assert [h["id"] for h in line["hits"]] == [h.id for h in hits[:3]]


def _put_queries(client) -> None:
    lines = [json.dumps({"id": q, "text": t}) for q, t in QUERIES.items()]
    lines += [json.dumps({"id": "empty", "text": "  "}), json.dumps({"text": "no id"}), "{not json",
              json.dumps({"id": "q01", "text": "a second q01"})]
    client.put_object(Bucket="retrieve", Key="queries/queries.jsonl", Body="\n".join(lines).encode())
    with open(os.path.join(os.path.dirname(embindex.__file__), "data", "sample_qrels.tsv"), "rb") as f:
        client.put_object(Bucket="retrieve", Key="qrels/test.tsv", Body=f.read())
    for name in os.listdir(V2):
        client.upload_file(os.path.join(V2, name), "retrieve", f"models/reranker/{name}")


def test_retrieve_job_from_s3_with_metrics(s3_index, tmp_path):
    client, opts = s3_index["client"], s3_index["storage"]
    _put_queries(client)
    cfg = {
        "index": {"uri": s3_index["uri"], "storage": opts},
        "queries": {"uri": "s3://retrieve/queries/", "storage": opts},
        "qrels": {"uri": "s3://retrieve/qrels/test.tsv", "storage": opts},
        "search": {"k": 100},
        "rerank": {"path": "s3://retrieve/models/reranker", "storage": opts, "cache_dir": str(tmp_path / "c"),
                   "dtype": "float32", "depth": 10},
        "output": "s3://retrieve/out/run1", "output_storage": opts,
    }
    result = retrieve(cfg)
    assert (result.queries, result.rejected) == (len(QUERIES) + 4, 4)
    stages = list(result.metrics)
    assert stages[:7] == ["tier 32", "tier 32 + rescore", "tier 64", "tier 64 + rescore", "tier 128",
                          "tier 128 + rescore", "tier 384 (full)"]
    assert stages[7].endswith("-> rerank reranker@10") and len(stages) == 8

    # the full tier's metrics equal those of the search API's rankings, scored independently
    reader = embindex.open_index(s3_index["uri"], storage=opts)
    ids = list(QUERIES)
    hits = reader.search([QUERIES[q] for q in ids], k=100, tier=384)
    expected = mean_metrics({q: [h.id for h in hs] for q, hs in zip(ids, hits)}, QRELS)
    assert result.metrics["tier 384 (full)"] == pytest.approx(expected, abs=1e-9)
    assert result.metrics["tier 384 (full)"]["Recall@100"] == 1.0  # every judged document is in the corpus

    def read(key: str) -> bytes:
        return client.get_object(Bucket="retrieve", Key=f"out/run1/{key}")["Body"].read()

    results = pq.read_table(io.BytesIO(read("results.parquet"))).to_pylist()
    rejects = [r["reject"] for r in results if r["rank"] is None]
    assert sorted(rejects) == sorted(
        ["bad_json: retrieve/queries/queries.jsonl line 35: Expecting property name enclosed in double quotes",
         "duplicate_id", "empty_query", "missing_id: no 'id'"])
    ranked = [r for r in results if r["rank"] is not None]
    assert len(ranked) == len(QUERIES) * min(100, len(s3_index["docs"]))

    # each query's top 10 are the reranker's order of its 10 best retrieved candidates
    reranker = load_reranker(None, V2, dtype="float32")
    for q in ("q02", "q17"):
        rows = sorted((r for r in ranked if r["query_id"] == q), key=lambda r: r["rank"])
        retrieved = sorted(rows, key=lambda r: -r["retrieval_score"])[:10]
        want = reranker.score(QUERIES[q], [s3_index["docs"][r["id"]]["text"] for r in retrieved]).scores
        assert [r["id"] for r in rows[:10]] == [retrieved[i]["id"] for i in np.argsort(-want, kind="stable")]
        np.testing.assert_allclose([r["rerank_score"] for r in rows[:10]], np.sort(want)[::-1], atol=1e-6)
        assert all(r["rerank_score"] is None for r in rows[10:])

    run = read("run.trec").decode().splitlines()
    assert len(run) == len(ranked)
    for q in QUERIES:
        scores = [float(line.split()[4]) for line in run if line.startswith(q + " ")]
        assert scores == sorted(scores, reverse=True)  # trec_eval orders by score
    assert json.loads(read("metrics.json"))["evaluated"] == len(QRELS)
    assert read("metrics.md").decode().startswith("| stage |")


def test_retrieve_joins_content_from_the_source_for_chunks(ray_cluster, tmp_path, monkeypatch):
    """A late-chunked index: candidates are chunk spans; from the source they equal the stored spans
    (reranked listwise by jina-reranker-v3 on the actor pool)."""
    docs = [d for d in sample_docs() if d["module"] in ("json", "gzip", "shutil")]
    corpus = tmp_path / "docs.jsonl"
    corpus.write_text("".join(json.dumps(d) + "\n" for d in docs))
    embindex.build(job_config(str(corpus), str(tmp_path / "ix"), index={"tiers": [32, "full"],
                                                                        "store_content": True},
                              outputs={"late_chunking": {"chunker": "sentences", "n_sentences": 2}}))
    reader = embindex.open_index(str(tmp_path / "ix"))
    hits = reader.search(QUERIES["q06"], k=5)[0]
    text = {d["id"]: d["text"] for d in docs}
    assert [c.text for c in reader.contents(hits)] == [text[h.id][h.chunk["start"]:h.chunk["end"]] for h in hits]
    assert any(len(c.text) < len(text[h.id]) for c, h in zip(reader.contents(hits), hits))  # real spans

    queries = tmp_path / "q.jsonl"
    queries.write_text(json.dumps({"id": "q06", "text": QUERIES["q06"]}) + "\n")
    logs: list[str] = []
    base = {"index": {"uri": str(tmp_path / "ix")}, "queries": {"uri": str(queries)}, "search": {"k": 5},
            "rerank": {"path": str(FIXTURES / "jina-reranker-v3-tiny"), "dtype": "float32", "depth": 5}}
    by_source = retrieve({**base, "content": "source", "output": str(tmp_path / "a")}, log=logs.append)
    # the same job through the Ray job entrypoint (what `ray job submit` runs), content from the index
    config = tmp_path / "retrieve.yaml"
    config.write_text(yaml.safe_dump({**base, "content": "index"}))
    monkeypatch.syspath_prepend(str(ROOT / "pipelines"))  # as `python pipelines/retrieve_index.py` has it
    entry = importlib.util.spec_from_file_location("retrieve_index", ROOT / "pipelines" / "retrieve_index.py")
    module = importlib.util.module_from_spec(entry)
    entry.loader.exec_module(module)
    assert module.main(["--config", str(config), "--set", f"output={tmp_path / 'b'}"]) == 0
    assert any("joined by id from the build's source" in m for m in logs)
    assert by_source.metrics == {}  # no qrels: no metrics
    assert not (tmp_path / "a" / "metrics.json").exists()
    a = pq.read_table(tmp_path / "a" / "results.parquet").to_pylist()
    b = pq.read_table(tmp_path / "b" / "results.parquet").to_pylist()
    assert [(r["id"], r["chunk"]) for r in a] == [(r["id"], r["chunk"]) for r in b]
    assert len(a) == 5 and all(r["rerank_score"] is not None and r["chunk"] is not None for r in a)
    np.testing.assert_allclose([r["rerank_score"] for r in a], [r["rerank_score"] for r in b], atol=1e-6)


def test_m0_reranks_image_hits_from_their_stored_images(ray_cluster, tmp_path):
    from test_multimodal_e2e import make_images

    from embindex.models import RerankDoc

    folder = tmp_path / "mixed"
    folder.mkdir()
    images = make_images(4, seed=3)
    for i, img in enumerate(images):
        (folder / f"{i}.png").write_bytes(img)
    for d in sample_docs(3):
        (folder / f"{d['id']}.txt").write_text(d["text"])
    cfg = job_config(str(folder), str(tmp_path / "ix"), index={"tiers": [8, "full"], "store_content": True},
                     model={"name": "jina-clip-v2", "path": str(FIXTURES / "jina-clip-v2-tiny")})
    embindex.build(cfg)
    reader = embindex.open_index(str(tmp_path / "ix"))
    m0 = {"path": str(FIXTURES / "jina-reranker-m0-tiny"), "dtype": "float32"}
    reranker = load_reranker(None, m0["path"], dtype="float32")
    for hits, query in ((reader.search("a red square", k=7, rerank=m0, rerank_depth=7)[0], "a red square"),
                        (reader.search_images(images[1], k=7, rerank=m0, rerank_depth=7)[0],
                         RerankDoc(image=images[1]))):
        assert {h.modality for h in hits} == {"text", "image"} and len(hits) == 7
        stored = [RerankDoc(image=(folder / h.id).read_bytes()) if h.modality == "image"
                  else RerankDoc(text=(folder / h.id).read_text()) for h in hits]
        want = reranker.score(query, stored).scores
        np.testing.assert_allclose([h.rerank_score for h in hits], want, atol=1e-5)
        assert [h.rerank_score for h in hits] == sorted((h.rerank_score for h in hits), reverse=True)
