"""Chunkers with character offsets, and the mapping of chunk spans onto token spans.

Every chunker returns `[(start, end), ...]` character spans, in order, that cover the text: between
two consecutive chunks (and before the first / after the last) there is only whitespace. Chunks
are trimmed of surrounding whitespace. With `overlap` (naive chunking only) consecutive chunks share
units, so spans overlap.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

import numpy as np

Chunker = Literal["tokens", "sentences", "paragraphs"]

_SENTENCE_END = re.compile(r"(?:(?<=[.!?])|(?<=[.!?][\"')\]]))\s+|\n\s*\n")
_PARAGRAPH_BREAK = re.compile(r"\n[ \t]*\n\s*|\n(?=#{1,6} )")


@dataclass(frozen=True)
class ChunkSpec:
    chunker: Chunker = "sentences"
    chunk_size: int = 256  # tokens per chunk ("tokens"); size cap in tokens when merging paragraphs
    n_sentences: int = 5  # sentences per chunk ("sentences")
    overlap: int = 0  # units (tokens / sentences / paragraphs) shared by consecutive chunks


def _trim(text: str, start: int, end: int) -> tuple[int, int] | None:
    while start < end and text[start].isspace():
        start += 1
    while end > start and text[end - 1].isspace():
        end -= 1
    return (start, end) if end > start else None


def _units(text: str, pattern: re.Pattern) -> list[tuple[int, int]]:
    """Split points of `pattern` -> trimmed, non-empty unit spans."""
    spans, start = [], 0
    for m in pattern.finditer(text):
        span = _trim(text, start, m.start())
        if span:
            spans.append(span)
        start = m.end()
    span = _trim(text, start, len(text))
    if span:
        spans.append(span)
    return spans


def _group(units: list[tuple[int, int]], size: int, overlap: int) -> list[tuple[int, int]]:
    if not units:
        return []
    step = max(1, size - overlap)
    out = []
    for i in range(0, len(units), step):
        group = units[i : i + size]
        out.append((group[0][0], group[-1][1]))
        if i + size >= len(units):
            break
    return out


def sentence_spans(text: str) -> list[tuple[int, int]]:
    return _units(text, _SENTENCE_END)


def paragraph_spans(text: str) -> list[tuple[int, int]]:
    return _units(text, _PARAGRAPH_BREAK)


def token_window_spans(text: str, offsets: np.ndarray, size: int, overlap: int) -> list[tuple[int, int]]:
    """Fixed windows of `size` text tokens (special/prefix tokens, offset -1, are not counted)."""
    real = offsets[offsets[:, 0] >= 0]
    if len(real) == 0:
        return []
    units = [(int(s), int(e)) for s, e in real]
    spans = []
    for s, e in _group(units, size, overlap):
        span = _trim(text, s, e)
        if span:
            spans.append(span)
    return spans


def _merge_to_size(units: list[tuple[int, int]], offsets: np.ndarray | None, size: int) -> list[tuple[int, int]]:
    """Merge consecutive paragraphs while the merged chunk stays within `size` tokens."""
    if offsets is None or not units:
        return units
    starts = offsets[:, 0]
    real = starts >= 0

    def n_tokens(s: int, e: int) -> int:
        return int(np.count_nonzero(real & (starts >= s) & (starts < e)))

    out = [units[0]]
    for s, e in units[1:]:
        if n_tokens(out[-1][0], e) <= size:
            out[-1] = (out[-1][0], e)
        else:
            out.append((s, e))
    return out


def chunk_spans(text: str, spec: ChunkSpec, offsets: np.ndarray | None = None) -> list[tuple[int, int]]:
    """Character spans of the chunks of `text` (token offsets are needed by the "tokens" chunker)."""
    if spec.chunker == "tokens":
        if offsets is None:
            raise ValueError("the 'tokens' chunker needs token offsets")
        return token_window_spans(text, offsets, spec.chunk_size, spec.overlap)
    if spec.chunker == "sentences":
        return _group(sentence_spans(text), spec.n_sentences, spec.overlap)
    if spec.chunker == "paragraphs":
        units = _merge_to_size(paragraph_spans(text), offsets, spec.chunk_size)
        return _group(units, 1, 0) if spec.overlap == 0 else _group(units, 1 + spec.overlap, spec.overlap)
    raise ValueError(f"unknown chunker {spec.chunker!r}")


def token_spans(offsets: np.ndarray, char_spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Chunk char spans -> contiguous token spans [start, end) over the whole model input.

    A token belongs to the chunk in which its first character falls (whitespace between chunks goes
    to the chunk before). The first span starts at token 0 (special and instruction tokens) and the
    last ends after the final token (closing special token), as in the late-chunking reference. Spans
    that get no token (text cut by truncation) come back as (k, k): callers drop them.
    """
    n = len(offsets)
    starts = offsets[:, 0]
    real = np.flatnonzero(starts >= 0)
    if not char_spans:
        return []
    bounds = [cs for cs, _ in char_spans[1:]]  # a chunk owns the tokens starting before the next chunk
    # token index where each chunk begins: first real token whose start >= chunk start boundary
    begin = [0]
    for b in bounds:
        pos = np.searchsorted(starts[real], b, side="left")
        begin.append(int(real[pos]) if pos < len(real) else n)
    ends = begin[1:] + [n]
    return [(s, max(s, e)) for s, e in zip(begin, ends)]
