"""The commit protocol without Ray: conditional writes on local disk and on the loopback S3 server,
racing writers, the lease protocol, and garbage collection's grace period and in-flight bases."""

from __future__ import annotations

import json
import threading
import time

import pytest

from embindex.index import commits, layout
from embindex.index.gc import collect_garbage, published_chain
from embindex.index.lease import Lease
from embindex.index.manifest import Counts, Manifest, ModelEntry, ShardEntry, TierEntry
from embindex.index.publish import IndexChangedError, latest_version, list_versions, publish, read_manifest
from embindex.storage import ConditionalWritesUnsupported, Storage, StorageOptions


class RecordingStorage(Storage):
    def __init__(self, root):
        super().__init__(root)
        self.writes: list[str] = []

    def create_bytes(self, rel, data):
        self.writes.append(rel)
        super().create_bytes(rel, data)

    def swap_bytes(self, rel, data, tag):
        self.writes.append(rel)
        return super().swap_bytes(rel, data, tag)


def _manifest(run_id: str = "r", files: tuple[str, ...] = ()) -> Manifest:
    return Manifest(
        version="v000000", created_at="2026-01-01T00:00:00+00:00", run_id=run_id,
        model=ModelEntry(name="hf-encoder", path="p", checkpoint_hash="sha256:0", max_length=8, pooling="mean",
                         dtype="float32"),
        outputs={"single": True}, dim=8,
        tiers=[TierEntry(dim=8, factory="Flat", files=[f"shards/{run_id}/t.faiss"])],
        shards=[ShardEntry(path=f, rows=1, bytes=1, sha256="0", vectors=layout.vectors_beside(f)) for f in files],
        counts=Counts(rows_in=0, documents=0, chunks=0, vectors=0, rejected=0),
    )


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path):
    if request.param == "local":
        return Storage(str(tmp_path / "idx"))
    bucket, opts, _ = request.getfixturevalue("s3_bucket")
    return Storage(f"s3://{bucket}/idx", StorageOptions.from_dict(opts))


def test_latest_is_switched_last_and_versions_advance(tmp_path):
    store = RecordingStorage(str(tmp_path))
    assert latest_version(store) is None
    with pytest.raises(FileNotFoundError, match="no published version"):
        read_manifest(store)
    first = publish(store, _manifest(), None)
    assert first.version == "v000001" and first.parent is None
    assert store.writes == [layout.manifest_path("v000001"), layout.LATEST]
    second = publish(store, _manifest("r2"), "v000001")
    assert second.version == "v000002" and second.parent == "v000001" and latest_version(store) == "v000002"
    assert list_versions(store) == ["v000001", "v000002"]
    assert read_manifest(store, "v000001").version == "v000001"
    assert not [p for p in tmp_path.rglob("*.tmp-*")]  # local writes go through temp + rename


def test_conditional_primitives(store):
    store.create_bytes("a", b"1")
    with pytest.raises(FileExistsError):
        store.create_bytes("a", b"2")
    assert store.read_bytes("a") == b"1"
    assert store.read_tagged("missing") == (None, None)
    data, tag = store.read_tagged("a")
    assert data == b"1"
    assert store.swap_bytes("a", b"3", tag)
    assert not store.swap_bytes("a", b"4", tag)  # stale tag: someone (we) changed it since
    assert not store.swap_bytes("a", b"5", None)  # "only if absent" on an existing file
    assert store.swap_bytes("b", b"6", None)
    assert store.read_bytes("a") == b"3" and store.read_bytes("b") == b"6"
    store.delete("a")
    store.delete("a")  # deleting twice (two cleaners) is not an error
    assert not store.exists("a")


def test_reads_of_a_file_another_writer_replaces_never_fail(store):
    """`_latest` and `_published.json` are replaced while others read them: a read returns one whole
    version, never an error (s3fs's file object checks the HEAD's ETag on its GET and raised
    FileExpired when a writer replaced the object in between)."""
    store.write_bytes("pointer", b"0" * 64)
    stop = threading.Event()

    def rewrite() -> None:
        i = 0
        while not stop.is_set():
            i += 1
            store.write_bytes("pointer", str(i % 10).encode() * 64)

    writer = threading.Thread(target=rewrite)
    writer.start()
    try:
        seen = {store.read_bytes("pointer") for _ in range(300)}
    finally:
        stop.set()
        writer.join()
    assert all(len(v) == 64 and len(set(v)) == 1 for v in seen)


def test_non_conditional_store_needs_the_lease(tmp_path):
    store = Storage("memory://embindex-test-idx")
    assert not store.has_conditional_writes
    with pytest.raises(ConditionalWritesUnsupported):
        publish(store, _manifest(), None, commit="conditional")


def _race(store: Storage, n: int, rebase: bool, **kwargs) -> tuple[list[Manifest], list[BaseException]]:
    """`n` writers that all started from the current latest publish at the same moment."""
    base = latest_version(store)
    barrier = threading.Barrier(n)
    won: list[Manifest] = []
    lost: list[BaseException] = []

    def writer(i: int) -> None:
        m = _manifest(f"run{i}")
        barrier.wait()
        try:
            won.append(publish(store, m, base, rebase=rebase, **kwargs))
        except IndexChangedError as e:
            lost.append(e)

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    return won, lost


def _check_history(store: Storage, won: list[Manifest]) -> None:
    """Every published manifest intact, and the chain from _latest holds every winner exactly once."""
    chain = published_chain(store)
    assert {m.version for m in won} <= {m.version for m in chain}
    assert len(chain) == len(won) + 1  # the winners on top of the seed version
    for m in won:
        assert read_manifest(store, m.version) == m
    for newer, older in zip(chain, chain[1:]):
        assert newer.parent == older.version and layout.version_number(newer.version) > layout.version_number(
            older.version)
    assert set(list_versions(store)) == {m.version for m in chain}  # withdrawn claims are gone


def test_racing_deltas_one_wins_the_others_are_told(store):
    publish(store, _manifest("seed"), None)
    won, lost = _race(store, 6, rebase=False)
    assert len(won) == 1 and len(lost) == 5
    assert all("index changed under this run" in str(e) and "v000001" in str(e) for e in lost)
    assert latest_version(store) == won[0].version and won[0].parent == "v000001"
    _check_history(store, won)
    for i in range(6):  # losers' run ids stay resumable, the winner's is published
        assert commits.published_version(store, f"run{i}") == (won[0].version if won[0].run_id == f"run{i}" else None)


def test_racing_full_builds_all_publish_in_a_line(store):
    publish(store, _manifest("seed"), None)
    won, lost = _race(store, 6, rebase=True)
    assert not lost and len(won) == 6
    _check_history(store, won)
    assert len(published_chain(store)) == 7


def test_lease_protocol_serialises_writers(tmp_path, monkeypatch):
    monkeypatch.setattr(Lease, "__init__", _fast_lease_init)
    store = Storage(str(tmp_path / "idx"))
    publish(store, _manifest("seed"), None, commit="lease")
    won, lost = _race(store, 4, rebase=True, commit="lease")
    assert not lost and len(won) == 4
    _check_history(store, won)
    assert not store.exists("_commit.lease")


_lease_init = Lease.__init__


def _fast_lease_init(self, store, **kwargs):
    _lease_init(self, store, settle=0.3, poll=0.05)


def test_a_lost_reply_to_a_switch_that_happened_is_not_undone(tmp_path):
    class LostReply(Storage):
        def swap_bytes(self, rel, data, tag):
            super().swap_bytes(rel, data, tag)
            return False  # the PUT landed, but the client saw a timeout and the retry a 412

    store = LostReply(str(tmp_path))
    m = publish(store, _manifest(), None)
    assert latest_version(store) == m.version and store.exists(layout.manifest_path(m.version))


def test_claim_of_a_dead_writer_is_skipped_then_collected(tmp_path):
    store = Storage(str(tmp_path))
    publish(store, _manifest("seed"), None)
    dead = _manifest("dead").model_copy(update={"version": "v000002", "created_at": "2026-01-01T00:00:00+00:00"})
    store.create_bytes(layout.manifest_path("v000002"), dead.to_json().encode())  # died before switching
    m = publish(store, _manifest("next"), "v000001")
    assert m.version == "v000003" and m.parent == "v000001"
    collect_garbage(store, keep=5, grace_seconds=3600)
    assert "v000002" not in list_versions(store)  # claimed long ago, never published


def _write(store: Storage, rel: str) -> None:
    store.write_bytes(rel, b"x")


def _published_at(store: Storage, run: str, base: str | None, files: tuple[str, ...], at: float) -> Manifest:
    for f in files + tuple(layout.vectors_beside(f) for f in files) + (f"shards/{run}/t.faiss",):
        _write(store, f)
    m = publish(store, _manifest(run, files), base)
    stamped = m.model_copy(update={"created_at": time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime(at))})
    store.write_text(layout.manifest_path(m.version), stamped.to_json())
    return stamped


def test_gc_waits_for_the_grace_period_and_in_flight_bases(tmp_path):
    store = Storage(str(tmp_path))
    now = time.time()
    v1 = _published_at(store, "a", None, ("shards/a/p.parquet",), now - 7200)
    v2 = _published_at(store, "b", v1.version, ("shards/a/p.parquet", "shards/b/p.parquet"), now - 600)
    v3 = _published_at(store, "c", v2.version, ("shards/c/p.parquet",), now - 60)
    # v1 stopped being latest 600 s ago, v2 60 s ago: with a 1 h grace nothing goes
    assert collect_garbage(store, keep=1, now=now) == []
    # 300 s of grace: v1 goes; shards/a/p.parquet is still used by v2 (within its grace) and stays
    assert collect_garbage(store, keep=1, grace_seconds=300, now=now) == ["v000001"]
    assert store.exists("shards/a/p.parquet") and not store.exists("shards/a/t.faiss")
    assert store.exists("shards/a/p.vectors.npy")  # a part's row matrix lives and goes with the part
    # an in-flight reindex started from v2: v2 stays whatever the grace
    commits.write_run_record(store, "d", "fp", kind="reindex", base=v2.version)
    assert collect_garbage(store, keep=1, grace_seconds=0, now=now) == []
    # the run gave up long ago: v2 goes, with the files only it used and its run folder
    record = json.loads(store.read_text("shards/d/_run.json"))
    store.write_text("shards/d/_run.json", json.dumps(dict(record, started_at=now - 30 * 86400)))
    assert collect_garbage(store, keep=1, grace_seconds=0, now=now) == ["v000002"]
    assert not store.exists("shards/a/p.parquet") and not store.exists("shards/b")
    assert not store.exists("shards/a/p.vectors.npy")
    assert store.exists("shards/c/p.parquet") and latest_version(store) == v3.version
    assert store.exists("shards/d/_run.json")  # unpublished runs are never touched


class _StripConditions:
    """A loopback HTTP proxy in front of the S3 server that drops If-None-Match / If-Match, like an
    S3-compatible store without conditional writes (moto does not check request signatures)."""

    def __init__(self, upstream: str):
        import http.client
        import http.server
        from urllib.parse import urlparse

        target = urlparse(upstream)

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _forward(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                headers = {k: v for k, v in self.headers.items()
                           if k.lower() not in ("if-none-match", "if-match", "host", "connection")}
                conn = http.client.HTTPConnection(target.hostname, target.port, timeout=30)
                conn.request(self.command, self.path, body=body or None, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                self.send_response(resp.status)
                for k, v in resp.getheaders():
                    if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                conn.close()

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _forward

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_a_store_that_ignores_conditional_writes_is_refused(s3_bucket):
    bucket, opts, _ = s3_bucket
    proxy = _StripConditions(opts["endpoint_url"])
    try:
        store = Storage(f"s3://{bucket}/idx", StorageOptions.from_dict(dict(opts, endpoint_url=proxy.endpoint)))
        with pytest.raises(ConditionalWritesUnsupported, match="ignores conditional writes.*index.commit: lease"):
            publish(store, _manifest(), None)
        assert not store.exists(layout.LATEST) and list_versions(store) == []
        assert store.listdir("_probe") == []  # the probe cleans up after itself
    finally:
        proxy.close()
