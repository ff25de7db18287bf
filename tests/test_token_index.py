"""The multi-vector token index built out of core: filled per shard in Ray tasks, merged one partial at
a time, with the same candidates as one in-memory IDMap2(Flat) over every token vector."""

from __future__ import annotations

import json
import os
import tracemalloc

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import embindex
from conftest import FIXTURES, job_config, sample_docs
from embindex.index import layout, multivector, tiers
from embindex.index.multivector import (build_token_index, fill_token_shards, open_token_index,
                                        token_candidates)
from embindex.storage import Storage

pytestmark = [pytest.mark.timeout(600)]


def reference_index(mats: list[np.ndarray], dim: int) -> faiss.Index:
    """What the token index always was: every token vector in one IDMap2(FlatIP), id = row ordinal."""
    index = faiss.IndexIDMap2(faiss.IndexFlatIP(dim))
    ids = np.repeat(np.arange(len(mats), dtype=np.int64), [len(m) for m in mats])
    index.add_with_ids(np.ascontiguousarray(np.concatenate(mats), dtype=np.float32), ids)
    return index


def write_shards(store: Storage, n_shards: int, rows: int, dim: int, seed: int = 0) -> tuple[list[str], list]:
    """Parquet shards with a token_vectors column (list<fixed_size_list<float16>[dim]>), 0..40 tokens a row."""
    rng = np.random.default_rng(seed)
    paths, mats = [], []
    for s in range(n_shards):
        shard = [rng.standard_normal((int(rng.integers(0, 41)), dim)).astype(np.float16) for _ in range(rows)]
        inner = pa.FixedSizeListArray.from_arrays(pa.array(np.concatenate(shard).reshape(-1), pa.float16()), dim)
        offsets = pa.array(np.concatenate([[0], np.cumsum([len(m) for m in shard])]).astype(np.int32))
        col = pa.ListArray.from_arrays(offsets, inner)
        rel = f"shards/r/part-{s:03d}.parquet"
        os.makedirs(os.path.dirname(store.fs_path(rel)), exist_ok=True)
        pq.write_table(pa.table({"id": [f"s{s}r{i}" for i in range(rows)], "token_vectors": col}),
                       store.fs_path(rel), row_group_size=max(1, rows // 3))
        paths.append(rel)
        mats += [m.astype(np.float32) for m in shard]
    return paths, mats


def queries(mats: list[np.ndarray], n: int = 12, seed: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    stored = np.concatenate(mats)
    return np.concatenate([stored[rng.integers(0, len(stored), n)],
                           rng.standard_normal((n, stored.shape[1]))]).astype(np.float32)


def refuse_on_the_driver(monkeypatch, module, *names):
    """Patch `names` in this process to raise: Ray tasks import their own, unpatched copy."""
    def refuse(*a, **k):
        raise AssertionError("ran on the driver")
    for name in names:
        monkeypatch.setattr(module, name, refuse)


def test_flat_token_index_is_byte_identical_and_built_in_tasks(ray_cluster, tmp_path, monkeypatch):
    store = Storage(str(tmp_path / "idx"))
    paths, mats = write_shards(store, 4, rows=7, dim=8)
    refuse_on_the_driver(monkeypatch, multivector, "write_flat_idmap")  # the merge is a task too
    entry = build_token_index(store, paths, 8, "r")
    rel = entry["file"]
    ref = reference_index(mats, 8)
    assert rel == layout.token_index_path("r") and entry["vectors"] == ref.ntotal
    assert entry["factory"] == "IDMap2,Flat" and entry["files"] == [rel]
    assert store.read_bytes(rel) == tiers.serialize(ref)  # what search/reader.py has always read
    got = open_token_index(store, entry)
    q = queries(mats)
    for k in (1, 5, 50):
        np.testing.assert_array_equal(token_candidates(got, q, k), token_candidates(ref, q, k))
    assert store.listdir("shards/r/tokens") == []  # partial indexes removed after the merge

    # each shard was read and filled by a Ray task, not by this process
    results = fill_token_shards(store, paths, faiss.IndexFlatIP(8), "probe", wrap_ids=True)
    assert [r["rows"] for r in results] == [7] * 4 and all(r["pid"] != os.getpid() for r in results)


def test_driver_never_holds_every_token_vector(ray_cluster, tmp_path):
    """Python-tracked allocations of the driver (numpy arrays, bytes) peak at about one partial index,
    far below the corpus' token vectors (the in-memory build serializes all of them at once)."""
    store = Storage(str(tmp_path / "idx"))
    dim = 64
    paths, mats = write_shards(store, 8, rows=400, dim=dim, seed=3)
    total_bytes = sum(m.nbytes for m in mats)
    assert total_bytes > 10 << 20
    q = queries(mats)
    ref_ids = token_candidates(reference_index(mats, dim), q, 20)
    del mats
    tracemalloc.start()
    try:
        entry = build_token_index(store, paths, dim, "r")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < total_bytes / 3, (peak, total_bytes)
    np.testing.assert_array_equal(token_candidates(open_token_index(store, entry), q, 20), ref_ids)


def test_ivf_token_index_trained_on_a_sample(ray_cluster, tmp_path, monkeypatch):
    store = Storage(str(tmp_path / "idx"))
    refuse_on_the_driver(monkeypatch, multivector, "merge_ondisk")  # the merge maps every partial: a task
    paths, mats = write_shards(store, 3, rows=30, dim=16, seed=5)
    entry = build_token_index(store, paths, 16, "r", factory="IVF4,Flat", train_sample=300)
    rel = entry["file"]
    assert entry["vectors"] == sum(len(m) for m in mats) and entry["factory"] == "IVF4,Flat"
    assert entry["files"] == [rel, rel.replace(".faiss", ".ivfdata")] and entry["nprobe"] == 4
    index = open_token_index(store, entry)
    faiss.extract_index_ivf(index).nprobe = 4  # every list: exact
    q = queries(mats)
    ref = reference_index(mats, 16)
    np.testing.assert_array_equal(token_candidates(index, q, 10), token_candidates(ref, q, 10))
    assert store.listdir("shards/r/tokens") == []


def test_token_sample_is_uniform_and_drawn_by_shard_tasks(ray_cluster, tmp_path, monkeypatch):
    """The IVF training sample: exactly min(capacity, tokens) distinct stored token vectors, each shard
    contributing its share, read by tasks (the driver opens no shard)."""
    store = Storage(str(tmp_path / "idx"))
    paths, mats = write_shards(store, 3, rows=30, dim=16, seed=7)
    stored = np.concatenate(mats).astype(np.float32)
    per_shard = [len(np.concatenate(mats[i * 30:(i + 1) * 30])) for i in range(3)]

    def refuse(*a, **k):
        raise AssertionError("the driver read a shard")

    monkeypatch.setattr(multivector, "read_table", refuse)  # tasks import their own copy of the module
    monkeypatch.setattr(pq, "ParquetFile", refuse)
    sample = multivector.sample_tokens(store, paths, 500, 16, seed=1)
    monkeypatch.undo()
    assert sample.shape == (500, 16)
    row_of = {v.tobytes(): i for i, v in enumerate(stored)}
    picked = [row_of[v.tobytes()] for v in sample]  # every sampled vector is a stored one, none twice
    assert len(set(picked)) == 500
    assert np.array_equal(multivector.sample_tokens(store, paths, 10**6, 16), stored)  # all, in order
    # each shard's share follows its token count (hypergeometric mean; sd ~8 tokens here)
    bounds = np.cumsum([0] + per_shard)
    got = np.histogram(picked, bins=bounds)[0]
    expected = 500 * np.asarray(per_shard) / sum(per_shard)
    assert np.all(np.abs(got - expected) < 40), (got, expected)


def test_large_token_counts_go_to_an_ivf_index_on_disk(ray_cluster, tmp_path, monkeypatch):
    store = Storage(str(tmp_path / "idx"))
    paths, mats = write_shards(store, 3, rows=30, dim=16, seed=6)
    n = sum(len(m) for m in mats)
    assert multivector.shard_footer_counts(store, paths, 16) == ([30] * 3, [len(np.concatenate(mats[i * 30:(i + 1) * 30]))
                                                                      for i in range(3)])  # from the footers
    assert build_token_index(store, paths, 16, "small")["factory"] == "IDMap2,Flat"
    monkeypatch.setattr(multivector, "TOKEN_FLAT_MAX", n - 1)
    entry = build_token_index(store, paths, 16, "large")
    assert entry["factory"].startswith("IVF") and entry["factory"].endswith(",Flat") and len(entry["files"]) == 2
    index = open_token_index(store, entry)
    assert index.ntotal == n and all(store.exists(f) for f in entry["files"])


@pytest.mark.slow
def test_colbert_index_same_candidates_as_in_memory_build(ray_cluster, tmp_path):
    docs = sample_docs(24)
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps(d) + "\n" for d in docs))
    index_uri = str(tmp_path / "mv")
    cfg = job_config(str(corpus), index_uri, index={"tiers": [16, "full"], "quality_sample": 10},
                     source={"fragment_bytes": corpus.stat().st_size // 3},
                     model={"name": "jina-colbert-v2", "path": str(FIXTURES / "jina-colbert-v2-tiny"),
                            "max_length": 256},
                     outputs={"multivector": {"candidates": "tokens", "token_k": 50}})
    result = embindex.build(cfg, log=None)
    mv = result.manifest.outputs["multivector"]
    assert len(result.manifest.shards) >= 3
    reader = embindex.open_index(index_uri)
    stored = reader.token_vectors()
    ref = reference_index(stored, int(mv["dim"]))
    store = Storage(index_uri)
    assert store.read_bytes(mv["token_index"]["file"]) == tiers.serialize(ref)
    q = queries(stored)
    got = open_token_index(store, mv["token_index"])
    np.testing.assert_array_equal(token_candidates(got, q, 50), token_candidates(ref, q, 50))
    hits = reader.search([docs[3]["text"][:60]], k=3)[0]
    assert hits[0].id == docs[3]["id"]


@pytest.mark.slow
def test_colbert_index_with_an_ivf_token_index_searches_from_disk(ray_cluster, tmp_path, monkeypatch):
    monkeypatch.setattr(multivector, "TOKEN_FLAT_MAX", 10)  # any real corpus is "large": IVF lists on disk
    docs = sample_docs(24)
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps(d) + "\n" for d in docs))
    cfg = job_config(str(corpus), str(tmp_path / "mv"), index={"tiers": [16, "full"], "quality_sample": 10},
                     model={"name": "jina-colbert-v2", "path": str(FIXTURES / "jina-colbert-v2-tiny"),
                            "max_length": 256},
                     outputs={"multivector": {"candidates": "tokens", "token_k": 400}})
    entry = embindex.build(cfg, log=None).manifest.outputs["multivector"]["token_index"]
    assert entry["factory"].startswith("IVF") and entry["files"][1].endswith(".ivfdata") and entry["nprobe"] >= 1
    reader = embindex.open_index(str(tmp_path / "mv"))
    assert faiss.extract_index_ivf(reader.token_index()).nprobe == entry["nprobe"]
    hits = reader.search([d["text"][:60] for d in docs[3:6]], k=3)
    assert [h[0].id for h in hits] == [d["id"] for d in docs[3:6]]
