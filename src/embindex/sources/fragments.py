"""Input fragments: the unit of work, of commit and of resume.

A fragment is a deterministic slice of the corpus: a range of Parquet row groups, one JSONL file (or
one newline-aligned byte range of a plain JSONL file larger than `fragment_bytes`, see
`jsonl_ranges.py`), a group of text, image or HTML files, or one WARC file (a WARC cannot be split
without scanning it). Its id hashes the format, the paths, the
range and each file's size and modification tag, so the same corpus gives the same fragments in every
run. Each fragment flows through the pipeline as one Ray Data block and is written as one part file
plus one rejects file, named by the fragment id, then committed by a marker written last.
"""

from __future__ import annotations

import hashlib
import json
import logging
import posixpath
from dataclasses import asdict, dataclass
from itertools import accumulate
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from .jsonl_ranges import RangeScan, byte_ranges, read_range_lines, scan_range
from .normalize import RowRules, parse_image_file, parse_jsonl, parse_jsonl_lines, parse_text_file, to_table
from .web import parse_html_file, parse_warc

log = logging.getLogger("embindex.sources")


@dataclass(frozen=True)
class Fragment:
    id: str
    format: str  # parquet | jsonl | text | images | mixed | html | warc
    paths: tuple[str, ...]  # filesystem paths (bucket/key on object stores)
    row_groups: tuple[int, ...] = ()  # parquet only
    rows: int | None = None  # rows known at planning time (parquet, text)
    byte_range: tuple[int, ...] = ()  # split JSONL only: [start, end) of the file (jsonl_ranges.py)
    first_line: int = 1  # split JSONL only: 1 + the number of newlines before byte_range[0]

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "Fragment":
        d = json.loads(text)
        return cls(id=d["id"], format=d["format"], paths=tuple(d["paths"]), row_groups=tuple(d["row_groups"]),
                   rows=d["rows"], byte_range=tuple(d.get("byte_range", ())), first_line=d.get("first_line", 1))


def _fragment_id(fmt: str, infos: list[pafs.FileInfo], extra: Any = None) -> str:
    h = hashlib.sha256(fmt.encode())
    for info in infos:
        tag = info.mtime_ns if info.mtime_ns is not None else ""
        h.update(f"\0{info.path}\0{info.size}\0{tag}".encode())
    h.update(json.dumps(extra).encode())
    return h.hexdigest()[:24]


def plan_fragments(fs: pafs.FileSystem, files: list[str], fmt: str, fragment_rows: int,
                   fragment_files: int, fragment_bytes: int = 256 << 20, fragment_images: int = 256,
                   image_column: str | None = None) -> list[Fragment]:
    """Split the corpus files into fragments (deterministic order and ids). A fragment closes before it
    would pass `fragment_rows` Parquet rows or `fragment_files` files, or `fragment_bytes` of data
    (uncompressed Parquet row groups, file sizes), or `fragment_images` rows where rows hold images
    (Parquet files with `image_column`, image folders): prepared pixels are larger than encoded images.
    A plain JSONL file larger than `fragment_bytes` becomes several byte-range fragments; a WARC file
    is always one fragment."""
    infos = fs.get_file_info(files)
    frags: list[Fragment] = []
    if fmt in ("images", "mixed"):
        fragment_files = min(fragment_files, fragment_images)
    if fmt == "parquet":
        for info in infos:
            with fs.open_input_file(info.path) as f:
                meta = pq.ParquetFile(f).metadata
            max_rows = fragment_rows
            if image_column and image_column in meta.schema.to_arrow_schema().names:
                max_rows = min(fragment_rows, fragment_images)
            groups: list[int] = []
            rows = size = 0
            for g in range(meta.num_row_groups):
                n, nbytes = meta.row_group(g).num_rows, meta.row_group(g).total_byte_size
                if groups and (rows + n > max_rows or size + nbytes > fragment_bytes):
                    frags.append(Fragment(_fragment_id(fmt, [info], groups), fmt, (info.path,), tuple(groups), rows))
                    groups, rows, size = [], 0, 0
                groups.append(g)
                rows += n
                size += nbytes
            if groups or meta.num_row_groups == 0:
                frags.append(Fragment(_fragment_id(fmt, [info], groups), fmt, (info.path,), tuple(groups), rows))
    elif fmt == "jsonl":
        frags = [f for info in infos for f in plan_jsonl_file(fs, info, fragment_bytes)]
    elif fmt == "warc":
        frags = [Fragment(_fragment_id(fmt, [info]), fmt, (info.path,)) for info in infos]
    else:
        group: list[pafs.FileInfo] = []
        size = 0
        for info in infos:
            n = info.size or 0
            if group and (len(group) >= fragment_files or size + n > fragment_bytes):
                frags.append(Fragment(_fragment_id(fmt, group), fmt, tuple(x.path for x in group), (), len(group)))
                group, size = [], 0
            group.append(info)
            size += n
        if group:
            frags.append(Fragment(_fragment_id(fmt, group), fmt, tuple(x.path for x in group), (), len(group)))
    return frags


def _is_gzip_name(path: str) -> bool:
    return path.lower().endswith(".gz")


def _scan_ranges(fs: pafs.FileSystem, path: str, ranges: list[tuple[int, int]]) -> list[RangeScan]:
    """`scan_range` of every range, as Ray tasks when Ray is up (the driver does not read the file)."""
    from ..ray_runtime import run_tasks

    return run_tasks(scan_range, [(fs, path, start, end) for start, end in ranges], num_cpus=0.5)


def plan_jsonl_file(fs: pafs.FileSystem, info: pafs.FileInfo, fragment_bytes: int) -> list[Fragment]:
    """One fragment for a JSONL file up to `fragment_bytes` (id as it always was) or a gzipped one;
    else one fragment per newline-aligned byte range, each with the file line number of its first line.

    Split fragment ids hash the file (path, size, modification tag) and the range, so re-planning an
    unchanged file with the same `fragment_bytes` gives the same fragments (resume)."""
    fmt, size = "jsonl", info.size or 0
    whole = [Fragment(_fragment_id(fmt, [info]), fmt, (info.path,))]
    if size <= fragment_bytes:
        return whole
    if _is_gzip_name(info.path):
        log.warning("%s: gzipped JSONL of %d bytes > fragment_bytes %d is read as one fragment (gzip has no "
                    "random access); split it into several files or store it uncompressed", info.path, size,
                    fragment_bytes)
        return whole
    ranges = byte_ranges(size, fragment_bytes)
    scans = _scan_ranges(fs, info.path, ranges)
    if scans[0].gzip:
        log.warning("%s: gzip data under a plain JSONL name is read as one fragment", info.path)
        return whole
    starts = list(accumulate([s.newlines for s in scans[:-1]], initial=1))
    return [Fragment(_fragment_id(fmt, [info], {"bytes": [a, b]}), fmt, (info.path,), byte_range=(a, b),
                     first_line=line) for (a, b), line in zip(ranges, starts)]


def _parquet_rows(table: pa.Table, rules: RowRules, source: str, first_row: int = 1) -> list[dict[str, Any]]:
    """Normalized rows of a Parquet slice; `line` is the 1-based row number in the file."""
    from .normalize import Reasons, normalize_record, reject_row

    # Strings go through bytes so that invalid UTF-8 becomes a reject, not a crash in to_pylist().
    cols, was_string = {}, set()
    for name in table.column_names:
        col = table.column(name)
        if pa.types.is_string(col.type) or pa.types.is_large_string(col.type):
            col = col.cast(pa.binary() if pa.types.is_string(col.type) else pa.large_binary())
            was_string.add(name)
        cols[name] = col
    rows = []
    for line, rec in enumerate(pa.table(cols).to_pylist(), start=first_row):
        for name, value in rec.items():
            if isinstance(value, bytes) and name in was_string and name not in (rules.text_column, rules.id_column):
                rec[name] = value.decode("utf-8", errors="replace")
        rid = rec.get(rules.id_column)
        if isinstance(rid, bytes):
            try:
                rec[rules.id_column] = rid.decode("utf-8")
            except UnicodeDecodeError:
                rows.append(reject_row(rid.decode("utf-8", errors="replace"), Reasons.INVALID_UTF8,
                                       "id is not valid UTF-8", source, line))
                continue
        rows.append(normalize_record(rec, rules, source, line))
    return rows


def _read_row_groups(fs: pafs.FileSystem, path: str, groups: list[int]) -> tuple[pa.Table, int]:
    """The row groups' rows and the 1-based file row number of the first one."""
    with fs.open_input_file(path) as f:
        pf = pq.ParquetFile(f)
        first = 1 + sum(pf.metadata.row_group(g).num_rows for g in range(min(groups)))
        return pf.read_row_groups(groups), first


def _read_bytes(fs: pafs.FileSystem, path: str) -> bytes:
    with fs.open_input_stream(path, compression=None) as f:  # bytes as stored; gzip is handled by the parser
        return f.read()


def _read_warc(fs: pafs.FileSystem, path: str, rules: RowRules) -> list[dict[str, Any]]:
    """All rows of one WARC file, streamed (a retry after a read error starts the file again)."""
    with fs.open_input_stream(path, compression=None) as f:
        return list(parse_warc(f, path, rules))


def _image_ref_path(ref: str, fs: pafs.FileSystem, root: str, allowed: str) -> str:
    """A row's image reference as a path on the source filesystem: URIs must live on the source's store,
    relative paths resolve against the corpus root, and the result must lie under `allowed`."""
    if "://" in ref:
        scheme, rest = ref.split("://", 1)
        kind = {"s3a": "s3", "file": "local", "gs": "gcs"}.get(scheme, scheme)
        if not scheme or kind not in fs.type_name:
            raise ValueError(f"image URI {ref!r} is not on the source's filesystem ({fs.type_name})")
        path = posixpath.normpath(rest)
    else:
        path = posixpath.normpath(ref if ref.startswith("/") else posixpath.join(root, ref))
    allowed = posixpath.normpath(allowed)
    if path != allowed and not path.startswith(allowed.rstrip("/") + "/"):
        raise ValueError(f"image reference {ref!r} resolves outside {allowed!r} (set source.image_root to "
                         "allow another prefix)")
    return path


def load_image_refs(rows: list[dict[str, Any]], fs: pafs.FileSystem, root: str, rules: RowRules) -> list[dict[str, Any]]:
    """Read the bytes of image rows that hold a path (`image_ref`); unreadable ones become rejects."""
    from .normalize import Reasons, reject_row, set_image_bytes

    out = []
    for row in rows:
        ref = row.pop("image_ref", None)
        if ref is not None:
            try:
                path = _image_ref_path(ref, fs, root, rules.image_root or root)
                info = fs.get_file_info(path)
                if info.type != pafs.FileType.File:
                    raise FileNotFoundError("no such file")
                if info.size is not None and info.size > rules.max_image_bytes:
                    row = reject_row(row["id"], Reasons.IMAGE_TOO_LARGE, f"image {ref!r} has {info.size} bytes > "
                                     f"max_image_bytes {rules.max_image_bytes}", row["source"], row["line"])
                else:
                    row = set_image_bytes(row, _read_bytes(fs, path), rules)
            except (OSError, ValueError) as e:
                row = reject_row(row["id"], Reasons.IMAGE_UNREADABLE, f"cannot read image {ref!r}: {e}",
                                 row["source"], row["line"])
        out.append(row)
    return out


def read_fragment(frag: Fragment, fs: pafs.FileSystem, rules: RowRules, root: str) -> pa.Table:
    """All normalized rows (documents and rejects) of one fragment, tagged with its id."""
    rows: list[dict[str, Any]] = []
    if frag.format == "parquet":
        if frag.row_groups:
            path = frag.paths[0]
            table, first = _read_row_groups(fs, path, list(frag.row_groups))
            rows = _parquet_rows(table, rules, path, first)
    elif frag.byte_range:
        path, (start, end) = frag.paths[0], frag.byte_range
        lines = read_range_lines(fs, path, start, end, frag.first_line)
        rows = list(parse_jsonl_lines(lines, path, rules))
    elif frag.format == "warc":
        path = frag.paths[0]
        rows = _read_warc(fs, path, rules)
    else:
        for path in frag.paths:
            data = _read_bytes(fs, path)
            if frag.format == "jsonl":
                rows.extend(parse_jsonl(data, path, rules))
                continue
            rel = posixpath.relpath(path, root) if path != root else posixpath.basename(path)
            if frag.format == "html":
                rows.append(parse_html_file(data, path, rel, rules))
            elif path.lower().endswith(rules.image_extensions):
                rows.append(parse_image_file(data, path, rel, rules))
            else:
                rows.append(parse_text_file(data, path, rel, rules))
    rows = load_image_refs(rows, fs, root, rules)
    out = to_table(rows)
    return out.append_column("fragment", pa.array([frag.id] * out.num_rows, pa.string()))
