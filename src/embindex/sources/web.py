"""Web page corpora: folders of HTML files and WARC archives (web crawls).

Rows hold the page's HTML as text (decoded to str, markup kept) for a later HTML -> Markdown stage.
The charset comes from a byte order mark, else the HTTP Content-Type header (WARC only), else a
`<meta charset>` / `<meta http-equiv="Content-Type">` tag in the first 2 KiB, else UTF-8; a page that
does not decode with it, or names an unknown charset, is rejected (`invalid_encoding`).

A WARC file is read as one stream (it cannot be split without scanning it), so each file is one
fragment. Each `response` record is one input row: an HTML page with a 2xx status becomes a document
whose id is its `WARC-Target-URI`, any other response a reject (`http_status`, `not_html`, or a text
reason). Other record types (warcinfo, request, metadata, revisit, resource) are not input rows. A file
that ends early or cannot be parsed keeps the rows read so far and adds one reject row for the file
(`warc_truncated` / `warc_unreadable`, with the record's byte offset), so rows in = response records
read + that one row.
"""

from __future__ import annotations

import codecs
import re
from typing import Any, BinaryIO, Iterator

from warcio.archiveiterator import ArchiveIterator

from .normalize import Reasons, RowRules, normalize_record, reject_row

HTML_TYPES = ("text/html", "application/xhtml+xml")
SNIFF_BYTES = 2048  # where a <meta> charset declaration must be
BOMS = ((codecs.BOM_UTF8, "utf-8"), (codecs.BOM_UTF16_LE, "utf-16-le"), (codecs.BOM_UTF16_BE, "utf-16-be"))
_META_CHARSET = re.compile(rb"""<meta\b[^>]*?charset\s*=\s*["']?\s*([A-Za-z0-9._:\-]+)""", re.IGNORECASE)


def bom_charset(data: bytes) -> tuple[str, int] | None:
    """(charset, BOM length) when `data` starts with a UTF-8 or UTF-16 byte order mark."""
    for bom, name in BOMS:
        if data.startswith(bom):
            return name, len(bom)
    return None


def meta_charset(data: bytes) -> str | None:
    """The charset named by a `<meta charset>` or `<meta http-equiv="Content-Type" content="...;
    charset=...">` tag within the first 2 KiB, if any."""
    m = _META_CHARSET.search(data[:SNIFF_BYTES])
    return m.group(1).decode("ascii").lower() if m else None


def parse_content_type(value: str | None) -> tuple[str, str | None]:
    """An HTTP Content-Type value -> (lowercase media type, charset parameter or None)."""
    if not value:
        return "", None
    mime, *params = value.split(";")
    charset = None
    for p in params:
        key, _, v = p.partition("=")
        if key.strip().lower() == "charset" and v.strip().strip("\"'"):
            charset = v.strip().strip("\"'").lower()
    return mime.strip().lower(), charset


def decode_html(data: bytes, header_charset: str | None = None) -> tuple[str | None, str | None]:
    """Decode an HTML page: (text, None), or (None, why) when the charset is unknown or the bytes do not
    decode with it. Precedence: BOM, then `header_charset` (HTTP), then the meta tag, then UTF-8."""
    bom = bom_charset(data)
    if bom:
        charset, where, data = bom[0], "byte order mark", data[bom[1]:]
    elif header_charset:
        charset, where = header_charset, "HTTP Content-Type"
    else:
        charset, where = meta_charset(data), "meta tag"
        if charset and charset.replace("_", "-").startswith("utf-16"):
            charset = "utf-8"  # a meta tag readable as ASCII means the page is not UTF-16 (as browsers do)
        charset, where = (charset, where) if charset else ("utf-8", "default")
    try:
        return data.decode(charset), None
    except LookupError:
        return None, f"unknown charset {charset!r} ({where})"
    except UnicodeDecodeError as e:
        return None, f"not valid {charset} ({where}): {e.reason} at byte {e.start}"
    except (UnicodeError, ValueError) as e:
        return None, f"cannot decode as {charset!r} ({where}): {e}"


def parse_html_file(data: bytes, path: str, doc_id: str, rules: RowRules) -> dict[str, Any]:
    """One document per HTML file; its id is the path relative to the corpus root, its text the HTML."""
    text, why = decode_html(data)
    if text is None:
        return reject_row(doc_id, Reasons.INVALID_ENCODING, why or "", path, None)
    return normalize_record({rules.id_column: doc_id, rules.text_column: text}, rules, path, None)


def _response_row(rec: Any, body: bytes, path: str, line: int, rules: RowRules) -> dict[str, Any]:
    """The row of one WARC response record whose body has been read."""
    uri = rec.rec_headers.get_header("WARC-Target-URI")
    http = rec.http_headers
    status = http.get_statuscode() if http else None
    ctype = http.get_header("Content-Type") if http else rec.rec_headers.get_header("Content-Type")
    code = int(status) if status and status.isdigit() else None
    if http is not None and not (code and 200 <= code < 300):
        return reject_row(uri, Reasons.HTTP_STATUS, f"HTTP status {status}", path, line)
    mime, charset = parse_content_type(ctype)
    if mime not in HTML_TYPES:
        return reject_row(uri, Reasons.NOT_HTML, f"content type {ctype or '(none)'}", path, line)
    text, why = decode_html(body, charset)
    if text is None:
        return reject_row(uri, Reasons.INVALID_ENCODING, why or "", path, line)
    record = {rules.id_column: uri, rules.text_column: text, "url": uri,
              "warc_date": rec.rec_headers.get_header("WARC-Date"), "content_type": ctype,
              "http_status": code,
              "warc_record_id": rec.rec_headers.get_header("WARC-Record-ID")}
    return normalize_record(record, rules, path, line)


def _read_block(rec: Any) -> tuple[bytes, int]:
    """(the HTTP payload of a response record, decoded from chunked/compressed transfer; b"" for other
    records), and how many bytes of the record block are missing (the file ended inside it)."""
    body = rec.content_stream().read() if rec.rec_type == "response" else b""
    while rec.raw_stream.read(1 << 16):  # the rest of the block
        pass
    return body, getattr(rec.raw_stream, "limit", 0)


def parse_warc(stream: BinaryIO, path: str, rules: RowRules) -> Iterator[dict[str, Any]]:
    """One normalized row per `response` record of a WARC stream (gzipped or not); `line` is the record's
    1-based position among all records of the file. A truncated or corrupt file ends with one
    `warc_truncated` / `warc_unreadable` reject; read errors of the stream itself (OSError) propagate."""
    it = ArchiveIterator(stream)
    records = iter(it)
    n = 0
    while True:
        try:
            rec = next(records, None)
            if rec is None:
                break
            offset = it.offset
            if rec.rec_type is None or rec.length is None:
                reason = Reasons.WARC_TRUNCATED if not rec.raw_stream.read(1) else Reasons.WARC_UNREADABLE
                yield reject_row(None, reason, f"record {n + 1} at offset {offset}: header without WARC-Type "
                                 "or Content-Length", path, n + 1)
                return
            body, missing = _read_block(rec)
        except OSError:
            raise  # the storage, not the archive: the caller retries the file
        except Exception as e:  # warcio fails on corrupt bytes in many ways (parse, zlib, attribute errors)
            yield reject_row(None, Reasons.WARC_UNREADABLE, f"record {n + 1} at offset {it.offset}: "
                             f"{type(e).__name__}: {str(e).strip()[:300]}", path, n + 1)
            return
        n += 1
        if missing:
            yield reject_row(None, Reasons.WARC_TRUNCATED, f"record {n} ({rec.rec_type} "
                             f"{rec.rec_headers.get_header('WARC-Target-URI') or ''}) at offset {offset} ends "
                             f"{missing} bytes before its Content-Length", path, n)
            return
        if rec.rec_type == "response":
            yield _response_row(rec, body, path, n, rules)
    offset = it.offset
    if it.fh.tell() > offset or it.fh.read(1):
        yield reject_row(None, Reasons.WARC_TRUNCATED, f"bytes at offset {offset} after record {n} are not a "
                         "complete record (file cut short?)", path, n + 1)
