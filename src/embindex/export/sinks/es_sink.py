"""Elasticsearch target: `es://host:9200/INDEX` (HTTP) or `ess://host:443/INDEX` (HTTPS; port defaults
9200 / 443). Credentials: `ELASTIC_API_KEY`, or `ELASTIC_USERNAME` + `ELASTIC_PASSWORD`, from the
environment (or the `api_key` / `username` / `password` options); `ca_certs`, `verify_certs`,
`request_timeout` go to the client.

The index mapping comes from the plan (es_docs.build_mapping): the tier vector `embedding` as dense_vector
(dot_product, `index_options` int8_hnsw by default or `index_type=bbq_hnsw` etc., `oversample` for
rescore_vector), typed metadata under `meta`, chunk offsets, optionally `embedding_full` and `tokens`
(rank_vectors). Documents are bulk-loaded with the official client's `streaming_bulk` (429s retried with
backoff, every other per-item error reported with its document id); the export state lives in the index
mapping's `_meta.embindex`, updated after each wave of shards, so a rerun resumes by shard. Deletes run
as `_delete_by_query` on (ids, shard) after a refresh, so a replaced document's new row stays.
"""

from __future__ import annotations

import json
import os
from typing import Any
from urllib.parse import urlsplit

import pyarrow as pa

from ..plan import ExportPlan
from ..state import ConflictError, ExportError, ExportState, TargetError
from .base import Sink, keys_by_shard, require
from .es_docs import VECTOR_FIELD, documents, plan_mapping

META_KEY = "embindex"
DELETE_BATCH = 1000
ERRORS_SHOWN = 5


def parse_es_uri(uri: str) -> tuple[str, str]:
    """(node URL, index name) of an es:// or ess:// target URI."""
    parts = urlsplit(uri)
    if parts.scheme not in ("es", "ess"):
        raise ValueError(f"not an Elasticsearch target: {uri!r} (es://host:9200/index or ess://host:443/index)")
    index = parts.path.strip("/")
    if not parts.hostname or not index or "/" in index:
        raise ValueError(f"{uri!r}: give the host and the index name, e.g. es://localhost:9200/docs")
    if index != index.lower() or index.startswith(("_", "-", "+")):
        raise ValueError(f"Elasticsearch index names are lowercase and do not start with _, - or +: {index!r}")
    https = parts.scheme == "ess"
    port = parts.port or (443 if https else 9200)
    return f"{'https' if https else 'http'}://{parts.hostname}:{port}", index


class EsSink(Sink):
    parallel = True
    takes_tokens = True

    def __init__(self, uri: str, index: bool | None = None, api_key: str | None = None,
                 username: str | None = None, password: str | None = None, index_type: str = "int8_hnsw",
                 oversample: float | None = None, m: int | None = None, ef_construction: int | None = None,
                 chunk_size: int = 500, max_retries: int = 5, initial_backoff: float = 2.0,
                 max_backoff: float = 60.0, request_timeout: float = 60.0, ca_certs: str | None = None,
                 verify_certs: bool | None = None, shards: int | None = None, replicas: int | None = None):
        self.url, self.index_name = parse_es_uri(uri)
        require("elasticsearch", "export-elasticsearch")
        env = os.environ
        self.api_key = api_key or env.get("ELASTIC_API_KEY") or None
        self.username = username or env.get("ELASTIC_USERNAME") or None
        self.password = password or env.get("ELASTIC_PASSWORD") or None
        self.secrets = tuple(s for s in (self.api_key, self.password) if s)
        if index is False:
            raise ValueError("Elasticsearch always indexes the vector field (int8_hnsw by default); "
                             "choose the structure with --opt index_type=...")
        self.mapping_options = {"index_type": index_type, "oversample": oversample, "m": m,
                                "ef_construction": ef_construction}
        self.bulk = {"chunk_size": int(chunk_size), "max_retries": int(max_retries),
                     "initial_backoff": float(initial_backoff), "max_backoff": float(max_backoff)}
        self.client_options = {"request_timeout": float(request_timeout), "ca_certs": ca_certs,
                               "verify_certs": verify_certs}
        self.settings = {k: v for k, v in (("number_of_shards", shards), ("number_of_replicas", replicas))
                         if v is not None}
        self._client = None

    def describe(self) -> str:
        return f"Elasticsearch index {self.index_name!r} at {self.url}"

    # -- connection --------------------------------------------------------------------------------------
    @property
    def client(self):
        if self._client is None:
            from elasticsearch import Elasticsearch

            auth: dict[str, Any] = {}
            if self.api_key:
                auth["api_key"] = self.api_key
            elif self.username:
                auth["basic_auth"] = (self.username, self.password or "")
            opts = {k: v for k, v in self.client_options.items() if v is not None}
            self._client = Elasticsearch(self.url, retry_on_timeout=True, max_retries=3, **auth, **opts)
        return self._client

    def _call(self, what: str, fn, *args: Any, **kwargs: Any) -> Any:
        """One API call; transport and API errors become TargetError / ExportError without secrets."""
        import elasticsearch as es
        from elastic_transport import TransportError

        try:
            return fn(*args, **kwargs)
        except (es.AuthenticationException, es.AuthorizationException) as e:
            raise TargetError(f"{self.describe()}: authentication failed ({what}): "
                              f"{self.scrub(str(getattr(e, 'message', e)))}") from None
        except es.UnsupportedProductError as e:
            raise TargetError(f"{self.url} is not Elasticsearch: {self.scrub(str(e))}") from None
        except es.ApiError as e:
            raise ExportError(f"{self.describe()}: {what} failed: {self.scrub(str(e))}") from None
        except TransportError as e:  # connection refused, DNS, TLS, timeouts (after the client's retries)
            raise TargetError(f"{self.describe()} unreachable ({what}): {self.scrub(str(e))}") from None

    def connect(self) -> None:
        self._call("info", self.client.info)

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    # -- state ---------------------------------------------------------------------------------------------
    def _mapping(self) -> dict[str, Any] | None:
        if not self._call("exists", self.client.indices.exists, index=self.index_name):
            return None
        got = self._call("get mapping", self.client.indices.get_mapping, index=self.index_name)
        body = dict(got.body if hasattr(got, "body") else got)
        return next(iter(body.values()), {}).get("mappings", {})

    def read_state(self) -> ExportState | None:
        mapping = self._mapping()
        meta = ((mapping or {}).get("_meta") or {}).get(META_KEY)
        return ExportState.from_json(meta) if meta else None

    def save_state(self, state: ExportState) -> None:
        self._call("put mapping", self.client.indices.put_mapping, index=self.index_name,
                   meta={META_KEY: json.loads(state.to_json())})

    # -- mapping -------------------------------------------------------------------------------------------
    def prepare(self, plan: ExportPlan, replace: bool = False) -> None:
        mapping = plan_mapping(plan, self.mapping_options)  # raises on dims / options before any request
        existing = self._mapping()
        if existing is not None and replace:
            self._call("delete index", self.client.indices.delete, index=self.index_name)
            existing = None
        if existing is None:
            body: dict[str, Any] = {"mappings": mapping}
            if self.settings:
                body["settings"] = self.settings
            self._call("create index", self.client.indices.create, index=self.index_name, **body)
            return
        if not ((existing.get("_meta") or {}).get(META_KEY)):
            raise ConflictError(f"index {self.index_name!r} exists and holds no embindex export; export to "
                                "another index, or --replace to delete it")
        have = (existing.get("properties") or {}).get(VECTOR_FIELD) or {}
        want = mapping["properties"][VECTOR_FIELD]
        for key in ("type", "dims", "similarity", "element_type"):
            if have.get(key, want[key] if key == "element_type" else None) != want[key]:
                raise ConflictError(f"index {self.index_name!r} maps {VECTOR_FIELD} as {have.get('type')} "
                                    f"dims={have.get('dims')} similarity={have.get('similarity')}, this export "
                                    f"needs dims={want['dims']} {want['similarity']}: --replace to rebuild it")

    # -- rows ----------------------------------------------------------------------------------------------
    def actions(self, rows: pa.Table):
        for key, source in documents(rows):
            yield {"_op_type": "index", "_index": self.index_name, "_id": key, "_source": source}

    def write(self, rows: pa.Table, fresh: bool = False) -> int:
        from elasticsearch.helpers import streaming_bulk

        failed = []
        results = streaming_bulk(self.client, self.actions(rows), raise_on_error=False, yield_ok=False,
                                 **self.bulk)
        for success, item in self._call_iter("bulk", results):
            if success:
                continue
            info = next(iter(item.values()))
            err = info.get("error") or {}
            kind, reason = (err.get("type", ""), err.get("reason", "")) if isinstance(err, dict) else ("", err)
            failed.append(f"{info.get('_id')}: {info.get('status')} {kind} {reason}".strip())
        if failed:
            shown = "; ".join(failed[:ERRORS_SHOWN]) + (f"; ... {len(failed) - ERRORS_SHOWN} more"
                                                          if len(failed) > ERRORS_SHOWN else "")
            raise ExportError(f"{len(failed)} of {rows.num_rows} document(s) refused: {self.scrub(shown)}")
        return rows.num_rows

    def _call_iter(self, what: str, results):
        """Iterate streaming_bulk, mapping transport errors like `_call`."""
        it = iter(results)
        while True:
            try:
                item = self._call(what, next, it)
            except StopIteration:
                return
            yield item

    def delete_rows(self, pairs: list[tuple[str, str]]) -> int:
        if not pairs:
            return 0
        self._call("refresh", self.client.indices.refresh, index=self.index_name)
        n = 0
        for shard, keys in keys_by_shard(pairs, DELETE_BATCH):
            n += self._delete_by_query({"bool": {"filter": [{"term": {"shard": shard}}, {"ids": {"values": keys}}]}})
        return n

    def delete_shards(self, shards: list[str]) -> int:
        if not shards:
            return 0
        self._call("refresh", self.client.indices.refresh, index=self.index_name)
        return self._delete_by_query({"terms": {"shard": list(shards)}})

    def _delete_by_query(self, query: dict[str, Any]) -> int:
        resp = self._call("delete by query", self.client.delete_by_query, index=self.index_name, query=query,
                          conflicts="proceed", refresh=True)
        if resp.get("failures"):
            raise ExportError(f"{self.describe()}: delete by query failed: {self.scrub(str(resp['failures'][:3]))}")
        return int(resp.get("deleted", 0))

    def finish(self, plan: ExportPlan) -> dict[str, Any]:
        self._call("refresh", self.client.indices.refresh, index=self.index_name)
        options = self.mapping_options
        return {"index": options["index_type"] + (f" (oversample {options['oversample']})"
                                                  if options.get("oversample") is not None else "")}
