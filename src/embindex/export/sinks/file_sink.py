"""Files for Elasticsearch's bulk API: `file:///dir` (a local folder).

    DIR/mapping.json                       {"mappings": ...}: PUT it as the index body
    DIR/state.json                         the export state (resume, incremental exports)
    DIR/<version>/00-deletes.ndjson        bulk deletes of rows tombstoned since the previous export
    DIR/<version>/01-delete-shards.json    a _delete_by_query body for rows of shards the version dropped
    DIR/<version>/bulk-<shard>.ndjson      index actions, one file per shard

Apply a version's files in name order (deletes first: a replaced document is deleted and then indexed
again). The bulk files carry no `_index`: POST them to `/<index>/_bulk`.
"""

from __future__ import annotations

import json
from typing import Any

import pyarrow as pa

from ...storage import Storage
from ..plan import ExportPlan
from ..state import ConflictError, ExportState, TargetError
from .base import Sink
from .es_docs import VECTOR_FIELD, documents, plan_mapping

STATE, MAPPING = "state.json", "mapping.json"


def shard_file(version: str, shard: str) -> str:
    name = shard.removeprefix("shards/").removesuffix(".parquet").replace("/", "-")
    return f"{version}/bulk-{name}.ndjson"


class FileSink(Sink):
    parallel = True
    takes_tokens = True

    def __init__(self, uri: str, index: bool | None = None, index_type: str = "int8_hnsw",
                 oversample: float | None = None, m: int | None = None, ef_construction: int | None = None):
        self.root = uri
        self.mapping_options = {"index_type": index_type, "oversample": oversample, "m": m,
                                "ef_construction": ef_construction}
        self.version: str | None = None
        self._store = None

    def describe(self) -> str:
        return f"bulk files in {self.root}"

    @property
    def store(self) -> Storage:
        if self._store is None:
            self._store = Storage(self.root)
        return self._store

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state["_store"] = None
        return state

    def connect(self) -> None:
        try:
            self.store.fs.makedirs(self.store.fs_path(""), exist_ok=True)
        except OSError as e:
            raise TargetError(f"cannot create {self.root}: {e}") from None

    def read_state(self) -> ExportState | None:
        return ExportState.from_json(self.store.read_text(STATE)) if self.store.exists(STATE) else None

    def save_state(self, state: ExportState) -> None:
        self.store.write_text(STATE, state.to_json())

    def prepare(self, plan: ExportPlan, replace: bool = False) -> None:
        mapping = plan_mapping(plan, self.mapping_options)
        if replace:
            for name in self.store.listdir(""):
                self.store.delete(name)
        if self.store.exists(MAPPING):
            if not self.store.exists(STATE):
                raise ConflictError(f"{self.root} holds a mapping.json but no embindex export state; "
                                    "--replace to clear it")
            have = json.loads(self.store.read_text(MAPPING))["mappings"]["properties"][VECTOR_FIELD]
            if have.get("dims") != plan.width:
                raise ConflictError(f"{self.root} holds {have.get('dims')}-dim vectors, not {plan.width}; "
                                    "--replace to clear it")
        else:
            self.store.write_text(MAPPING, json.dumps({"mappings": mapping}, indent=2))
        self.version = plan.version

    def write(self, rows: pa.Table, fresh: bool = False) -> int:
        if rows.num_rows == 0:
            return 0
        shard = rows.column("shard")[0].as_py()
        lines = []
        for key, source in documents(rows):
            lines.append(json.dumps({"index": {"_id": key}}))
            lines.append(source)
        self.store.write_text(shard_file(self.version, shard), "\n".join(lines) + "\n")
        return rows.num_rows

    def delete_rows(self, pairs: list[tuple[str, str]]) -> int:
        if pairs:
            text = "".join(json.dumps({"delete": {"_id": key}}) + "\n" for key, _ in pairs)
            self.store.write_text(f"{self.version}/00-deletes.ndjson", text)
        return len(pairs)

    def delete_shards(self, shards: list[str]) -> int:
        if shards:
            body = {"query": {"terms": {"shard": list(shards)}}}
            self.store.write_text(f"{self.version}/01-delete-shards.json", json.dumps(body))
        return 0

    def finish(self, plan: ExportPlan) -> dict[str, Any]:
        return {"files": f"{self.root}/{plan.version}/"}
