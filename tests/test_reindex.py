"""Scheduled incremental re-indexing from the loopback S3 server: day 1 build, day 2 adds / edits /
deletes, day 3 nothing changed (embeds nothing); searches never return stale or deleted documents."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from typer.testing import CliRunner

import embindex
from conftest import job_config, sample_docs
from embindex.cli import app
from embindex.reindex import reindex

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


def _put(client, bucket, name, docs):
    client.put_object(Bucket=bucket, Key=f"corpus/{name}.jsonl",
                      Body="".join(json.dumps(d) + "\n" for d in docs).encode())


def test_three_days_of_incremental_reindex(ray_cluster, s3_bucket):
    bucket, opts, client = s3_bucket
    docs = sample_docs(160)
    day1 = {f"f{i}": docs[i * 40:(i + 1) * 40] for i in range(3)}  # 120 documents in 3 files
    day1["f2"] = day1["f2"] + [{"id": "broken", "text": ""}]
    for name, rows in day1.items():
        _put(client, bucket, name, rows)
    uri = f"s3://{bucket}/index"
    cfg = job_config(f"s3://{bucket}/corpus/", uri, source={"storage": opts}, index={"storage": opts})

    first = reindex(cfg, log=None)  # no version yet: a full build
    assert first.version == "v000001" and first.counts["documents"] == 120 and first.counts["rejected"] == 1

    # day 2: f0 untouched; f1: 5 edited, 5 deleted; f2 unchanged; f3 new with 40 added
    edited = [dict(d, text=d["text"] + "\n\nEdited on day two: now about sockets.") for d in day1["f1"][:5]]
    f1 = edited + day1["f1"][10:]
    deleted = {d["id"] for d in day1["f1"][5:10]}
    _put(client, bucket, "f1", f1)
    _put(client, bucket, "f3", docs[120:160])
    second = reindex(cfg, log=None)
    m = second.manifest
    assert second.version == "v000002" and m.parent == "v000001"
    assert m.delta == {"added": 40, "changed": 5, "deleted": 5, "unchanged": 110, "documents_embedded": 45,
                       "rejected_when_embedded": 0}
    assert second.counts == {"rows_in": 156, "documents": 155, "chunks": 155, "vectors": 155, "rejected": 1}
    assert m.fragments["total"] == 4 and m.fragments["embedded"] == 3  # f1, f2 (its reject), f3
    assert m.tombstones["rows"] == 10
    assert [s.path for s in m.shards[:3]] == [s.path for s in first.manifest.shards]  # old shards reused
    assert m.model.dtype == first.manifest.model.dtype == "float32 (cpu)"

    reader = embindex.open_index(uri, storage=opts)
    hits = reader.search([d["text"] for d in edited[:3]], k=5, tier=32)
    for d, h in zip(edited, hits):
        assert h[0].id == d["id"] and h[0].score > 0.99  # the edited text, not the stale vector
        assert len({x.id for x in h}) == len(h)
    # deleted documents and replaced rows are never returned
    everything = reader.search([d["text"] for d in day1["f1"][:10]], k=155, rescore=1)
    returned = {x.id for row in everything for x in row}
    assert not returned & deleted
    for row in everything:
        assert len(row) == len({x.id for x in row}) == 155
    live_ids = {i for j, i in enumerate(reader.ids) if j not in set(reader.tombstones.tolist())}
    assert live_ids == {d["id"] for d in docs} - deleted

    # day 3: nothing changed, nothing is embedded
    third = reindex(cfg, log=None)
    assert third.manifest.delta["documents_embedded"] == 0
    assert third.manifest.delta == {"added": 0, "changed": 0, "deleted": 0, "unchanged": 155,
                                    "documents_embedded": 0, "rejected_when_embedded": 0}
    assert third.counts["documents"] == 155 and third.manifest.tombstones["rows"] == 10

    # a full rebuild of the day-3 corpus serves the same documents with the same vectors
    full = embindex.build(dict(cfg, index={**cfg["index"], "uri": f"s3://{bucket}/full"}), log=None)
    fresh = embindex.open_index(f"s3://{bucket}/full", storage=opts)
    r3 = embindex.open_index(uri, storage=opts)
    dead = set(r3.tombstones.tolist())
    served = {i: v for j, (i, v) in enumerate(zip(r3.ids, r3.vectors)) if j not in dead}
    assert sorted(served) == sorted(fresh.ids) and full.counts["documents"] == 155
    for i, v in zip(fresh.ids, fresh.vectors):
        assert np.abs(served[i] - v).max() == 0.0

    out = CliRunner().invoke(app, ["inspect", uri], env={"AWS_ENDPOINT_URL": opts["endpoint_url"],
                                                         "AWS_ACCESS_KEY_ID": opts["key"],
                                                         "AWS_SECRET_ACCESS_KEY": opts["secret"]})
    assert out.exit_code == 0, out.output
    assert "v000002   parent v000001" in out.output and "+40 ~5 -5" in out.output


def test_compact_and_retention(ray_cluster, tmp_path):
    docs = sample_docs(60)
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps(d) + "\n" for d in docs))
    uri = str(tmp_path / "idx")
    cfg = job_config(str(corpus), uri)
    reindex(cfg, log=None)
    corpus.write_text("".join(json.dumps(d) + "\n" for d in docs[:30]))  # half deleted
    second = reindex(cfg, log=None)
    assert second.manifest.tombstones["rows"] == 30

    runner = CliRunner()
    out = runner.invoke(app, ["compact", uri, "--threshold", "0.9"])
    assert out.exit_code == 0 and "nothing to compact" in out.output
    out = runner.invoke(app, ["compact", uri])
    assert out.exit_code == 0, out.output
    reader = embindex.open_index(uri)
    m = reader.manifest
    assert m.version == "v000003" and m.parent == "v000002" and not m.tombstones
    assert sorted(reader.ids) == sorted(d["id"] for d in docs[:30]) and m.counts.documents == 30
    hits = reader.search([d["text"] for d in docs[:5]], k=1)
    assert [h[0].id for h in hits] == [d["id"] for d in docs[:5]]

    # retention: keep 1 version (no grace period); files only older versions used are gone, the latest
    # still searches
    third = reindex(dict(cfg, index={**cfg["index"], "keep_versions": 1, "gc_grace_seconds": 0}), log=None)
    assert [p.name for p in (tmp_path / "idx" / "versions").iterdir()] == [third.version]
    first_shards = [s.path for s in second.manifest.shards[:1]]
    assert not (tmp_path / "idx" / first_shards[0]).exists()
    fresh = embindex.open_index(uri)
    assert [h[0].id for h in fresh.search([docs[2]["text"]], k=1)] == [docs[2]["id"]]


def test_tiers_retrained_as_the_index_grows_and_a_changed_model_forces_a_full_rebuild(ray_cluster, tmp_path):
    """Tiers are extended, then retrained, as the index grows; then a reindex with another model setting
    rebuilds everything. (One test: both start from the same 20-document index, built once.)"""
    docs = sample_docs(60)
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps(d) + "\n" for d in docs[:20]))
    cfg = job_config(str(corpus), str(tmp_path / "idx"))
    assert reindex(cfg, log=None).manifest.trained_rows == 20
    corpus.write_text("".join(json.dumps(d) + "\n" for d in docs[:30]))  # 30 <= 2 x 20: extend the tiers
    grown = reindex(cfg, log=None).manifest
    assert grown.trained_rows == 20 and len(grown.tiers[0].files) == 1 and len(grown.tiers[0].deltas) == 1
    assert "carried_from" in grown.quality
    corpus.write_text("".join(json.dumps(d) + "\n" for d in docs))  # 60 > 2 x 20: retrain every tier
    retrained = reindex(cfg, log=None).manifest
    assert retrained.trained_rows == 60 and retrained.delta["added"] == 30
    assert len(retrained.tiers[0].files) == 1 and not retrained.tiers[0].deltas
    assert "carried_from" not in retrained.quality
    hits = embindex.open_index(str(tmp_path / "idx")).search([d["text"] for d in docs[40:43]], k=1)
    assert [h[0].id for h in hits] == [d["id"] for d in docs[40:43]]

    # a changed model (here its max_length) forces a full rebuild: no delta, every fragment embedded
    logs: list[str] = []
    again = reindex(dict(cfg, model={**cfg["model"], "max_length": 64}), log=logs.append)
    assert any("full rebuild" in line for line in logs)
    assert again.manifest.delta == {} and again.manifest.fragments["embedded"] == 1


@pytest.mark.parametrize("factory", ["IVF4,Flat", "HNSW8,Flat"])  # Flat: test_tiers_retrained_as_the_index_grows_...
def test_reindex_embeds_only_the_delta_for_every_tier_layout(ray_cluster, tmp_path, factory):
    """IVF tiers (inverted lists on disk) and HNSW: a reindex adds delta indexes built on the trained
    tiers and embeds only new and changed documents; at `max_tier_deltas` deltas the next reindex
    rebuilds the tiers from the stored vectors, still without embedding anything else."""
    docs = sample_docs(70)
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps(d) + "\n" for d in docs[:50]))
    uri = str(tmp_path / "idx")
    cfg = job_config(str(corpus), uri, index={"factory": factory, "tiers": [32, "full"], "max_tier_deltas": 1,
                                              "quality_sample": 20})
    first = reindex(cfg, log=None).manifest
    assert first.tiers[0].layout == ("ondisk" if factory.startswith("IVF") else "single")
    edited = dict(docs[0], text=docs[0]["text"] + " Edited: now about sockets and ports.")
    messages: list[str] = []
    for day, rows in enumerate([[edited] + docs[1:55], [edited] + docs[1:60]], start=1):
        corpus.write_text("".join(json.dumps(d) + "\n" for d in rows))
        m = reindex(cfg, log=messages.append).manifest
        assert m.delta["documents_embedded"] == (6 if day == 1 else 5)  # only new and changed documents
        assert m.counts.documents == len(rows) and m.fingerprint == first.fingerprint
        assert [t.layout for t in m.tiers] == [t.layout for t in first.tiers]
        # day 1 adds a delta index per tier; day 2 finds 1 delta (the cap) and rebuilds from Parquet
        assert [len(t.deltas) for t in m.tiers] == ([1, 1] if day == 1 else [0, 0])
        for t in m.tiers:  # the tier entry describes the tier as it is now: files + deltas, this run's cost
            on_disk = sum(os.path.getsize(os.path.join(uri, f)) for f in t.files + t.deltas)
            assert abs(t.bytes_per_vector * t.ntotal - on_disk) <= 1, (t.bytes_per_vector, t.ntotal, on_disk)
            assert t.build.get("delta_rows") == (6 if day == 1 else None)
        reader = embindex.open_index(uri)
        hits = reader.search([edited["text"]] + [d["text"] for d in rows[-3:]], k=1, tier=32)
        assert [h[0].id for h in hits] == [edited["id"]] + [d["id"] for d in rows[-3:]]
        everything = reader.search([docs[1]["text"]], k=len(rows) + 5, tier=32, rescore=1)[0]
        assert sorted(h.id for h in everything) == sorted(d["id"] for d in rows)  # no stale row, none lost
    assert any("index.max_tier_deltas" in msg and "nothing re-embedded" in msg for msg in messages)
    assert not any("full rebuild" in msg for msg in messages)
