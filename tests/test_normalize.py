"""Row validation: every kind of bad row becomes a reject with its reason; good rows carry metadata."""

import gzip
import json

import pytest

from embindex.sources.normalize import (
    Reasons,
    RowRules,
    mark_duplicates,
    normalize_record,
    parse_jsonl,
    parse_text_file,
    to_table,
)

RULES = RowRules(max_text_bytes=100)


@pytest.mark.parametrize(
    "record,reason",
    [
        ({"text": "hello"}, Reasons.MISSING_ID),
        ({"id": None, "text": "hello"}, Reasons.MISSING_ID),
        ({"id": "", "text": "hello"}, Reasons.EMPTY_ID),
        ({"id": "  ", "text": "hello"}, Reasons.EMPTY_ID),
        ({"id": 7, "text": "hello"}, Reasons.ID_NOT_STRING),
        ({"id": "a"}, Reasons.MISSING_TEXT),
        ({"id": "a", "text": ""}, Reasons.EMPTY_TEXT),
        ({"id": "a", "text": " \n\t"}, Reasons.EMPTY_TEXT),
        ({"id": "a", "text": 3.5}, Reasons.TEXT_NOT_STRING),
        ({"id": "a", "text": b"\xff\xfe bad"}, Reasons.INVALID_UTF8),
        ({"id": "a", "text": "x" * 101}, Reasons.TEXT_TOO_LARGE),
        ({"id": "a", "text": "é" * 51}, Reasons.TEXT_TOO_LARGE),  # 102 bytes: the limit is in bytes
        ({"id": "a", "text": "bad \ud800 surrogate"}, Reasons.INVALID_UTF8),
    ],
)
def test_bad_rows_get_their_reason(record, reason):
    row = normalize_record(record, RULES, "src", 3)
    assert row["reject"] == reason
    assert row["reject_detail"]
    assert row["text"] is None and row["source"] == "src" and row["line"] == 3


def test_good_row_keeps_metadata_and_hash():
    row = normalize_record({"id": "a", "text": "hello", "lang": "en", "n": 2}, RULES)
    assert row["reject"] is None
    assert json.loads(row["meta"]) == {"lang": "en", "n": 2}
    assert len(row["content_hash"]) == 32
    assert row["content_hash"] == normalize_record({"id": "b", "text": "hello"}, RULES)["content_hash"]


def test_metadata_columns_selects():
    rules = RowRules(metadata_columns=("lang",))
    row = normalize_record({"id": "a", "text": "hello", "lang": "en", "n": 2}, rules)
    assert json.loads(row["meta"]) == {"lang": "en"}


def test_jsonl_every_line_accounted():
    lines = [
        json.dumps({"id": "a", "text": "alpha"}).encode(),
        b"",  # blank lines are not rows
        b"{not json",
        b"[1, 2]",
        b'{"id": "b", "text": "\xff\xfe"}',
        json.dumps({"id": "c", "text": ""}).encode(),
    ]
    data = b"\n".join(lines) + b"\n"
    for payload in (data, gzip.compress(data)):
        rows = list(parse_jsonl(payload, "f.jsonl", RULES))
        assert [r["reject"] for r in rows] == [None, Reasons.INVALID_JSON, Reasons.NOT_AN_OBJECT,
                                                Reasons.INVALID_UTF8, Reasons.EMPTY_TEXT]
        assert [r["line"] for r in rows] == [1, 3, 4, 5, 6]


def test_corrupt_gzip_is_one_reject():
    rows = list(parse_jsonl(b"\x1f\x8b\x08\x00garbage", "f.jsonl.gz", RULES))
    assert len(rows) == 1 and rows[0]["reject"] == Reasons.UNREADABLE_FILE


def test_text_file_invalid_utf8():
    assert parse_text_file(b"\xc3\x28", "/c/a.txt", "a.txt", RULES)["reject"] == Reasons.INVALID_UTF8
    ok = parse_text_file("héllo".encode(), "/c/a.txt", "a.txt", RULES)
    assert ok["reject"] is None and ok["id"] == "a.txt"


def test_mark_duplicates_rejects_every_occurrence():
    t = to_table([normalize_record({"id": i, "text": "t"}, RULES) for i in ["a", "b", "a", "c"]])
    out = mark_duplicates(t, {"a"}).to_pylist()
    assert [r["reject"] for r in out] == [Reasons.DUPLICATE_ID, None, Reasons.DUPLICATE_ID, None]
