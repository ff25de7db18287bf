"""Candidates' content from the build's source, for indexes built without `index.store_content`.

The candidates of every query are exploded to (query_id, position, id), joined with the normalized source
rows by id (a distributed hash join: the corpus is read once, in parallel, never on the driver), gathered
back per query, and joined to the query rows. Chunk candidates get their span of the document's text.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ..config import SourceConfig
from ..sources.readers import open_corpus
from .actors import CANDIDATE_FIELDS

ROWS_PER_PARTITION = 200_000


def _explode(batch: pa.Table, depth: int) -> pa.Table:
    qids, pos, ids, starts, ends = [], [], [], [], []
    for q, cand, s, e in zip(*(batch.column(c).to_pylist() for c in ("query_id", "cand_id", "cand_start",
                                                                     "cand_end"))):
        for j, doc in enumerate(cand[:depth]):
            qids.append(q), pos.append(j), ids.append(doc), starts.append(s[j]), ends.append(e[j])
    return pa.table({"query_id": pa.array(qids, pa.string()), "pos": pa.array(pos, pa.int32()),
                     "id": pa.array(ids, pa.string()), "span_start": pa.array(starts, pa.int32()),
                     "span_end": pa.array(ends, pa.int32())})


def _documents(batch: pa.Table) -> pa.Table:
    ok = pc.is_null(batch.column("reject"))
    return batch.filter(ok).select(["id", "text", "image"])


def _gather(group: pa.Table) -> pa.Table:
    """One query's candidates (all rows of one query_id) -> one row of position-ordered content lists."""
    order = np.argsort(group.column("pos").to_numpy(zero_copy_only=False), kind="stable")
    g = group.take(pa.array(order))
    texts = [None if t is None else (t if s is None else t[s:e]) for t, s, e in
             zip(*(g.column(c).to_pylist() for c in ("text", "span_start", "span_end")))]
    return pa.table({"query_id": [g.column("query_id")[0].as_py()],
                     "cand_text": pa.array([texts], CANDIDATE_FIELDS["cand_text"]),
                     "cand_image": pa.array([g.column("image").to_pylist()], CANDIDATE_FIELDS["cand_image"])})


def _fill(batch: pa.Table) -> pa.Table:
    """Put the joined content lists in place (queries without candidates get empty lists)."""
    n = batch.num_rows
    out = batch.drop_columns(["cand_text", "cand_image"])
    for name in ("cand_text", "cand_image"):
        joined = batch.column(f"{name}_src") if f"{name}_src" in batch.column_names else pa.nulls(n)
        out = out.drop_columns([f"{name}_src"]) if f"{name}_src" in out.column_names else out
        values = [v if v is not None else [] for v in joined.to_pylist()]
        out = out.append_column(name, pa.array(values, CANDIDATE_FIELDS[name]))
    return out


def _valid(batch: pa.Table, rejected: bool) -> pa.Table:
    is_rejected = pc.is_valid(batch.column("reject"))
    return batch.filter(is_rejected if rejected else pc.invert(is_rejected))


def join_source_content(ds: Any, source: dict[str, Any], storage: dict[str, Any], depth: int) -> Any:
    """`ds` (search actor output) with cand_text / cand_image filled from the source the index was built from.
    `source`: the build's `source` config section; `storage`: its filesystem options."""
    src = SourceConfig.model_validate({**source, "storage": storage})
    docs = open_corpus(src).dataset().map_batches(_documents, batch_format="pyarrow", batch_size=None)
    ds = ds.materialize()  # searched once (in the object store), read by both branches below
    partitions = max(1, min(256, ds.count() * depth // ROWS_PER_PARTITION + 1))
    valid = ds.map_batches(_valid, batch_format="pyarrow", batch_size=None, fn_kwargs={"rejected": False})
    rejected = ds.map_batches(_valid, batch_format="pyarrow", batch_size=None, fn_kwargs={"rejected": True})
    wanted = valid.map_batches(_explode, batch_format="pyarrow", batch_size=None, fn_kwargs={"depth": depth})
    joined = wanted.join(docs, join_type="left_outer", num_partitions=partitions, on=("id",))
    per_query = joined.groupby("query_id", num_partitions=partitions).map_groups(_gather, batch_format="pyarrow")
    per_query = per_query.rename_columns({"cand_text": "cand_text_src", "cand_image": "cand_image_src"})
    filled = valid.join(per_query, join_type="left_outer", num_partitions=partitions, on=("query_id",))
    return filled.map_batches(_fill, batch_format="pyarrow", batch_size=None).union(
        rejected.map_batches(_fill, batch_format="pyarrow", batch_size=None))
