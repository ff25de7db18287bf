"""Sum a run's commit records: rows in = documents indexed + rows rejected, and the counts, dtypes, token
vectors and shard entries the manifest records."""

from __future__ import annotations

import json
from typing import Any

from .index.manifest import ShardEntry
from .index.shards import count_documents, read_table
from .storage import Storage


class ReconciliationError(RuntimeError):
    """Rows in != documents indexed + rows rejected, or an id indexed twice: nothing is published."""


def reconcile(store: Storage, parts: list[dict[str, Any]], rejects: list[dict[str, Any]],
              rows_in: int) -> tuple[int, int, int]:
    """Check rows in = documents indexed + rows rejected from the commit records (O(fragments)); the
    write step checked each fragment for repeated (id, chunk) and the pre-pass made ids unique across
    fragments. Returns (rows, documents, rejected); raises ReconciliationError (nothing is published)."""
    n_rows = sum(r["rows"] for r in parts)
    n_rej = sum(r["rows"] for r in rejects)
    n_docs = sum(_documents(store, p) for p in parts)
    if n_docs + n_rej != rows_in:
        raise ReconciliationError(f"rows in {rows_in} != indexed {n_docs} + rejected {n_rej}; not published")
    return n_rows, n_docs, n_rej


def _documents(store: Storage, part: dict[str, Any]) -> int:
    """Documents in a part: from its commit record (runs committed before records carried the count:
    its ids, one part at a time)."""
    if part.get("documents") is not None:
        return int(part["documents"])
    return count_documents(read_table(store, part["path"], columns=["id", "chunk"]))


def stage_counts(records: list[dict]) -> dict[str, dict[str, int]]:
    """Generative stages' counts summed over part records: {output column: {documents, tokens, flags...}}."""
    total: dict[str, dict[str, int]] = {}
    for r in records:
        for out, counts in json.loads(r.get("stages") or "{}").items():
            entry = total.setdefault(out, {})
            for k, v in counts.items():
                entry[k] = entry.get(k, 0) + int(v)
    return total


def merge_dtypes(*values: str | None) -> str | None:
    """'float32 (cpu)' and 'bfloat16 (cuda), float32 (cpu)' -> 'bfloat16 (cuda), float32 (cpu)'."""
    found = sorted({d.strip() for v in values for d in (v or "").split(",") if d.strip()})
    return ", ".join(found) or None


def used_dtype(parts: list[dict]) -> str | None:
    """The dtype and device the embed actors ran, from the part records (None: no part says)."""
    return merge_dtypes(*(r.get("dtype") for r in parts))


def token_count(parts: list[dict]) -> int:
    """Token vectors stored in these parts (multi-vector outputs)."""
    return sum(int(p.get("tokens") or 0) for p in parts)


def shard_entries(parts: list[dict]) -> list[ShardEntry]:
    return [ShardEntry(path=p["path"], rows=p["rows"], bytes=p["bytes"], sha256=p["sha256"], vectors=p.get("vectors"))
            for p in parts]
