"""Row normalization: raw corpus records -> documents or reject records with a reason.

Every input row leaves this step exactly once, either as a document (`reject` null) or as a reject
(`reject` set), so rows in = documents + rejects holds by construction.
"""

from __future__ import annotations

import gzip
import hashlib
import json
from dataclasses import dataclass
from typing import Any, Iterable, Iterator

import pyarrow as pa

# The normalized row schema that flows from the readers to the embed stage.
NORMALIZED_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string()),
        pa.field("text", pa.string()),
        pa.field("content_hash", pa.string()),
        pa.field("meta", pa.string()),  # JSON object of the row's other columns
        pa.field("source", pa.string()),  # file the row came from
        pa.field("line", pa.int64()),  # 1-based line for JSONL, row number otherwise (may be null)
        pa.field("reject", pa.string()),  # reason code, null for a document
        pa.field("reject_detail", pa.string()),
    ]
)

PREVIEW_CHARS = 200


class Reasons:
    MISSING_ID = "missing_id"
    EMPTY_ID = "empty_id"
    ID_NOT_STRING = "id_not_string"
    MISSING_TEXT = "missing_text"
    EMPTY_TEXT = "empty_text"
    TEXT_NOT_STRING = "text_not_string"
    INVALID_UTF8 = "invalid_utf8"
    TEXT_TOO_LARGE = "text_too_large"
    DUPLICATE_ID = "duplicate_id"
    INVALID_JSON = "invalid_json"
    NOT_AN_OBJECT = "not_an_object"
    UNREADABLE_FILE = "unreadable_file"


@dataclass(frozen=True)
class RowRules:
    id_column: str = "id"
    text_column: str = "text"
    metadata_columns: tuple[str, ...] | None = None
    max_text_bytes: int = 1_000_000


def content_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:32]


def _json_default(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    if hasattr(value, "isoformat"):
        return value.isoformat()
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)


def _meta_json(record: dict[str, Any], rules: RowRules) -> str | None:
    skip = {rules.id_column, rules.text_column}
    if rules.metadata_columns is None:
        meta = {k: v for k, v in record.items() if k not in skip}
    else:
        meta = {k: record.get(k) for k in rules.metadata_columns}
    return json.dumps(meta, ensure_ascii=False, default=_json_default) if meta else None


def reject_row(id_value: Any, reason: str, detail: str, source: str | None, line: int | None) -> dict[str, Any]:
    rid = id_value if isinstance(id_value, str) else (None if id_value is None else str(id_value))
    return {
        "id": rid,
        "text": None,
        "content_hash": None,
        "meta": None,
        "source": source,
        "line": line,
        "reject": reason,
        "reject_detail": detail,
    }


def normalize_record(
    record: dict[str, Any], rules: RowRules, source: str | None = None, line: int | None = None
) -> dict[str, Any]:
    """Validate one raw record and return a normalized row (a document or a reject)."""
    rid = record.get(rules.id_column)
    if rid is None:
        return reject_row(None, Reasons.MISSING_ID, f"no value in column {rules.id_column!r}", source, line)
    if not isinstance(rid, str):
        return reject_row(rid, Reasons.ID_NOT_STRING, f"id is {type(rid).__name__}, expected a string", source, line)
    if not rid.strip():
        return reject_row(rid, Reasons.EMPTY_ID, "id is empty", source, line)
    text = record.get(rules.text_column)
    if text is None:
        return reject_row(rid, Reasons.MISSING_TEXT, f"no value in column {rules.text_column!r}", source, line)
    if isinstance(text, (bytes, bytearray)):
        try:
            text = bytes(text).decode("utf-8")
        except UnicodeDecodeError as e:
            return reject_row(rid, Reasons.INVALID_UTF8, f"text is not valid UTF-8 ({e.reason} at byte {e.start})",
                           source, line)
    if not isinstance(text, str):
        return reject_row(rid, Reasons.TEXT_NOT_STRING, f"text is {type(text).__name__}, expected a string",
                       source, line)
    if not text.strip():
        return reject_row(rid, Reasons.EMPTY_TEXT, "text is empty or whitespace", source, line)
    n_bytes = len(text.encode("utf-8", errors="surrogatepass"))
    if n_bytes > rules.max_text_bytes:
        return reject_row(rid, Reasons.TEXT_TOO_LARGE, f"text has {n_bytes} bytes > max_text_bytes "
                       f"{rules.max_text_bytes}", source, line)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return reject_row(rid, Reasons.INVALID_UTF8, "text holds lone surrogates (not valid UTF-8)", source, line)
    return {
        "id": rid,
        "text": text,
        "content_hash": content_hash(text),
        "meta": _meta_json(record, rules),
        "source": source,
        "line": line,
        "reject": None,
        "reject_detail": None,
    }


def to_table(rows: Iterable[dict[str, Any]]) -> pa.Table:
    return pa.Table.from_pylist(list(rows), schema=NORMALIZED_SCHEMA)


def _maybe_gunzip(data: bytes, path: str) -> bytes:
    # Ray's binary reader already inflates files named *.gz; look at the bytes, not the name.
    if data[:2] == b"\x1f\x8b":
        return gzip.decompress(data)
    return data


def parse_jsonl(data: bytes, path: str, rules: RowRules) -> Iterator[dict[str, Any]]:
    """One normalized row per non-blank line of a JSONL (optionally gzipped) file."""
    try:
        data = _maybe_gunzip(data, path)
    except (OSError, EOFError) as e:
        yield reject_row(None, Reasons.UNREADABLE_FILE, f"cannot decompress: {e}", path, None)
        return
    for lineno, raw in enumerate(data.split(b"\n"), start=1):
        if not raw.strip():
            continue
        try:
            text_line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            yield reject_row(None, Reasons.INVALID_UTF8, f"line is not valid UTF-8 ({e.reason} at byte {e.start})",
                          path, lineno)
            continue
        try:
            record = json.loads(text_line)
        except json.JSONDecodeError as e:
            yield reject_row(None, Reasons.INVALID_JSON, f"{e.msg} at column {e.colno}", path, lineno)
            continue
        if not isinstance(record, dict):
            yield reject_row(None, Reasons.NOT_AN_OBJECT, f"line holds a JSON {type(record).__name__}", path, lineno)
            continue
        yield normalize_record(record, rules, path, lineno)


def parse_text_file(data: bytes, path: str, doc_id: str, rules: RowRules) -> dict[str, Any]:
    """One document per text file; its id is the path relative to the corpus root."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        return reject_row(doc_id, Reasons.INVALID_UTF8, f"file is not valid UTF-8 ({e.reason} at byte {e.start})",
                       path, None)
    return normalize_record({rules.id_column: doc_id, rules.text_column: text}, rules, path, None)


def mark_duplicates(table: pa.Table, duplicate_ids: frozenset[str] | set[str]) -> pa.Table:
    """Turn documents whose id occurs more than once in the corpus into duplicate_id rejects
    (every other column, e.g. `fragment`, is kept)."""
    if not duplicate_ids or table.num_rows == 0:
        return table
    import pyarrow.compute as pc

    hit = pc.and_(pc.is_null(table.column("reject")),
                  pc.fill_null(pc.is_in(table.column("id"), value_set=pa.array(sorted(duplicate_ids), pa.string())),
                               False))
    if not pc.any(hit).as_py():
        return table
    detail = "id occurs more than once among valid rows; every occurrence is rejected"
    replace = {
        "reject": pc.if_else(hit, Reasons.DUPLICATE_ID, table.column("reject")),
        "reject_detail": pc.if_else(hit, detail, table.column("reject_detail")),
        "text": pc.if_else(hit, pa.scalar(None, pa.string()), table.column("text")),
        "content_hash": pc.if_else(hit, pa.scalar(None, pa.string()), table.column("content_hash")),
        "meta": pc.if_else(hit, pa.scalar(None, pa.string()), table.column("meta")),
    }
    for name, col in replace.items():
        table = table.set_column(table.schema.get_field_index(name), name, col)
    return table
