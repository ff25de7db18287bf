"""Web page corpora: HTML files (charset sniffing) and WARC archives written here with warcio's own
writer (gzipped and plain, truncated, corrupt), then one read of a folder through Ray Data with the
census and duplicate pass the build runs."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import pyarrow as pa
import pytest
from warcio.statusandheaders import StatusAndHeaders
from warcio.warcwriter import WARCWriter

from embindex.config import SourceConfig
from embindex.sources.census import take_census
from embindex.sources.fragments import read_fragment
from embindex.sources.normalize import NORMALIZED_SCHEMA, Reasons, RowRules, mark_duplicates
from embindex.sources.readers import open_corpus
from embindex.sources.web import decode_html, meta_charset, parse_content_type, parse_html_file, parse_warc

PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 64
RULES = RowRules(max_text_bytes=2000)


def rows_of(data: bytes, rules: RowRules = RULES) -> list[dict]:
    rows = list(parse_warc(io.BytesIO(data), "crawl.warc", rules))
    pa.Table.from_pylist(rows, schema=NORMALIZED_SCHEMA)  # every row has the normalized schema
    return rows


# ---- charsets -------------------------------------------------------------------------------------

def test_bom_wins_over_meta_and_header():
    page = "<meta charset=iso-8859-1><p>café</p>"
    assert decode_html(b"\xef\xbb\xbf" + page.encode("utf-8"), "iso-8859-1") == (page, None)
    assert decode_html(b"\xff\xfe" + page.encode("utf-16-le")) == (page, None)
    assert decode_html(b"\xfe\xff" + page.encode("utf-16-be")) == (page, None)


def test_meta_charset_both_forms_and_only_in_the_first_2k():
    assert meta_charset(b'<head><META Charset="Windows-1252">') == "windows-1252"
    assert meta_charset(b"<meta http-equiv='Content-Type' content='text/html; charset=Shift_JIS'>") == "shift_jis"
    late = b"<p>" + b"x" * 2100 + b'<meta charset="iso-8859-1">'
    assert meta_charset(late) is None
    assert decode_html(late + "é".encode("utf-8"))[0].endswith("é")  # so the default UTF-8 applies
    sjis = '<meta http-equiv="Content-Type" content="text/html; charset=shift_jis">日本語'.encode("shift_jis")
    assert decode_html(sjis)[0].endswith("日本語")


def test_latin1_page_and_http_header_precedence():
    latin = '<meta charset="iso-8859-1"><p>Ça coûte cinq francs, déjà</p>'
    assert decode_html(latin.encode("latin-1")) == (latin, None)
    # the HTTP header names the charset: it wins over the meta tag
    lying_meta = '<meta charset="utf-8"><p>naïve</p>'.encode("latin-1")
    assert decode_html(lying_meta, "iso-8859-1")[0].endswith("naïve</p>")
    assert decode_html(lying_meta)[0] is None  # by the meta tag it is not UTF-8
    assert parse_content_type('text/html; Charset="ISO-8859-1"') == ("text/html", "iso-8859-1")
    assert parse_content_type(None) == ("", None)


def test_undecodable_and_unknown_charsets_are_rejects():
    bad = parse_html_file(b"<p>caf\xe9 \xff</p>", "/c/a.html", "a.html", RULES)
    assert bad["reject"] == Reasons.INVALID_ENCODING and "utf-8" in bad["reject_detail"]
    assert bad["id"] == "a.html" and bad["text"] is None
    unknown = parse_html_file(b'<meta charset="klingon-8"><p>x</p>', "/c/b.html", "b.html", RULES)
    assert unknown["reject"] == Reasons.INVALID_ENCODING and "klingon-8" in unknown["reject_detail"]
    not_text = parse_html_file(b'<meta charset="base64"><p>x</p>', "/c/c.html", "c.html", RULES)
    assert not_text["reject"] == Reasons.INVALID_ENCODING
    assert "windows-1252" in decode_html(b"<p>\x81</p>", "windows-1252")[1]  # 0x81 is unassigned there
    ok = parse_html_file("<h1>Überschrift</h1>".encode(), "/c/d.html", "d.html", RULES)
    assert ok["reject"] is None and ok["modality"] == "text" and ok["text"] == "<h1>Überschrift</h1>"
    assert parse_html_file(b"  \n", "/c/e.html", "e.html", RULES)["reject"] == Reasons.EMPTY_TEXT


# ---- WARC -----------------------------------------------------------------------------------------

def response(w: WARCWriter, uri: str, body: bytes, ctype: str | None = "text/html; charset=utf-8",
             status: str = "200 OK"):
    headers = [("Content-Type", ctype)] if ctype else []
    http = StatusAndHeaders(status, headers + [("Content-Length", str(len(body)))], protocol="HTTP/1.1")
    return w.create_warc_record(uri, "response", payload=io.BytesIO(body), http_headers=http)


def write_warc(gz: bool, records=None) -> bytes:
    """A small crawl: 10 records, 8 of them responses (3 documents, 5 rejects)."""
    buf = io.BytesIO()
    w = WARCWriter(buf, gzip=gz)
    w.write_record(w.create_warcinfo_record("crawl.warc", {"software": "test-crawler"}))
    req = StatusAndHeaders("GET /a HTTP/1.1", [("Host", "example.com")], is_http_request=True)
    w.write_record(w.create_warc_record("http://example.com/a", "request", payload=io.BytesIO(b""),
                                        http_headers=req))
    for rec in records if records is not None else [
        response(w, "http://example.com/a", "<html><body><h1>Café</h1></body></html>".encode()),
        response(w, "http://example.com/latin", '<meta charset="iso-8859-1"><p>déjà vu</p>'.encode("latin-1"),
                 ctype="text/html"),
        response(w, "http://example.com/x.xhtml", b"<html xmlns='http://www.w3.org/1999/xhtml'><p>x</p></html>",
                 ctype="application/xhtml+xml"),
        response(w, "http://example.com/logo.png", PNG, ctype="image/png"),
        response(w, "http://example.com/gone", b"<html>Not Found</html>", status="404 Not Found"),
        response(w, "http://example.com/empty", b""),
        response(w, "http://example.com/big", b"<p>" + b"w" * 3000 + b"</p>"),
        response(w, "http://example.com/bytes", b"<p>\xff\xfe\xfa</p>"),
    ]:
        w.write_record(rec)
    return buf.getvalue()


@pytest.mark.parametrize("gz", [True, False])
def test_warc_response_records_become_documents_or_rejects(gz):
    rows = rows_of(write_warc(gz))
    assert len(rows) == 8  # the response records; warcinfo and request are not input rows
    by_id = {r["id"]: r for r in rows}
    docs = [r for r in rows if r["reject"] is None]
    assert len(docs) + sum(r["reject"] is not None for r in rows) == len(rows)
    assert {r["id"] for r in docs} == {"http://example.com/a", "http://example.com/latin",
                                       "http://example.com/x.xhtml"}
    a = by_id["http://example.com/a"]
    assert a["text"] == "<html><body><h1>Café</h1></body></html>" and a["modality"] == "text"
    assert a["source"] == "crawl.warc" and a["line"] == 3  # the third record of the file
    meta = json.loads(a["meta"])
    assert meta["url"] == "http://example.com/a" and meta["http_status"] == 200
    assert meta["content_type"] == "text/html; charset=utf-8"
    assert meta["warc_record_id"].startswith("<urn:uuid:") and meta["warc_date"].startswith("20")
    assert set(meta) == {"url", "warc_date", "content_type", "http_status", "warc_record_id"}
    assert by_id["http://example.com/latin"]["text"].endswith("<p>déjà vu</p>")
    expected = {"http://example.com/logo.png": (Reasons.NOT_HTML, "image/png"),
                "http://example.com/gone": (Reasons.HTTP_STATUS, "404"),
                "http://example.com/empty": (Reasons.EMPTY_TEXT, "empty"),
                "http://example.com/big": (Reasons.TEXT_TOO_LARGE, "max_text_bytes"),
                "http://example.com/bytes": (Reasons.INVALID_ENCODING, "utf-8")}
    for uri, (reason, detail) in expected.items():
        assert by_id[uri]["reject"] == reason and detail in by_id[uri]["reject_detail"], by_id[uri]


def test_other_record_types_are_skipped():
    buf = io.BytesIO()
    w = WARCWriter(buf, gzip=True)
    w.write_record(w.create_warc_record("http://example.com/m", "metadata", payload=io.BytesIO(b"k: v\r\n"),
                                        warc_content_type="application/warc-fields"))
    w.write_record(w.create_warc_record("http://example.com/r", "resource", payload=io.BytesIO(b"<p>r</p>"),
                                        warc_content_type="text/html"))
    w.write_record(w.create_revisit_record("http://example.com/a", "sha1:AAAA", "http://example.com/a",
                                           "2024-01-01T00:00:00Z"))
    assert rows_of(buf.getvalue()) == []
    assert rows_of(b"") == []


def test_a_url_fetched_twice_gives_two_rows_with_one_id():
    buf = io.BytesIO()
    w = WARCWriter(buf, gzip=True)
    for body in (b"<p>first fetch</p>", b"<p>second fetch</p>"):
        w.write_record(response(w, "http://example.com/twice", body))
    rows = rows_of(buf.getvalue())
    assert [r["id"] for r in rows] == ["http://example.com/twice"] * 2
    assert all(r["reject"] is None for r in rows)  # the corpus-wide duplicate pass rejects both (below)


@pytest.mark.parametrize("gz", [True, False])
def test_truncated_warc_keeps_the_records_read_and_adds_one_reject(gz):
    data = write_warc(gz)
    whole = rows_of(data)
    for cut in (len(data) - 30, len(data) * 2 // 3):
        rows = rows_of(data[:cut])
        assert rows[:-1] == whole[:len(rows) - 1]  # the records before the cut, unchanged
        assert 2 <= len(rows) <= len(whole)
        tail = rows[-1]
        assert tail["reject"] == Reasons.WARC_TRUNCATED and tail["id"] is None, tail
        assert "offset" in tail["reject_detail"] and tail["source"] == "crawl.warc"
        assert sum(r["reject"] in (Reasons.WARC_TRUNCATED, Reasons.WARC_UNREADABLE) for r in rows) == 1


def test_corrupt_warc_is_one_unreadable_reject_never_an_exception():
    data = write_warc(False)
    start = data.index(b"WARC/1", 100)  # the second record's header
    rows = rows_of(data[:start] + b"THIS IS NOT A WARC HEADER\r\n\r\n" + data[start:])
    assert rows[-1]["reject"] == Reasons.WARC_UNREADABLE and f"offset {start}" in rows[-1]["reject_detail"]
    assert len(rows) == 1
    assert rows_of(b"<html>not an archive</html>")[0]["reject"] == Reasons.WARC_UNREADABLE
    gz = bytearray(write_warc(True))
    gz[len(gz) // 2: len(gz) // 2 + 8] = b"\x00" * 8  # damage the deflate data inside a member
    rows = rows_of(bytes(gz))
    assert rows[-1]["reject"] in (Reasons.WARC_TRUNCATED, Reasons.WARC_UNREADABLE)
    assert sum(r["reject"] in (Reasons.WARC_TRUNCATED, Reasons.WARC_UNREADABLE) for r in rows) == 1


# ---- corpora --------------------------------------------------------------------------------------

def test_html_folder_is_detected_and_read(tmp_path):
    (tmp_path / "site" / "blog").mkdir(parents=True)
    (tmp_path / "site" / "index.html").write_bytes(b"<html><h1>Home</h1></html>")
    (tmp_path / "site" / "blog" / "post.HTM").write_bytes('<meta charset="latin1"><p>été</p>'.encode("latin-1"))
    (tmp_path / "site" / "blog" / "bad.html").write_bytes(b"<p>\xc3\x28</p>")
    corpus = open_corpus(SourceConfig(uri=str(tmp_path / "site")))
    assert corpus.format == "html"
    t = pa.concat_tables(read_fragment(f, corpus.fs, corpus.rules, corpus.root) for f in corpus.fragments)
    rows = {r["id"]: r for r in t.to_pylist()}
    assert rows["index.html"]["text"] == "<html><h1>Home</h1></html>"
    assert rows["blog/post.HTM"]["text"].endswith("<p>été</p>")
    assert rows["blog/bad.html"]["reject"] == Reasons.INVALID_ENCODING
    only = SourceConfig(uri=str(tmp_path / "site"), html_extensions=[".htm"], format="html")
    assert [r["id"] for r in _read(only)] == ["blog/post.HTM"]


def _read(cfg: SourceConfig) -> list[dict]:
    corpus = open_corpus(cfg)
    return pa.concat_tables(read_fragment(f, corpus.fs, corpus.rules, corpus.root)
                            for f in corpus.fragments).to_pylist()


def test_warc_folder_through_ray_with_the_duplicate_pass(ray_cluster, tmp_path):
    crawl = tmp_path / "crawl"
    crawl.mkdir()
    (crawl / "a.warc.gz").write_bytes(write_warc(True))
    buf = io.BytesIO()
    w = WARCWriter(buf, gzip=False)
    w.write_record(response(w, "http://example.com/a", b"<p>fetched again</p>"))  # also in a.warc.gz
    w.write_record(response(w, "http://example.com/b", b"<p>only here</p>"))
    (crawl / "b.warc").write_bytes(buf.getvalue())
    cut = write_warc(True)
    (crawl / "c.warc.gz").write_bytes(cut[: len(cut) - 30])

    cfg = SourceConfig(uri=str(crawl), fragment_files=100, max_text_bytes=2000)
    corpus = open_corpus(cfg)
    assert corpus.format == "warc" and len(corpus.fragments) == 3  # one fragment per WARC file
    ds = corpus.dataset().materialize()  # read once, counted and checked below
    census = take_census(ds, len(corpus.fragments))
    assert census.rows_in == 8 + 2 + 8  # c: 7 responses read + one warc_truncated row
    assert census.duplicates == {"http://example.com/a", "http://example.com/latin",
                                 "http://example.com/x.xhtml"}  # a.warc.gz and c.warc.gz share pages
    t = mark_duplicates(pa.concat_tables(ds.iter_batches(batch_format="pyarrow", batch_size=None)),
                        census.duplicates)
    rows = t.to_pylist()
    assert len(rows) == census.rows_in
    docs = [r["id"] for r in rows if r["reject"] is None]
    assert docs == ["http://example.com/b"]
    twice = [r for r in rows if r["id"] == "http://example.com/a"]
    assert len(twice) == 3 and {r["reject"] for r in twice} == {Reasons.DUPLICATE_ID}
    assert sum(r["reject"] == Reasons.WARC_TRUNCATED for r in rows) == 1

    # the fragment id follows the file: a rewritten WARC gets a new one, the others keep theirs
    before = {f.paths[0]: f.id for f in corpus.fragments}
    path = crawl / "b.warc"
    path.write_bytes(path.read_bytes() + write_warc(False, records=[]))
    os.utime(path, ns=(1, 1))
    after = {f.paths[0]: f.id for f in open_corpus(cfg).fragments}
    changed = {Path(p).name for p in before if before[p] != after[p]}
    assert changed == {"b.warc"}
