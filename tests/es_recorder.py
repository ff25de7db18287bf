"""A loopback HTTP server that answers the Elasticsearch requests the export sink makes, like Elasticsearch
does, and records them. Not a search engine: it keeps documents and mappings in memory so tests can check
what arrived.

Answers: `GET /` (cluster info), `HEAD|PUT|DELETE /<index>`, `GET|PUT /<index>/_mapping` (`_meta` and
properties merged), `POST /_bulk` and `/<index>/_bulk` (index and delete actions; per-item statuses),
`POST /<index>/_refresh`, `POST /<index>/_delete_by_query` (the query shapes the sink sends: `terms` on a
field, `bool.filter` of `term` + `ids`). Every response carries `X-Elastic-Product: Elasticsearch`, which the
official client checks. Faults to inject: `reject_once` (ids answered 429 the first time they are sent),
`refuse` (id -> a mapping error, every time), `api_key` (required `Authorization: ApiKey ...`).
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

CONTENT_TYPE = "application/vnd.elasticsearch+json;compatible-with=9"


class Recorder:
    """`keep_documents=False`: bulk sources are neither parsed nor kept, and requests are not recorded
    (a cheap server for measuring the client side)."""

    def __init__(self, keep_documents: bool = True) -> None:
        self.keep_documents = keep_documents
        self.requests: list[tuple[str, str, bytes]] = []  # (method, path, body)
        self.indices: dict[str, dict[str, Any]] = {}  # name -> {"mappings": ..., "docs": {id: source}}
        self.reject_once: set[str] = set()
        self.refuse: dict[str, str] = {}
        self.api_key: str | None = None
        self.lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None

    # -- lifecycle ----------------------------------------------------------------------------------
    def start(self) -> "Recorder":
        recorder = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:  # quiet
                pass

            def _handle(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                status, payload = recorder.handle(self.command, self.path, body, self.headers)
                data = b"" if payload is None else json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("X-Elastic-Product", "Elasticsearch")
                self.send_header("Content-Type", CONTENT_TYPE)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"{host}:{port}"

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    # -- what tests look at ---------------------------------------------------------------------------
    def paths(self, method: str | None = None) -> list[str]:
        return [p for m, p, _ in self.requests if method is None or m == method]

    def bulk_lines(self) -> list[list[dict]]:
        """The NDJSON lines of every _bulk request, parsed."""
        return [[json.loads(line) for line in body.decode().splitlines() if line.strip()]
                for m, p, body in self.requests if p.split("?")[0].endswith("/_bulk")]

    def docs(self, index: str) -> dict[str, dict]:
        return self.indices.get(index, {}).get("docs", {})

    def clear(self) -> None:
        with self.lock:
            self.requests.clear()

    # -- Elasticsearch's answers ---------------------------------------------------------------------------
    def handle(self, method: str, path: str, body: bytes, headers: Any) -> tuple[int, Any]:
        with self.lock:
            if self.keep_documents:
                self.requests.append((method, path, body))
            if self.api_key is not None and headers.get("Authorization") != f"ApiKey {self.api_key}":
                return 401, _error(401, "security_exception", "unable to authenticate with provided credentials")
            route = path.split("?")[0].strip("/").split("/")
            if route == [""]:
                return 200, {"name": "recorder", "cluster_name": "loopback", "version": {
                    "number": "9.1.0", "build_flavor": "default"}, "tagline": "You Know, for Search"}
            if route[-1] == "_bulk":
                return 200, self._bulk(body, route[0] if len(route) == 2 else None)
            name = route[0]
            if len(route) == 1:
                return self._index(method, name, body)
            if name not in self.indices:
                return 404, _error(404, "index_not_found_exception", f"no such index [{name}]")
            op = route[1]
            if op == "_mapping":
                if method == "GET":
                    return 200, {name: {"mappings": self.indices[name]["mappings"]}}
                update = json.loads(body)
                mappings = self.indices[name]["mappings"]
                if "_meta" in update:
                    mappings["_meta"] = update["_meta"]
                mappings.setdefault("properties", {}).update(update.get("properties", {}))
                return 200, {"acknowledged": True}
            if op == "_refresh":
                return 200, {"_shards": {"total": 1, "successful": 1, "failed": 0}}
            if op == "_delete_by_query":
                query = json.loads(body)["query"]
                docs = self.indices[name]["docs"]
                hit = [i for i, src in docs.items() if _matches(query, i, src)]
                for i in hit:
                    del docs[i]
                return 200, {"took": 1, "deleted": len(hit), "version_conflicts": 0, "failures": []}
            return 400, _error(400, "illegal_argument_exception", f"recorder does not answer {method} {path}")

    def _index(self, method: str, name: str, body: bytes) -> tuple[int, Any]:
        exists = name in self.indices
        if method == "HEAD":
            return (200 if exists else 404), None
        if method == "DELETE":
            self.indices.pop(name, None)
            return 200, {"acknowledged": True}
        if method == "PUT":
            if exists:
                return 400, _error(400, "resource_already_exists_exception", f"index [{name}] already exists")
            spec = json.loads(body or b"{}")
            self.indices[name] = {"mappings": spec.get("mappings", {}), "settings": spec.get("settings", {}),
                                  "docs": {}}
            return 200, {"acknowledged": True, "shards_acknowledged": True, "index": name}
        return 400, _error(400, "illegal_argument_exception", f"recorder does not answer {method} /{name}")

    def _bulk(self, body: bytes, default_index: str | None) -> dict[str, Any]:
        lines = [line for line in body.decode().splitlines() if line.strip()]
        items, errors, i = [], False, 0
        while i < len(lines):
            op, meta = next(iter(json.loads(lines[i]).items()))
            index = meta.get("_index", default_index)
            doc_id = meta.get("_id")
            has_source = op in ("index", "create", "update")
            source = (json.loads(lines[i + 1]) if self.keep_documents else None) if has_source else None
            i += 2 if has_source else 1
            if doc_id in self.reject_once:
                self.reject_once.discard(doc_id)
                errors = True
                items.append({op: {"_index": index, "_id": doc_id, "status": 429, "error": {
                    "type": "es_rejected_execution_exception", "reason": "rejected execution (queue full)"}}})
                continue
            if doc_id in self.refuse:
                errors = True
                items.append({op: {"_index": index, "_id": doc_id, "status": 400, "error": {
                    "type": "mapper_parsing_exception", "reason": self.refuse[doc_id]}}})
                continue
            docs = self.indices.setdefault(index, {"mappings": {}, "settings": {}, "docs": {}})["docs"]
            if op == "delete":
                found = docs.pop(doc_id, None) is not None
                items.append({op: {"_index": index, "_id": doc_id, "status": 200 if found else 404,
                                   "result": "deleted" if found else "not_found"}})
            else:
                created = doc_id not in docs
                docs[doc_id] = source if self.keep_documents else True
                items.append({op: {"_index": index, "_id": doc_id, "status": 201 if created else 200,
                                   "result": "created" if created else "updated"}})
        return {"took": 1, "errors": errors, "items": items}


def _error(status: int, kind: str, reason: str) -> dict[str, Any]:
    return {"error": {"root_cause": [{"type": kind, "reason": reason}], "type": kind, "reason": reason},
            "status": status}


def _matches(query: dict[str, Any], doc_id: str, source: dict[str, Any]) -> bool:
    if "terms" in query:
        field, values = next(iter(query["terms"].items()))
        return source.get(field) in values
    if "term" in query:
        field, value = next(iter(query["term"].items()))
        return source.get(field) == (value["value"] if isinstance(value, dict) else value)
    if "ids" in query:
        return doc_id in query["ids"]["values"]
    if "bool" in query:
        return all(_matches(q, doc_id, source) for q in query["bool"].get("filter", []))
    raise ValueError(f"recorder cannot evaluate {query}")


def serve(port_queue: Any, keep_documents: bool = False) -> None:
    """Run a recorder until the process is terminated; its address goes to `port_queue` (for a subprocess,
    so the server does not share the measured process's interpreter lock)."""
    import time

    rec = Recorder(keep_documents=keep_documents).start()
    port_queue.put(rec.url)
    while True:
        time.sleep(3600)
