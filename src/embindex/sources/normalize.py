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
        pa.field("image", pa.binary()),  # encoded image bytes (image rows), null for text rows
        pa.field("modality", pa.string()),  # "text" | "image"; null for a reject
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
    IMAGE_UNREADABLE = "image_unreadable"
    IMAGE_TOO_LARGE = "image_too_large"
    IMAGE_UNSUPPORTED = "image_unsupported"
    UNSUPPORTED_MODALITY = "unsupported_modality"
    # web pages (web.py): a charset that is unknown or does not decode the page; WARC response records
    # that are not a 2xx HTML page; a WARC file cut short or unparsable (one row for the file)
    INVALID_ENCODING = "invalid_encoding"
    NOT_HTML = "not_html"
    HTTP_STATUS = "http_status"
    WARC_TRUNCATED = "warc_truncated"
    WARC_UNREADABLE = "warc_unreadable"
    # set by the embed actor: a row that alone does not fit the device, a model output that is not finite
    TOO_LARGE_FOR_DEVICE = "too_large_for_device"
    NON_FINITE = "non_finite"


@dataclass(frozen=True)
class RowRules:
    id_column: str = "id"
    text_column: str = "text"
    metadata_columns: tuple[str, ...] | None = None
    max_text_bytes: int = 1_000_000
    image_column: str | None = None
    image_root: str | None = None  # filesystem path image references must lie under (None: the corpus root)
    max_image_bytes: int = 32_000_000
    image_extensions: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff")


def content_hash(content: str | bytes) -> str:
    data = content.encode("utf-8") if isinstance(content, str) else content
    return hashlib.sha256(data).hexdigest()[:32]


def _json_default(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    if hasattr(value, "isoformat"):
        return value.isoformat()
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)


def _meta_json(record: dict[str, Any], rules: RowRules, image_row: bool = False) -> str | None:
    # an image row keeps its text column (e.g. a caption) as metadata
    skip = {rules.id_column, rules.image_column} if image_row else {rules.id_column, rules.text_column,
                                                                    rules.image_column}
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
        "image": None,
        "modality": None,
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
    image = record.get(rules.image_column) if rules.image_column else None
    if image is not None:
        return _image_record(rid, image, record, rules, source, line)
    text = record.get(rules.text_column)
    if text is None:
        also = f" nor an image in {rules.image_column!r}" if rules.image_column else ""
        return reject_row(rid, Reasons.MISSING_TEXT, f"no value in column {rules.text_column!r}{also}", source, line)
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
        "image": None,
        "modality": "text",
        "content_hash": content_hash(text),
        "meta": _meta_json(record, rules),
        "source": source,
        "line": line,
        "reject": None,
        "reject_detail": None,
    }


def _image_payload(value: Any) -> tuple[bytes | None, str | None]:
    """(bytes, reference) from an image cell: bytes, a path/URI string, or a {bytes, path} struct."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value), None
    if isinstance(value, str):
        return None, value
    if isinstance(value, dict):
        data, path = value.get("bytes"), value.get("path")
        if isinstance(data, (bytes, bytearray)) and data:
            return bytes(data), None
        if isinstance(path, str) and path:
            return None, path
    return None, None


def _image_record(rid: str, image: Any, record: dict[str, Any], rules: RowRules, source: str | None,
                  line: int | None) -> dict[str, Any]:
    """An image row: its bytes, or `image_ref` (a path read by the fragment reader, `load_image_refs`)."""
    data, ref = _image_payload(image)
    if data is None and ref is None:
        return reject_row(rid, Reasons.IMAGE_UNREADABLE, f"column {rules.image_column!r} holds "
                          f"{type(image).__name__}; expected bytes, a path/URI or a {{bytes, path}} struct",
                          source, line)
    row = {"id": rid, "text": None, "image": None, "modality": "image", "content_hash": None,
           "meta": _meta_json(record, rules, image_row=True), "source": source, "line": line,
           "reject": None, "reject_detail": None}
    if ref is not None:
        row["image_ref"] = ref
        return row
    return set_image_bytes(row, data, rules)


def set_image_bytes(row: dict[str, Any], data: bytes, rules: RowRules) -> dict[str, Any]:
    """Attach encoded image bytes to an image row, or turn it into a reject when they are empty or too large."""
    if not data:
        return reject_row(row["id"], Reasons.IMAGE_UNREADABLE, "image is empty (0 bytes)", row["source"], row["line"])
    if len(data) > rules.max_image_bytes:
        return reject_row(row["id"], Reasons.IMAGE_TOO_LARGE, f"image has {len(data)} bytes > max_image_bytes "
                          f"{rules.max_image_bytes}", row["source"], row["line"])
    row.update(image=data, content_hash=content_hash(data))
    return row


def parse_image_file(data: bytes, path: str, doc_id: str, rules: RowRules) -> dict[str, Any]:
    """One image row per image file; its id is the path relative to the corpus root."""
    row = {"id": doc_id, "text": None, "image": None, "modality": "image", "content_hash": None, "meta": None,
           "source": path, "line": None, "reject": None, "reject_detail": None}
    return set_image_bytes(row, data, rules)


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
    yield from parse_jsonl_lines(enumerate(data.split(b"\n"), start=1), path, rules)


def parse_jsonl_lines(lines: Iterable[tuple[int, bytes]], path: str, rules: RowRules) -> Iterator[dict[str, Any]]:
    """One normalized row per non-blank (line number, raw bytes) pair of a JSONL file."""
    for lineno, raw in lines:
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


def with_rejects(table: pa.Table, rejects: dict[int, tuple[str, str]]) -> pa.Table:
    """Set `reject` / `reject_detail` of the given rows (row position -> (reason, detail))."""
    if not rejects:
        return table
    reason, detail = table.column("reject").to_pylist(), table.column("reject_detail").to_pylist()
    for i, (r, d) in rejects.items():
        reason[i], detail[i] = r, d
    for name, values in (("reject", reason), ("reject_detail", detail)):
        pos = table.schema.get_field_index(name)
        table = table.set_column(pos, name, pa.array(values, table.schema.field(pos).type))
    return table


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
        "image": pc.if_else(hit, pa.scalar(None, pa.binary()), table.column("image")),
        "modality": pc.if_else(hit, pa.scalar(None, pa.string()), table.column("modality")),
        "content_hash": pc.if_else(hit, pa.scalar(None, pa.string()), table.column("content_hash")),
        "meta": pc.if_else(hit, pa.scalar(None, pa.string()), table.column("meta")),
    }
    for name, col in replace.items():
        table = table.set_column(table.schema.get_field_index(name), name, col)
    return table
