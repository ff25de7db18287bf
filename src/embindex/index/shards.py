"""Parquet shards: the write step of the pipeline and reading shards back.

A shard holds documents or chunks (id, chunk, start, end, content_hash, meta, source, modality (text |
image), vector as fixed_size_list<float16>[dim], token_vectors as list<fixed_size_list<float16>[d]> for
multi-vector, and with `index.store_content` the content: text and encoded image); a rejects file holds
rows that were not indexed, with their reason. Next to each part, its vectors as a float16 [rows, dim]
.npy file (`put_part`): the search reader rescores candidates from it by row offset. Each write is one
whole-object PUT (or temp file + rename), named by the fragment's id (so a retried fragment overwrites
its own files), and returns a record for the manifest.
"""

from __future__ import annotations

import hashlib
import io
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ..storage import Storage, StorageOptions
from . import layout

DOC_COLUMNS = ["id", "chunk", "start", "end", "content_hash", "meta", "source", "vector"]
CONTENT_COLUMN = "content"  # the row's text (a chunk row: its span), with index.store_content
CONTENT_IMAGE_COLUMN = "content_image"  # the encoded image of an image row, with index.store_content
OPTIONAL_DOC_COLUMNS = ["modality", "token_vectors", CONTENT_COLUMN, CONTENT_IMAGE_COLUMN]
DTYPE_COLUMN = "embed_dtype"  # the dtype and device the embed actor ran (recorded per part, not stored per row)
EMBED_SECONDS_COLUMN = "embed_seconds"  # the embed actor's busy seconds on the block (recorded, not stored)
REJECT_COLUMNS = ["id", "reject", "reject_detail", "source", "line"]

SHARD_RECORD_SCHEMA = pa.schema(
    [
        pa.field("kind", pa.string()),  # "part" or "rejects"
        pa.field("path", pa.string()),  # relative to the index root
        pa.field("rows", pa.int64()),
        pa.field("bytes", pa.int64()),
        pa.field("sha256", pa.string()),
        pa.field("reasons", pa.string()),  # JSON {reason: count} for rejects files
        pa.field("tokens", pa.int64()),  # token vectors in a part (multi-vector outputs)
        pa.field("fragment", pa.string()),  # the input fragment the file holds
        pa.field("documents", pa.int64()),  # distinct document ids in a part (rows may be chunks)
        pa.field("dtype", pa.string()),  # the embed actor's dtype and device, e.g. "bfloat16 (cuda)"
        pa.field("stages", pa.string()),  # JSON {output column: counts} of the generative stages (parts)
        pa.field("vectors", pa.string()),  # the part's float16 row matrix (.npy), see put_part
        pa.field("embed_s", pa.float64()),  # the embed actor's busy seconds on the fragment (its first record)
    ]
)

STATUS_OK = "ok"


def generated_columns(output: str) -> list[str]:
    """The columns a generative stage stores for its output column `output` (e.g. `markdown`, `caption`):
    the text, its status (`ok`, or flags such as `unfinished`, `truncated_input`), the generating model's
    fingerprint and the number of generated tokens. Kept on a document's first row only (chunk rows repeat
    the document)."""
    return [output, f"{output}_status", f"{output}_model", f"{output}_tokens"]


def _generated_counts(docs: pa.Table, outputs: list[str]) -> dict[str, dict[str, int]]:
    """Per output column: documents generated in this part, flagged ones by flag, generated tokens."""
    counts: dict[str, dict[str, int]] = {}
    for out in outputs:
        status = docs.column(f"{out}_status").drop_null().to_pylist()
        entry = {"documents": len(status), "tokens": int(pc.sum(docs.column(f"{out}_tokens")).as_py() or 0)}
        for value in status:
            for flag in value.split(","):
                if flag != STATUS_OK:
                    entry[flag] = entry.get(flag, 0) + 1
        counts[out] = entry
    return counts


def _first_rows_only(docs: pa.Table, outputs: list[str]) -> pa.Table:
    """Null the generated columns on every chunk row but a document's first."""
    later = pc.fill_null(pc.greater(docs.column("chunk"), 0), False)
    if not pc.any(later).as_py():
        return docs
    for out in outputs:
        for name in generated_columns(out):
            col = docs.column(name)
            docs = docs.set_column(docs.schema.get_field_index(name), name,
                                   pc.if_else(later, pa.scalar(None, col.type), col))
    return docs


ROW_GROUP_BYTES = 1 << 20  # uncompressed bytes per row group
ROW_GROUP_ROWS = (64, 8192)  # bounds on rows per group


def row_group_rows(table: pa.Table) -> int:
    """Rows per Parquet row group: about ROW_GROUP_BYTES each. A query decodes one whole group per
    shortlisted row, so the group size bounds the cost of a hit (a 1024-d fp16 vector is 2 KB: 512 rows)."""
    per_row = table.nbytes / max(table.num_rows, 1)
    return int(min(max(ROW_GROUP_BYTES // max(per_row, 1), ROW_GROUP_ROWS[0]), ROW_GROUP_ROWS[1]))


def _to_parquet_bytes(table: pa.Table) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd", row_group_size=row_group_rows(table))
    return buf.getvalue()


def put_table(storage: Storage, rel: str, table: pa.Table) -> tuple[int, str]:
    data = _to_parquet_bytes(table)
    storage.write_bytes(rel, data)
    return len(data), hashlib.sha256(data).hexdigest()


def vector_matrix_bytes(docs: pa.Table, column: str = "vector") -> bytes | None:
    """The `column` of a part as a float16 [rows, dim] .npy file; None without a complete vector column."""
    if column not in docs.column_names or docs.column(column).null_count or not docs.num_rows:
        return None
    col = docs.column(column).combine_chunks()
    flat = col.flatten().to_numpy(zero_copy_only=False).astype(np.float16, copy=False)
    buf = io.BytesIO()
    np.save(buf, flat.reshape(len(col), col.type.list_size), allow_pickle=False)
    return buf.getvalue()


def put_part(storage: Storage, rel: str, docs: pa.Table) -> dict[str, Any]:
    """Write a part and its row matrix; return its manifest fields (path, rows, bytes, sha256, vectors).
    The matrix goes first: a part whose record names it always has it."""
    matrix = vector_matrix_bytes(docs)
    vectors = None
    if matrix is not None:
        vectors = layout.vectors_beside(rel)
        storage.write_bytes(vectors, matrix)
    size, sha = put_table(storage, rel, docs)
    return {"path": rel, "rows": docs.num_rows, "bytes": size, "sha256": sha, "vectors": vectors}


def _token_count(docs: pa.Table) -> int:
    if "token_vectors" not in docs.column_names:
        return 0
    return int(pc.sum(pc.list_value_length(docs.column("token_vectors"))).as_py() or 0)


def write_fragment(batch: pa.Table, root: str, storage: dict[str, Any], run_id: str,
                   stage_columns: list[str] | None = None) -> pa.Table:
    """Ray Data step (one fragment per batch): write its part and rejects files under names derived from
    the fragment id, then its commit marker; return the shard records. A retried task rewrites the same
    names with the same content, so a fragment is never indexed twice. `stage_columns`: the output columns
    of the generative stages, stored with their `generated_columns` and counted in the part's record."""
    import json

    from .commits import write_commit

    fragments = set(batch.column("fragment").to_pylist())
    if not fragments:  # an empty fragment: nothing to write, nothing to commit
        return pa.Table.from_pylist([], schema=SHARD_RECORD_SCHEMA)
    if len(fragments) != 1:
        raise RuntimeError(f"a write batch must hold exactly one fragment, got {len(fragments)}")
    fragment = fragments.pop()
    store = Storage(root, StorageOptions.from_dict(storage))
    is_reject = pc.is_valid(batch.column("reject"))
    outputs = list(stage_columns or [])
    generated = [c for out in outputs for c in generated_columns(out)]
    columns = DOC_COLUMNS + [c for c in OPTIONAL_DOC_COLUMNS if c in batch.column_names] + generated
    docs = _first_rows_only(batch.filter(pc.invert(is_reject)).select(columns), outputs)
    rejects = batch.filter(is_reject).select(REJECT_COLUMNS)
    records: list[dict[str, Any]] = []
    if docs.num_rows:
        rel = layout.part_path(run_id, fragment)
        n_docs = count_documents(docs)
        part = put_part(store, rel, docs)
        dtypes = pc.unique(batch.column(DTYPE_COLUMN)).to_pylist() if DTYPE_COLUMN in batch.column_names else []
        records.append({"kind": "part", **part, "reasons": None, "tokens": _token_count(docs),
                        "fragment": fragment, "documents": n_docs,
                        "dtype": ", ".join(sorted(d for d in dtypes if d)) or None,
                        "stages": json.dumps(_generated_counts(docs, outputs)) if outputs else None,
                        "embed_s": None})
    if rejects.num_rows:
        rel = layout.rejects_path(run_id, fragment)
        size, sha = put_table(store, rel, rejects)
        counts: dict[str, int] = {}
        for r in rejects.column("reject").to_pylist():
            counts[r] = counts.get(r, 0) + 1
        records.append({"kind": "rejects", "path": rel, "rows": rejects.num_rows, "bytes": size, "sha256": sha,
                        "reasons": json.dumps(counts), "tokens": 0, "fragment": fragment, "documents": 0,
                        "dtype": None, "stages": None, "embed_s": None, "vectors": None})
    if records and EMBED_SECONDS_COLUMN in batch.column_names:
        records[0]["embed_s"] = pc.max(batch.column(EMBED_SECONDS_COLUMN)).as_py()
    write_commit(store, run_id, fragment, records)
    return pa.Table.from_pylist(records, schema=SHARD_RECORD_SCHEMA)


class DuplicateRowError(RuntimeError):
    """A fragment produced the same (id, chunk) twice: nothing of it is written."""


def count_documents(docs: pa.Table) -> int:
    """Distinct ids of a fragment's rows; raises DuplicateRowError when an (id, chunk) repeats. Ids are
    unique across fragments by the build's pre-pass (sources/census.py), so the per-fragment counts add up
    to the index's documents without any process holding every id."""
    keys = pa.table({"id": docs.column("id"), "chunk": pc.fill_null(docs.column("chunk"), -1)})
    if keys.group_by(["id", "chunk"]).aggregate([]).num_rows != keys.num_rows:
        raise DuplicateRowError("a document (or chunk) occurs twice in one fragment")
    return len(pc.unique(docs.column("id")))


def read_table(storage: Storage, rel: str, columns: list[str] | None = None) -> pa.Table:
    with storage.fs.open(storage.fs_path(rel), "rb") as f:
        return pq.read_table(f, columns=columns)


def vectors_of(table: pa.Table, column: str = "vector") -> np.ndarray:
    """fixed_size_list<float16>[d] column -> [N, d] float32."""
    col = table.column(column).combine_chunks()
    d = col.type.list_size
    flat = col.flatten().to_numpy(zero_copy_only=False)
    return flat.reshape(-1, d).astype(np.float32)
