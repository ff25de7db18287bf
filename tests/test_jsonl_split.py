"""Big plain JSONL files split into newline-aligned byte-range fragments: the range/line rule on tricky
files, stable ids, gzip files kept whole, and an end-to-end build from the loopback S3 server equal to
the same corpus read as one fragment."""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import random

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

import embindex
from conftest import job_config, sample_docs
from embindex.sources.fragments import plan_jsonl_file, read_fragment
from embindex.sources.jsonl_ranges import byte_ranges, read_range_lines, scan_range
from embindex.sources.normalize import Reasons, RowRules

TRICKY = {
    "trailing_newline": b'{"id":"a"}\n{"id":"b"}\n{"id":"c"}\n',
    "no_trailing_newline": b'{"id":"a"}\n{"id":"b"}\n{"id":"c"}',
    "crlf": b'{"id":"a"}\r\n{"id":"b"}\r\n\r\n{"id":"c"}\r\n',
    "empty_lines": b'\n\n{"id":"a"}\n\n\n{"id":"b"}\n\n',
    "long_line": b'{"id":"s"}\n' + b'{"id":"' + b"x" * 60 + b'"}\n{"id":"t"}\n' + b"z" * 40,
    "only_newlines": b"\n\n\n",
    "one_line": b'{"id":"only"}',
}


def expected_lines(data: bytes) -> list[tuple[int, bytes]]:
    """What the whole-file reader sees: every `\\n`-separated line with its 1-based number."""
    lines = data.split(b"\n")
    if data.endswith(b"\n"):
        lines.pop()
    return list(enumerate(lines, start=1))


def split_read(fs: pafs.FileSystem, path: str, size: int, fragment_bytes: int) -> list[list[tuple[int, bytes]]]:
    """Each range's lines, with first-line numbers from the per-range newline counts."""
    out, line = [], 1
    for start, end in byte_ranges(size, fragment_bytes):
        out.append(read_range_lines(fs, path, start, end, line))
        line += scan_range(fs, path, start, end).newlines
    return out


@pytest.mark.parametrize("name", sorted(TRICKY))
def test_every_line_read_exactly_once_with_its_line_number(tmp_path, name):
    data = TRICKY[name]
    path = tmp_path / "f.jsonl"
    path.write_bytes(data)
    fs = pafs.LocalFileSystem()
    want = expected_lines(data)
    for fragment_bytes in range(1, len(data) + 2):  # every boundary position, incl. on and after a `\n`
        parts = split_read(fs, str(path), len(data), fragment_bytes)
        got = [x for part in parts for x in part]
        assert got == want, (name, fragment_bytes)


def test_random_files_and_range_sizes(tmp_path):
    rng = random.Random(3)
    fs = pafs.LocalFileSystem()
    for trial in range(40):
        data = bytes(rng.choice(b"ab\r\n\n{}") for _ in range(rng.randint(0, 200)))
        path = tmp_path / f"r{trial}.jsonl"
        path.write_bytes(data)
        for fragment_bytes in (1, 2, 3, 7, 16, 64):
            got = [x for part in split_read(fs, str(path), len(data), fragment_bytes) for x in part]
            assert got == expected_lines(data), (data, fragment_bytes)


def _rows(n: int, bad_at: dict[int, bytes]) -> bytes:
    """n lines of JSONL; line numbers (1-based) in `bad_at` hold the given raw bytes instead."""
    lines = [bad_at.get(i, json.dumps({"id": f"d{i}", "text": f"row {i}"}).encode()) for i in range(1, n + 1)]
    return b"\n".join(lines) + b"\n"


def test_plan_and_read_fragments_report_true_line_numbers(tmp_path):
    bad = {7: b"{broken", 23: b"42", 24: b"", 40: b'{"id": "u", "text": "\xc3\x28"}'}
    data = _rows(50, bad)
    path = tmp_path / "c.jsonl"
    path.write_bytes(data)
    fs = pafs.LocalFileSystem()
    info = fs.get_file_info(str(path))
    frags = plan_jsonl_file(fs, info, fragment_bytes=97)
    assert len(frags) == -(-len(data) // 97) and len({f.id for f in frags}) == len(frags)
    assert [f.byte_range for f in frags] == [tuple(r) for r in byte_ranges(len(data), 97)]
    tables = [read_fragment(f, fs, RowRules(), str(tmp_path)) for f in frags]
    rows = pa.concat_tables(tables)
    assert rows.num_rows == 49  # 50 lines, one blank
    lines = rows.column("line").to_pylist()
    assert lines == sorted(lines) and len(set(lines)) == 49
    by_line = dict(zip(lines, rows.column("reject").to_pylist()))
    assert by_line[7] == Reasons.INVALID_JSON and by_line[23] == Reasons.NOT_AN_OBJECT
    assert by_line[40] == Reasons.INVALID_UTF8 and 24 not in by_line
    docs = rows.filter(pa.compute.is_null(rows.column("reject")))
    assert all(i == f"d{n}" for i, n in zip(docs.column("id").to_pylist(), docs.column("line").to_pylist()))
    # every fragment's rows carry its id, in plan order
    assert [t.column("fragment")[0].as_py() for t in tables if t.num_rows] == [
        f.id for f, t in zip(frags, tables) if t.num_rows]


def test_fragment_ids_deterministic_and_small_files_unchanged(tmp_path):
    fs = pafs.LocalFileSystem()
    big, small = tmp_path / "big.jsonl", tmp_path / "small.jsonl"
    big.write_bytes(_rows(60, {}))
    small.write_bytes(_rows(3, {}))
    b_info, s_info = fs.get_file_info([str(big), str(small)])
    first = plan_jsonl_file(fs, b_info, fragment_bytes=200)
    again = plan_jsonl_file(fs, fs.get_file_info(str(big)), fragment_bytes=200)
    assert len(first) >= 3 and first == again  # a resumed run plans the same fragments
    # a file that fits keeps the id every earlier version gave it (existing runs resume)
    (frag,) = plan_jsonl_file(fs, s_info, fragment_bytes=200)
    h = hashlib.sha256(b"jsonl")
    h.update(f"\0{s_info.path}\0{s_info.size}\0{s_info.mtime_ns}".encode())
    h.update(json.dumps(None).encode())
    assert frag.id == h.hexdigest()[:24] and frag.byte_range == ()


def test_gzip_is_one_fragment_and_says_so(tmp_path, caplog):
    fs = pafs.LocalFileSystem()
    named = tmp_path / "c.jsonl.gz"
    named.write_bytes(gzip.compress(_rows(200, {}), mtime=0))
    hidden = tmp_path / "hidden.jsonl"  # gzip bytes under a plain name: found by the range scan
    hidden.write_bytes(named.read_bytes())
    with caplog.at_level(logging.WARNING, logger="embindex.sources"):
        for p in (named, hidden):
            frags = plan_jsonl_file(fs, fs.get_file_info(str(p)), fragment_bytes=100)
            assert len(frags) == 1 and frags[0].byte_range == ()
            assert read_fragment(frags[0], fs, RowRules(), str(tmp_path)).num_rows == 200
    assert sum("one fragment" in r.getMessage() for r in caplog.records) == 2


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_split_build_from_s3_equals_unsplit(ray_cluster, s3_bucket, tmp_path):
    bucket, opts, client = s3_bucket
    docs = sample_docs(36)
    lines = [json.dumps(d).encode() for d in docs]
    lines.insert(20, b'{"id": "bad", "text": ')  # malformed: line 21 of the file
    body = b"\r\n".join(lines[:10]) + b"\r\n" + b"\n".join(lines[10:])  # CRLF part, no trailing newline
    client.put_object(Bucket=bucket, Key="c/docs.jsonl", Body=body)
    uri = f"s3://{bucket}/c/docs.jsonl"

    def build(name: str, fragment_bytes: int):
        cfg = job_config(uri, str(tmp_path / name), source={"storage": opts, "fragment_bytes": fragment_bytes},
                         index={"tiers": [32, "full"], "quality_sample": 10})
        return embindex.build(cfg, log=None)

    split = build("split", len(body) // 4)
    whole = build("whole", len(body) + 1)
    assert split.manifest.fragments["total"] >= 3 and whole.manifest.fragments["total"] == 1
    for r in (split, whole):
        c = r.counts
        assert c["rows_in"] == 37 and c["documents"] == 36 and c["rejected"] == 1
        assert c["rows_in"] == c["documents"] + c["rejected"]
    rej = pa.concat_tables([pq.read_table(tmp_path / "split" / r.path) for r in split.manifest.rejects])
    assert rej.column("reject").to_pylist() == [Reasons.INVALID_JSON] and rej.column("line").to_pylist() == [21]

    # same ids and vectors (shards are listed by part name, so compare row by id, not by position)
    a, b = embindex.open_index(str(tmp_path / "split")), embindex.open_index(str(tmp_path / "whole"))
    assert sorted(a.ids) == sorted(b.ids) == sorted(d["id"] for d in docs)
    pos = {i: n for n, i in enumerate(b.ids)}
    # fp16 storage; batches differ between the builds, so allow one fp16 step of BLAS rounding
    np.testing.assert_allclose(np.asarray(a.vectors), np.asarray(b.vectors)[[pos[i] for i in a.ids]], rtol=0,
                               atol=1e-3)

    # the plan on S3 reads ranges, and a second plan gives the same fragment ids
    from embindex.config import SourceConfig
    from embindex.sources.readers import open_corpus

    src = SourceConfig(uri=uri, storage=opts, fragment_bytes=len(body) // 4)
    assert [f.id for f in open_corpus(src).fragments] == [f.id for f in open_corpus(src).fragments]
