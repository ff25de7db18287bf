"""Relevance judgments in and run files out, in the formats IR tools share.

Qrels (local path or object-storage URI) in any of:
* TREC: `query_id iteration doc_id grade` per line (whitespace separated);
* BEIR TSV: a header `query-id<TAB>corpus-id<TAB>score`, then rows;
* JSONL: `{"query_id": ..., "doc_id": ..., "relevance": ...}` per line (`id` / `corpus_id` and `score` /
  `grade` are accepted too).

Run files: TREC `query_id Q0 doc_id rank score run_name`, one line per ranked document.
"""

from __future__ import annotations

import json
from typing import Any, Iterable

from ..storage import StorageOptions, fsspec_filesystem, strip_scheme


class QrelsError(ValueError):
    """A qrels file that cannot be read as any supported format."""


_DOC_KEYS = ("doc_id", "corpus_id", "id", "docid")
_GRADE_KEYS = ("relevance", "score", "grade", "rel")


def _json_line(row: dict[str, Any], where: str) -> tuple[str, str, int]:
    doc = next((row[k] for k in _DOC_KEYS if k in row), None)
    grade = next((row[k] for k in _GRADE_KEYS if k in row), 1)
    if "query_id" not in row or doc is None:
        raise QrelsError(f"{where}: a JSONL judgment needs query_id and doc_id")
    return str(row["query_id"]), str(doc), int(grade)


def _text_line(line: str, where: str) -> tuple[str, str, int]:
    parts = line.split()
    if len(parts) == 4:  # TREC: qid iter docid grade
        qid, _, doc, grade = parts
    elif len(parts) == 3:  # BEIR TSV row: qid docid grade
        qid, doc, grade = parts
    else:
        raise QrelsError(f"{where}: expected 'query_id 0 doc_id grade' (TREC) or 'query-id corpus-id score' "
                         f"(BEIR TSV), got {line!r}")
    try:
        return qid, doc, int(float(grade))
    except ValueError:
        raise QrelsError(f"{where}: grade {grade!r} is not a number") from None


def parse_qrels(lines: Iterable[str], name: str = "qrels") -> dict[str, dict[str, int]]:
    """query id -> {doc id: grade} from the lines of a TREC, BEIR TSV or JSONL qrels file."""
    out: dict[str, dict[str, int]] = {}
    for n, raw in enumerate(lines, 1):
        line = raw.strip()
        if not line:
            continue
        where = f"{name} line {n}"
        if line.startswith("{"):
            qid, doc, grade = _json_line(json.loads(line), where)
        elif n == 1 and line.lower().replace("_", "-").startswith("query-id"):
            continue  # BEIR header
        else:
            qid, doc, grade = _text_line(line, where)
        out.setdefault(qid, {})[doc] = grade
    if not out:
        raise QrelsError(f"{name}: no judgments")
    return out


def read_qrels(uri: str, storage: StorageOptions | None = None) -> dict[str, dict[str, int]]:
    """Read a qrels file from a local path or s3:// / gs:// URI (or `builtin:sample-qrels`)."""
    from ..sources.readers import resolve_source_uri

    uri = resolve_source_uri(uri)
    fs = fsspec_filesystem(uri, storage or StorageOptions())
    with fs.open(strip_scheme(uri), "rt", encoding="utf-8") as f:
        return parse_qrels(f, uri)


def run_lines(query_id: str, ranking: Iterable[tuple[str, float]], run_name: str) -> list[str]:
    """TREC run lines of one query; a document ranked twice (several chunks) keeps its best rank."""
    lines, seen = [], set()
    for doc, score in ranking:
        if doc in seen:
            continue
        seen.add(doc)
        lines.append(f"{query_id} Q0 {doc} {len(seen)} {score:.6f} {run_name}")
    return lines
