"""Elasticsearch index bodies generated from a plan: the mapping and one bulk document per export row.
Shared by the live sink (es_sink) and the file sink (mapping.json + bulk NDJSON).

Constraints checked here, before anything is sent (Elasticsearch reference, "Dense vector field type" and
"Rank vectors field type", elastic.co/docs/reference/elasticsearch/mapping-reference/): `dims` at most 4096
for dense_vector and rank_vectors; `similarity: dot_product` needs unit-length float vectors (exported
vectors are renormalized); `index_options.type` one of hnsw, int8_hnsw, int4_hnsw, bbq_hnsw, flat,
int8_flat, int4_flat, bbq_flat (`bbq_disk` on 9.2+); `m` / `ef_construction` only for the *_hnsw types;
`rescore_vector.oversample` only for the quantized types, between 1.0 and 10.0 or exactly 0; int4 needs an
even number of dims and BBQ at least 64 dims.
"""

from __future__ import annotations

import json
from typing import Any

import pyarrow as pa

from ..plan import ExportPlan
from ..state import ExportError
from .base import float_rows

MAX_DIMS = 4096
INDEX_TYPES = ("hnsw", "int8_hnsw", "int4_hnsw", "bbq_hnsw", "flat", "int8_flat", "int4_flat", "bbq_flat",
               "bbq_disk")
QUANTIZED = ("int8_", "int4_", "bbq_")
DEFAULT_INDEX_TYPE = "int8_hnsw"
VECTOR_FIELD, FULL_FIELD, TOKENS_FIELD = "embedding", "embedding_full", "tokens"
_SCALAR = {"keyword": {"type": "keyword"}, "long": {"type": "long"}, "double": {"type": "double"},
           "boolean": {"type": "boolean"}, "flattened": {"type": "flattened"}}


def vector_field(dims: int, index_type: str = DEFAULT_INDEX_TYPE, oversample: float | None = None,
                 m: int | None = None, ef_construction: int | None = None) -> dict[str, Any]:
    """A dense_vector mapping for unit vectors (dot_product), checked against the documented constraints."""
    if not 1 <= dims <= MAX_DIMS:
        raise ExportError(f"Elasticsearch dense_vector takes 1 to {MAX_DIMS} dims, not {dims}: export a narrower "
                          "--tier")
    if index_type not in INDEX_TYPES:
        raise ExportError(f"unknown index_options type {index_type!r}; one of {', '.join(INDEX_TYPES)}")
    if index_type.startswith("int4_") and dims % 2:
        raise ExportError(f"{index_type} needs an even number of dims, not {dims}")
    if index_type.startswith("bbq_") and dims < 64:
        raise ExportError(f"{index_type} needs at least 64 dims, not {dims}: use int8_hnsw or a wider --tier")
    options: dict[str, Any] = {"type": index_type}
    if index_type.endswith("_hnsw") or index_type == "hnsw":
        if m is not None:
            options["m"] = int(m)
        if ef_construction is not None:
            options["ef_construction"] = int(ef_construction)
    elif m is not None or ef_construction is not None:
        raise ExportError(f"m / ef_construction apply to the *_hnsw index types, not {index_type}")
    if oversample is not None:
        if not index_type.startswith(QUANTIZED):
            raise ExportError(f"rescore_vector.oversample applies to quantized index types, not {index_type}")
        if not (oversample == 0 or 1.0 <= float(oversample) <= 10.0):
            raise ExportError(f"rescore_vector.oversample must be 0 or between 1.0 and 10.0, not {oversample}")
        options["rescore_vector"] = {"oversample": float(oversample)}
    return {"type": "dense_vector", "dims": int(dims), "element_type": "float", "index": True,
            "similarity": "dot_product", "index_options": options}


def meta_properties(fields: dict[str, Any]) -> dict[str, Any]:
    """Metadata field kinds (plan.infer_fields) -> mapping properties."""
    out: dict[str, Any] = {}
    for name, kind in fields.items():
        if isinstance(kind, dict):
            out[name] = {"type": "object", "properties": meta_properties(kind["object"])}
        else:
            out[name] = dict(_SCALAR.get(kind, _SCALAR["flattened"]))
    return out


def build_mapping(width: int, fields: dict[str, Any], *, content: bool = False, full_dim: int | None = None,
                  token_dim: int | None = None, index_type: str = DEFAULT_INDEX_TYPE,
                  oversample: float | None = None, m: int | None = None,
                  ef_construction: int | None = None) -> dict[str, Any]:
    """The index mapping: ids and offsets as keyword / integer fields, typed metadata under `meta`, the tier
    vector (kNN-indexed), optionally the full-width vector (stored for rescoring, not indexed) and the
    token vectors of a multi-vector index (rank_vectors, for MaxSim rescoring)."""
    props: dict[str, Any] = {
        "key": {"type": "keyword"},
        "id": {"type": "keyword"},
        "chunk": {"properties": {"index": {"type": "integer"}, "start": {"type": "integer"},
                                 "end": {"type": "integer"}}},
        "modality": {"type": "keyword"},
        "shard": {"type": "keyword"},
        "meta": {"type": "object", "properties": meta_properties(fields)},
        VECTOR_FIELD: vector_field(width, index_type, oversample, m, ef_construction),
    }
    if content:
        props["content"] = {"type": "text"}
    if full_dim:
        if full_dim > MAX_DIMS:
            raise ExportError(f"the full-width vector has {full_dim} dims, over Elasticsearch's {MAX_DIMS}: "
                              "drop --full-vector")
        props[FULL_FIELD] = {"type": "dense_vector", "dims": int(full_dim), "element_type": "float", "index": False}
    if token_dim:
        if token_dim > MAX_DIMS:
            raise ExportError(f"token vectors have {token_dim} dims, over rank_vectors' {MAX_DIMS}")
        props[TOKENS_FIELD] = {"type": "rank_vectors", "dims": int(token_dim), "element_type": "float"}
    return {"properties": props}


def plan_mapping(plan: ExportPlan, options: dict[str, Any]) -> dict[str, Any]:
    """build_mapping for a plan; `options`: index_type, oversample, m, ef_construction."""
    token_dim = (plan.manifest.outputs.get("multivector") or {}).get("dim") if plan.rows.tokens else None
    content = bool(plan.rows.content and plan.manifest.config.get("index", {}).get("store_content", False))
    return build_mapping(plan.width, plan.fields, content=content,
                         full_dim=plan.full_dim if plan.rows.full_vector else None, token_dim=token_dim, **options)


def documents(rows: pa.Table) -> list[tuple[str, str]]:
    """(_id, _source JSON) per export row. Vectors are spliced in as text (compact, no float re-parsing)."""
    n = rows.num_rows
    cols = {c: rows.column(c).to_pylist() for c in ("key", "id", "chunk", "start", "end", "modality", "meta", "shard")}
    content = rows.column("content").to_pylist() if "content" in rows.column_names else None
    vec = float_rows(rows.column("vector"))
    full = float_rows(rows.column("vector_full")) if "vector_full" in rows.column_names else None
    tokens = rows.column("tokens").to_pylist() if "tokens" in rows.column_names else None
    out = []
    for i in range(n):
        src: dict[str, Any] = {"key": cols["key"][i], "id": cols["id"][i], "modality": cols["modality"][i],
                               "shard": cols["shard"][i], "meta": json.loads(cols["meta"][i]) if cols["meta"][i] else {}}
        if cols["chunk"][i] is not None:
            src["chunk"] = {"index": cols["chunk"][i], "start": cols["start"][i], "end": cols["end"][i]}
        if content is not None and content[i] is not None:
            src["content"] = content[i]
        if tokens is not None and tokens[i] is not None:
            src[TOKENS_FIELD] = [[round(x, 7) for x in t] for t in tokens[i]]
        text = json.dumps(src, ensure_ascii=False)
        extra = f',"{VECTOR_FIELD}":{vec[i]}' + (f',"{FULL_FIELD}":{full[i]}' if full is not None else "")
        out.append((cols["key"][i], text[:-1] + extra + "}"))
    return out
