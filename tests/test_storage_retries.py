"""Storage retries are one layer: the S3 clients' own standard retry mode, never a loop around it.

A loopback server answers every request with 503 SlowDown-style errors and counts them: a read through
either filesystem makes exactly S3_MAX_ATTEMPTS requests, then fails with a clear error. (Nested layers
multiply: s3fs's loop around botocore's, and an embindex loop around both, made 5 x 5 x 7 requests.)
"""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from embindex import storage
from embindex.storage import Storage, StorageOptions, arrow_filesystem

ERROR = (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>ServiceUnavailable</Code>'
         b"<Message>try again</Message></Error>")


class Unavailable(BaseHTTPRequestHandler):
    count = 0
    lock = threading.Lock()

    def _answer(self) -> None:
        with Unavailable.lock:
            Unavailable.count += 1
        self.send_response(503)  # before any request body: the client may wait for "100 Continue"
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(len(ERROR)))
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True
        if self.command != "HEAD":
            self.wfile.write(ERROR)

    do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = _answer

    def log_message(self, *args) -> None:  # quiet
        pass


@pytest.fixture
def unavailable(monkeypatch):
    monkeypatch.setattr(storage, "S3_MAX_ATTEMPTS", 3, raising=False)  # keep the backoff short
    server = ThreadingHTTPServer(("127.0.0.1", 0), Unavailable)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    Unavailable.count = 0
    try:
        yield StorageOptions(endpoint_url=f"http://127.0.0.1:{server.server_address[1]}", key="k", secret="s",
                             region="us-east-1")
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("call", ["read", "write", "list"])
def test_fsspec_calls_make_exactly_the_configured_attempts(unavailable, call):
    store = Storage("s3://bucket/index", unavailable)
    op = {"read": lambda: store.read_bytes("manifest.json"),
          "write": lambda: store.write_bytes("x.json", b"{}"),
          "list": lambda: store.listdir("versions")}[call]
    with pytest.raises(OSError) as info:
        op()
    assert Unavailable.count == 3, (Unavailable.count, info.value)
    assert "Service Unavailable" in str(info.value) or "try again" in str(info.value)  # the server's answer


@pytest.mark.timeout(120)
def test_arrow_reads_make_exactly_the_configured_attempts(unavailable):
    fs = arrow_filesystem("s3://bucket/c", unavailable)
    with pytest.raises(OSError):
        fs.get_file_info("bucket/c/part-0.parquet")
    assert Unavailable.count == 3
