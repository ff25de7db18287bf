"""Failures during a build, with real processes and bounded in time: a killed driver resumed, a killed
embed actor, an object store restarted mid-run, readers during publishes, and bad input at scale."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import embindex
from conftest import _free_port, job_config, sample_docs
from embindex.index.commits import read_commits
from embindex.sources.normalize import Reasons
from embindex.storage import Storage

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


def _corpus(tmp_path: Path, files: int, per_file: int) -> tuple[Path, list[dict]]:
    docs = sample_docs(files * per_file)
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(files):
        chunk = docs[i * per_file:(i + 1) * per_file]
        (corpus / f"{i:02d}.jsonl").write_text("".join(json.dumps(d) + "\n" for d in chunk))
    return corpus, docs


def _wait_for(cond, timeout: float, what: str, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"process ended before {what}: rc={proc.returncode}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def _index_rows(uri: str) -> dict[str, np.ndarray]:
    reader = embindex.open_index(uri)
    return {i: v for i, v in zip(reader.ids, reader.vectors)}


def test_driver_killed_then_resumed_equals_uninterrupted(ray_cluster, tmp_path):
    # 8 fragments (the kill lands between the 2nd and the 8th commit); 20 documents each keep ~3 s of
    # embedding after the 2nd commit on 2 cores, far more than the 0.1 s the kill takes to follow it
    corpus, docs = _corpus(tmp_path, files=8, per_file=20)
    gcs = ray_cluster.get_runtime_context().gcs_address
    uri = str(tmp_path / "index")
    cfg = job_config(str(corpus), uri, run={"id": "nightly-1", "progress": False},
                     resources={"ray_address": gcs})
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "HF_HUB_OFFLINE": "1"}
    script = "import json, sys, embindex; embindex.build(json.loads(sys.argv[1]), log=None)"
    proc = subprocess.Popen([sys.executable, "-c", script, json.dumps(cfg)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    store = Storage(uri)
    try:
        _wait_for(lambda: len(read_commits(store, "nightly-1")) >= 2, 240, "two fragment commits", proc)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    committed = len(read_commits(store, "nightly-1"))
    assert 2 <= committed < 8, "the driver finished before it could be killed"
    assert not (tmp_path / "index" / "_latest").exists()

    resumed = embindex.build(cfg, log=None)  # same run id: resume
    assert resumed.manifest.fragments == {"total": 8, "embedded": 8 - committed, "reused": committed}
    assert resumed.counts["documents"] == 160 and resumed.counts["rejected"] == 0

    fresh_uri = str(tmp_path / "fresh")
    embindex.build(job_config(str(corpus), fresh_uri), log=None)
    a, b = _index_rows(uri), _index_rows(fresh_uri)
    assert sorted(a) == sorted(b) == sorted(d["id"] for d in docs)
    assert max(float(np.abs(a[i] - b[i]).max()) for i in a) == 0.0


def _embed_actor_pids() -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmd = Path(f"/proc/{entry}/cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if "EmbedActor" in cmd:
            pids.append(int(entry))
    return pids


def test_killed_embed_actor_loses_nothing(ray_cluster, tmp_path):
    corpus, docs = _corpus(tmp_path, files=6, per_file=40)
    uri = str(tmp_path / "index")
    cfg = job_config(str(corpus), uri, run={"id": "r1", "progress": False})
    store = Storage(uri)
    killed: list[int] = []

    def chaos():
        _wait_for(lambda: len(read_commits(store, "r1")) >= 1 and _embed_actor_pids(), 240, "a running actor")
        for pid in _embed_actor_pids():
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)

    t = threading.Thread(target=chaos, daemon=True)
    t.start()
    result = embindex.build(cfg, log=None)
    t.join(timeout=5)
    assert killed, "no actor was killed"
    assert sorted(_index_rows(uri)) == sorted(d["id"] for d in docs)
    assert result.counts["documents"] == 240


def test_object_store_restart_mid_run(ray_cluster, tmp_path):
    import boto3
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    opts = {"endpoint_url": f"http://127.0.0.1:{port}", "key": "testing", "secret": "testing",
            "region": "us-east-1"}
    client = boto3.client("s3", endpoint_url=opts["endpoint_url"], aws_access_key_id="testing",
                          aws_secret_access_key="testing", region_name="us-east-1")
    client.create_bucket(Bucket="restart")
    docs = sample_docs(240)
    for i in range(6):
        body = "".join(json.dumps(d) + "\n" for d in docs[i * 40:(i + 1) * 40])
        client.put_object(Bucket="restart", Key=f"c/{i}.jsonl", Body=body.encode())
    uri = "s3://restart/index"
    cfg = job_config("s3://restart/c/", uri, source={"storage": opts}, index={"storage": opts},
                     run={"id": "r1", "progress": False})
    store = Storage(uri, embindex.storage.StorageOptions.from_dict(opts))
    restarted = threading.Event()

    def chaos():
        nonlocal server
        _wait_for(lambda: len(read_commits(store, "r1")) >= 1, 240, "a fragment commit")
        server.stop()
        time.sleep(3)
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
        server.start()
        restarted.set()

    t = threading.Thread(target=chaos, daemon=True)
    t.start()
    try:
        result = embindex.build(cfg, log=None)
        t.join(timeout=30)
        assert restarted.is_set()
        assert result.counts["documents"] == 240
        reader = embindex.open_index(uri, storage=opts)
        assert sorted(reader.ids) == sorted(d["id"] for d in docs)
    finally:
        server.stop()


def test_readers_never_see_a_partial_version(ray_cluster, tmp_path):
    corpus, docs = _corpus(tmp_path, files=2, per_file=30)
    uri = str(tmp_path / "index")
    embindex.build(job_config(str(corpus), uri), log=None)
    stop = threading.Event()
    seen: list[str] = []
    errors: list[BaseException] = []

    def reader_loop():
        while not stop.is_set():
            try:
                r = embindex.open_index(uri)
                hits = r.search_vectors(r.vectors[:2], k=3)
                assert [h[0].id for h in hits] == r.ids[:2]
                assert len(r.ids) == r.manifest.counts.vectors == 60
                seen.append(r.version)
            except BaseException as e:  # noqa: BLE001 - reported below
                errors.append(e)
                return

    t = threading.Thread(target=reader_loop, daemon=True)
    t.start()
    for _ in range(2):
        embindex.build(job_config(str(corpus), uri), log=None)
    stop.set()
    t.join(timeout=30)
    assert not errors, errors[0]
    assert len(set(seen)) >= 2 and len(seen) > 5


def test_bad_input_at_scale_every_reject_listed(ray_cluster, tmp_path):
    rng = random.Random(7)
    n = 2000
    rows: list[dict] = [{"id": f"d{i}", "text": f"document {i}: " + " ".join(rng.choice(
        ["files", "gzip", "parse", "socket", "thread", "json", "path", "time"]) for _ in range(8))}
        for i in range(n)]
    bad_kinds = {
        Reasons.EMPTY_TEXT: lambda i: {"id": f"empty{i}", "text": ""},
        Reasons.MISSING_ID: lambda i: {"id": None, "text": f"no id {i}"},
        Reasons.DUPLICATE_ID: lambda i: {"id": f"d{i}", "text": f"copy of d{i}"},
        Reasons.INVALID_UTF8: lambda i: {"id": f"bad{i}", "text": b"\xff\xfe" + str(i).encode()},
        Reasons.TEXT_TOO_LARGE: lambda i: {"id": f"big{i}", "text": "x" * (10 * 1024 * 1024 if i == 0 else 2_000_001)},
    }
    expected: dict[str, int] = {}
    for reason, make in bad_kinds.items():
        k = 2 if reason == Reasons.TEXT_TOO_LARGE else n // 100
        for i in range(k):
            rows.append(make(i))
        expected[reason] = k * (2 if reason == Reasons.DUPLICATE_ID else 1)  # both copies of a duplicate
    rng.shuffle(rows)
    schema = pa.schema([("id", pa.string()), ("text", pa.binary())])
    table = pa.table({"id": [r["id"] for r in rows],
                      "text": [r["text"] if isinstance(r["text"], bytes) else r["text"].encode() for r in rows]},
                     schema=schema)
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    pq.write_table(table, corpus / "c.parquet", row_group_size=500)
    cfg = job_config(str(corpus), str(tmp_path / "index"), source={"max_text_bytes": 2_000_000, "fragment_rows": 500},
                     index={"tiers": [64, "full"], "quality_sample": 50},
                     model={"max_length": 32}, resources={"batch_tokens": 16384})
    result = embindex.build(cfg, log=None)
    c = result.counts
    assert c["rows_in"] == len(rows) and c["documents"] + c["rejected"] == len(rows)
    reasons: dict[str, int] = {}
    for r in result.manifest.rejects:
        for k, v in r.reasons.items():
            reasons[k] = reasons.get(k, 0) + v
    assert reasons == expected
    rej = pa.concat_tables([pq.read_table(tmp_path / "index" / r.path) for r in result.manifest.rejects])
    assert rej.num_rows == sum(expected.values()) and all(rej.column("reject_detail").to_pylist())
    assert result.manifest.fragments["total"] == 5
