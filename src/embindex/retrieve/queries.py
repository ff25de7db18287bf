"""A query set as a Ray dataset of {query_id, query, reject}: JSONL or Parquet files, local or object storage.

A line that is not JSON, a row without an id, or an empty query text becomes a row with a `reject`
reason (it is reported in the results, never dropped); a repeated query id is rejected after its first
occurrence within a file.
"""

from __future__ import annotations

import json
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from ..config import QueriesConfig
from ..sources.readers import resolve_source_uri
from ..storage import fsspec_filesystem, strip_scheme

QUERY_SCHEMA = pa.schema([("query_id", pa.string()), ("query", pa.string()), ("reject", pa.string())])
_ID_FALLBACKS = ("_id", "query_id", "qid")


def list_query_files(cfg: QueriesConfig) -> tuple[list[str], str]:
    """(files, format) of the query set: one file, or the .jsonl/.parquet files under a folder/prefix."""
    uri = resolve_source_uri(cfg.uri)
    fs = fsspec_filesystem(uri, cfg.storage_options())
    root = strip_scheme(uri)
    files = sorted(fs.find(root)) if fs.isdir(root) else [root]
    fmt = cfg.format
    if fmt == "auto":
        fmt = "parquet" if all(f.endswith(".parquet") for f in files) else "jsonl"
    ext = (".parquet",) if fmt == "parquet" else (".jsonl", ".json", ".jsonl.gz")
    files = [f for f in files if f.endswith(ext)] if len(files) > 1 or fs.isdir(root) else files
    if not files:
        raise FileNotFoundError(f"no query files ({', '.join(ext)}) at {cfg.uri}")
    return files, fmt


def _row(raw: Any, cfg: QueriesConfig, seen: set[str]) -> dict[str, Any]:
    if not isinstance(raw, dict):
        return {"query_id": None, "query": None, "reject": "bad_query_row: not a JSON object"}
    qid = raw.get(cfg.id_column)
    if qid is None and cfg.id_column == "id":
        qid = next((raw[k] for k in _ID_FALLBACKS if raw.get(k) is not None), None)
    text = raw.get(cfg.text_column)
    row = {"query_id": None if qid is None else str(qid), "query": text if isinstance(text, str) else None,
           "reject": None}
    if row["query_id"] is None:
        row["reject"] = f"missing_id: no {cfg.id_column!r}"
    elif row["query_id"] in seen:
        row["reject"] = "duplicate_id"
    elif row["query"] is None or not row["query"].strip():
        row["reject"] = "empty_query"
    seen.add(row["query_id"])
    return row


def read_query_file(path: str, fmt: str, cfg: QueriesConfig) -> list[dict[str, Any]]:
    """The rows of one query file."""
    fs = fsspec_filesystem(resolve_source_uri(cfg.uri), cfg.storage_options())
    seen: set[str] = set()
    if fmt == "parquet":
        with fs.open(path, "rb") as f:
            return [_row(r, cfg, seen) for r in pq.read_table(f).to_pylist()]
    rows = []
    with fs.open(path, "rt", encoding="utf-8", compression="infer") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                raw = json.loads(line)
            except json.JSONDecodeError as e:
                rows.append({"query_id": None, "query": None, "reject": f"bad_json: {path} line {n}: {e.msg}"})
                continue
            rows.append(_row(raw, cfg, seen))
    return rows


def _read_batch(batch: pa.Table, fmt: str, cfg_json: str) -> pa.Table:
    cfg = QueriesConfig.model_validate_json(cfg_json)
    rows = [r for p in batch.column("path").to_pylist() for r in read_query_file(p, fmt, cfg)]
    return pa.Table.from_pylist(rows, schema=QUERY_SCHEMA)


def query_dataset(cfg: QueriesConfig):
    """The query set as a Ray dataset, one read task per file."""
    import ray.data

    files, fmt = list_query_files(cfg)
    ds = ray.data.from_items([{"path": p} for p in files], override_num_blocks=len(files))
    return ds.map_batches(_read_batch, batch_size=1, batch_format="pyarrow",
                          fn_kwargs={"fmt": fmt, "cfg_json": cfg.model_dump_json()})
