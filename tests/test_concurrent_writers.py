"""Several writers on one index URI (real Ray, the loopback S3 server, local disk): full builds rebase,
reindex and compact refuse to publish over a version they did not start from, a published run id is
never reused, and garbage collection leaves an open reader working."""

from __future__ import annotations

import json

import pytest

import embindex
from conftest import job_config, sample_docs
from embindex.incremental.compact import compact
from embindex.index.gc import published_chain
from embindex.index.publish import IndexChangedError, list_versions, read_manifest
from embindex.reindex import reindex
from embindex.storage import Storage, StorageOptions

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


def _put(client, bucket, key, docs):
    client.put_object(Bucket=bucket, Key=key, Body="".join(json.dumps(d) + "\n" for d in docs).encode())


class During:
    """A log callback that runs `action` once, the first time a message contains `trigger`: a way to
    make another writer publish at a chosen point of a run."""

    def __init__(self, trigger: str, action):
        self.trigger, self.action, self.fired = trigger, action, False

    def __call__(self, msg: str) -> None:
        if not self.fired and self.trigger in msg:
            self.fired = True
            self.action()


def test_builds_reindex_and_compact_racing_on_s3(ray_cluster, s3_bucket):
    bucket, opts, client = s3_bucket
    docs = sample_docs(90)
    _put(client, bucket, "a/docs.jsonl", docs[:40])
    _put(client, bucket, "b/docs.jsonl", docs[40:90])
    uri = f"s3://{bucket}/index"
    cfg_a = job_config(f"s3://{bucket}/a/", uri, source={"storage": opts}, index={"storage": opts})
    cfg_b = job_config(f"s3://{bucket}/b/", uri, source={"storage": opts}, index={"storage": opts})
    store = Storage(uri, StorageOptions.from_dict(opts))
    v1 = embindex.build(cfg_a, log=None)

    # a reindex computes its delta against v1; a full build publishes v2 meanwhile: the reindex stops
    _put(client, bucket, "a/docs.jsonl", docs[:45])
    results = {}
    hook = During("delta against", lambda: results.setdefault("b", embindex.build(cfg_b, log=None)))
    with pytest.raises(IndexChangedError, match="index changed under this run.*v000001.*v000002"):
        reindex(cfg_a, log=hook)
    assert hook.fired and results["b"].version == "v000002"

    # a full build starts on v2; a compact of v2 publishes v3 meanwhile: the build rebases onto v3
    messages: list[str] = []

    def log(msg: str) -> None:
        messages.append(msg)
        compact_hook(msg)

    compact_hook = During("reading", lambda: results.setdefault(
        "compact", compact(uri, storage=opts, force=True)))
    v4 = embindex.build(cfg_a, log=log)
    assert results["compact"].version == "v000003" and results["compact"].parent == "v000002"
    assert v4.version == "v000004" and v4.manifest.parent == "v000003"
    assert any("moved from v000002 to v000003" in m for m in messages)

    # a compact that started on v4 loses to a build published meanwhile
    base = read_manifest(store)
    cfg_b_again = dict(cfg_b, run={"id": "late-build"})
    original_read = Storage.read_text

    def read_then_build(self, rel):  # the compact reads its base's tombstones, then v5 appears
        text = original_read(self, rel)
        if rel.endswith("versions/v000004/manifest.json") and "v5" not in results:
            results["v5"] = None
            results["v5"] = embindex.build(cfg_b_again, log=None)
        return text

    Storage.read_text = read_then_build
    try:
        with pytest.raises(IndexChangedError, match="v000004.*v000005"):
            compact(uri, storage=opts, force=True)
    finally:
        Storage.read_text = original_read
    assert results["v5"].version == "v000005"

    # every published manifest is intact and in one line from _latest; no claim was left behind
    chain = published_chain(store)
    assert [m.version for m in chain] == ["v000005", "v000004", "v000003", "v000002", "v000001"]
    assert [m.parent for m in chain] == ["v000004", "v000003", "v000002", "v000001", None]
    assert list_versions(store) == sorted(m.version for m in chain)
    assert read_manifest(store, "v000001") == v1.manifest and read_manifest(store, "v000004") == base
    reader = embindex.open_index(uri, storage=opts)
    assert sorted(reader.ids) == sorted(d["id"] for d in docs[40:90])
    old = embindex.open_index(uri, version="v000001", storage=opts)
    hits = old.search([d["text"] for d in docs[:3]], k=1)
    assert [h[0].id for h in hits] == [d["id"] for d in docs[:3]]


def test_a_published_run_id_is_never_reused(ray_cluster, tmp_path):
    docs = sample_docs(60)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "a" / "d.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs[:30]))
    (tmp_path / "b" / "d.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs[30:]))
    uri = str(tmp_path / "idx")
    first = embindex.build(job_config(str(tmp_path / "a"), uri, run={"id": "nightly"}), log=None)
    tier_file = tmp_path / "idx" / first.manifest.tiers[0].files[0]
    before = tier_file.read_bytes()
    with pytest.raises(ValueError, match="run nightly already published v000001"):
        embindex.build(job_config(str(tmp_path / "b"), uri, run={"id": "nightly"}), log=None)
    with pytest.raises(ValueError, match="run nightly already published"):
        reindex(job_config(str(tmp_path / "a"), uri, run={"id": "nightly"}), log=None)
    assert tier_file.read_bytes() == before  # nothing of v1 rewritten
    hits = embindex.open_index(uri).search([d["text"] for d in docs[:3]], k=1)
    assert [h[0].id for h in hits] == [d["id"] for d in docs[:3]]


def test_gc_leaves_an_open_reader_working(ray_cluster, tmp_path):
    docs = sample_docs(40)
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps(d) + "\n" for d in docs[:20]))
    uri = str(tmp_path / "idx")
    embindex.build(job_config(str(corpus), uri), log=None)
    reader = embindex.open_index(uri)  # opened on v1, nothing read yet
    corpus.write_text("".join(json.dumps(d) + "\n" for d in docs[20:]))
    embindex.build(job_config(str(corpus), uri, index={"keep_versions": 1}), log=None)  # default grace: 1 h
    assert list_versions(Storage(uri)) == ["v000001", "v000002"]
    hits = reader.search([d["text"] for d in docs[:3]], k=1)
    assert reader.version == "v000001" and [h[0].id for h in hits] == [d["id"] for d in docs[:3]]
    # once the grace period is over the old version and its files go
    embindex.build(job_config(str(corpus), uri, index={"keep_versions": 1, "gc_grace_seconds": 0}), log=None)
    assert list_versions(Storage(uri)) == ["v000003"]
    assert not (tmp_path / "idx" / reader.manifest.shards[0].path).exists()
