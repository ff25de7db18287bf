"""Newline-aligned byte ranges of a plain JSONL file: how one big file becomes several fragments.

The rule (every line of the file belongs to exactly one range):

  * The file of `size` bytes is cut into ranges [i * B, min(size, (i + 1) * B)) with B = `fragment_bytes`.
  * A line starts at byte 0 and just after every `\\n`; it runs up to and including its `\\n` (or to
    the end of the file). A range [start, end) owns every line whose FIRST byte lies in [start, end),
    even when the line runs past `end`. A `\\n` in the last byte of a file starts no line.
  * Reading a range: from 0 when start == 0; otherwise the first owned line starts just after the
    first `\\n` at or after byte start - 1 (so a range that begins exactly at a line start owns that
    line), and only if that `\\n` lies before byte end - 1. A range inside one long line owns nothing.
    Lines are then read up to the `\\n` that ends the last line starting before `end`.
  * Line numbers are the file's 1-based line numbers (`\\n` separated; CRLF lines end with `\\r`,
    which JSON ignores; blank lines are skipped but counted). A range's first line number is
    1 + the number of `\\n` in [0, start): the planner gets it from one count per range
    (`scan_range`, run in Ray tasks), so no process reads more than its own range.

Gzip has no random access: a gzipped file is always one fragment (see `fragments.plan_fragments`).
"""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow.fs as pafs

BLOCK = 8 << 20  # bytes per ranged read (one GET on object stores)
GZIP_MAGIC = b"\x1f\x8b"


def byte_ranges(size: int, fragment_bytes: int) -> list[tuple[int, int]]:
    """[start, end) ranges of at most `fragment_bytes` covering a file of `size` bytes."""
    if size <= 0:
        return [(0, 0)]
    return [(s, min(size, s + fragment_bytes)) for s in range(0, size, fragment_bytes)]


@dataclass(frozen=True)
class RangeScan:
    """What the planner needs from one range: its `\\n` count, and whether the file is gzipped (range 0)."""

    newlines: int
    gzip: bool = False


def scan_range(fs: pafs.FileSystem, path: str, start: int, end: int) -> RangeScan:
    """Count the `\\n` bytes in [start, end) of a file, reading it in bounded ranged blocks."""
    newlines, gz = 0, False
    with fs.open_input_file(path) as f:
        pos = start
        while pos < end:
            block = f.read_at(min(BLOCK, end - pos), pos)
            if not block:
                break
            if pos == 0:
                gz = block[:2] == GZIP_MAGIC
            newlines += block.count(b"\n")
            pos += len(block)
    return RangeScan(newlines, gz)


def _first_line_start(f: pafs.NativeFile, start: int, end: int) -> int | None:
    """Offset of the first line starting in [start, end), or None when no line starts there."""
    if start == 0:
        return 0 if end > 0 else None
    pos = start - 1
    while pos < end - 1:  # a `\n` at end - 1 or later starts a line at end or later: not ours
        block = f.read_at(min(BLOCK, end - 1 - pos), pos)
        if not block:
            return None
        i = block.find(b"\n")
        if i >= 0:
            return pos + i + 1
        pos += len(block)
    return None


def _read_to_line_end(f: pafs.NativeFile, pos: int) -> bytes:
    """Bytes from `pos` up to and including the next `\\n` (or to the end of the file)."""
    parts = []
    while True:
        block = f.read_at(BLOCK, pos)
        if not block:
            break
        i = block.find(b"\n")
        if i >= 0:
            parts.append(block[:i + 1])
            break
        parts.append(block)
        pos += len(block)
    return b"".join(parts)


def read_range_lines(fs: pafs.FileSystem, path: str, start: int, end: int,
                     first_line: int) -> list[tuple[int, bytes]]:
    """(1-based file line number, raw line without `\\n`) of every line the range [start, end) owns.

    `first_line` is 1 + the number of `\\n` in [0, start). Reads about end - start bytes plus the
    rest of the last owned line; never the whole file."""
    with fs.open_input_file(path) as f:
        size = f.size()
        end = min(end, size)
        first = _first_line_start(f, start, end)
        if first is None or first >= size:
            return []
        body = f.read_at(end - first, first) if end > first else b""
        if end < size and not body.endswith(b"\n"):
            body += _read_to_line_end(f, end)
    lineno = first_line + (1 if first > start else 0)  # the `\n` at first - 1 lies in [start, end)
    lines = body.split(b"\n")
    if body.endswith(b"\n"):
        lines.pop()  # the text after the last `\n` belongs to the next range (or is the file's end)
    return [(lineno + i, raw) for i, raw in enumerate(lines)]
