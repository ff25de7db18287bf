"""`embindex reindex`: embed only what changed since the published version.

1. snapshot the source (id -> content hash of every valid document), diff it against the live rows of
   the current version: added and changed documents are embedded, deleted and changed ones get
   tombstones, unchanged rows are reused as they are;
2. the new version lists the previous (immutable) Parquet shards plus this run's delta shards; every
   tier gets one more index file for the delta, built on the tier's trained index (no retraining);
3. rejects are those of the current source; rows in = live documents + rejects is checked before
   publishing. Only a changed model/outputs fingerprint makes it a full build (re-embedding); tiers
   that cannot take another delta (binary, or `index.max_tier_deltas` reached) or that the index
   outgrew are rebuilt from the vectors stored in the Parquet shards.
"""

from __future__ import annotations

import os
import time
from typing import Any

import numpy as np


from .config import JobConfig, load_config
from .incremental.delta_tiers import extend_tiers, extendable
from .incremental.diff import Delta, compute_delta, live_side, new_side, tombstone_table
from .index import layout
from .index.manifest import Counts
from .index.multivector import build_token_index
from .index.publish import latest_version, read_manifest
from .index.shards import put_table, read_table
from .index.tier_builder import build_tiers
from .logs import Log, stderr_log
from .pipeline import BuildResult, Job, build
from .ray_runtime import ray_session
from .reconcile import ReconciliationError, merge_dtypes, shard_entries, token_count, used_dtype
from .sources.census import fragments_holding, take_census
from .stages.normalize import Normalize
from .storage import Storage


def reindex(config: str | os.PathLike | dict[str, Any] | JobConfig, overrides: dict[str, Any] | None = None,
            log: Log | None = stderr_log) -> BuildResult:
    """Publish a new version that embeds only new or changed documents (or a full build when needed)."""
    log = log or (lambda _m: None)
    cfg = load_config(config, overrides)
    store = Storage(cfg.index.uri, cfg.index.storage_options())
    base_version = latest_version(store)
    if base_version is None:
        log("[embindex] no published version yet: full build")
        return build(cfg, log=log)
    base = read_manifest(store, base_version)
    job = Job(cfg, log, kind="reindex", base=base_version)
    if base.fingerprint != job.fingerprint:
        log("[embindex] model or outputs changed since the published version: full rebuild")
        return build(cfg, log=log)

    with ray_session(cfg.resources):
        job.start()
        census = take_census(job.corpus.dataset(), len(job.corpus.fragments))
        rows_in = census.rows_in
        stored_rows = sum(s.rows for s in base.shards)
        base_dead = read_table(store, base.tombstones["path"]) if (base.tombstones or {}).get("path") else \
            tombstone_table(np.zeros(0, np.int64), [])
        delta: Delta = compute_delta(new_side(job.corpus.dataset(), census.duplicates),
                                     live_side(store, [(s.path, s.rows) for s in base.shards],
                                               (base.tombstones or {}).get("path")),
                                     base_dead.select(["ordinal", "id"]), expected_ids=stored_rows + rows_in)
        log(f"[embindex] {rows_in} rows; delta against {base_version}: {delta.summary()}")
        redo = delta.fragments | {f for f, n in census.rejects.items() if n} | \
            fragments_holding(job.corpus.dataset(), census.duplicates)

        def wanted(f: Any) -> bool:
            return f.id in redo

        job.embed(wanted, rows_in, Normalize(frozenset(census.duplicates), embed_ids=delta.to_embed))
        parts, rejects = job.records(wanted)

        dead = delta.dead
        n_rej = sum(r["rows"] for r in rejects)
        delta_ids = [i for p in parts for i in read_table(store, p["path"], columns=["id"]).column("id").to_pylist()]
        delta_docs = set(delta_ids)
        # rows that only the embed pass could reject (an image that does not decode, an image for a
        # text-only model) were counted as documents by the source's pass
        late = delta.to_embed & {i for r in rejects for i in read_table(store, r["path"], columns=["id"])
                                 .column("id").to_pylist()}
        if delta_docs != delta.to_embed - late:
            raise ReconciliationError(f"embedded {len(delta_docs)} documents, expected "
                                      f"{len(delta.to_embed - late)}")
        n_docs = delta.unchanged + len(delta_docs)
        if n_docs + n_rej != rows_in:
            raise ReconciliationError(f"rows in {rows_in} != live {n_docs} + rejected {n_rej}; not published")

        t = time.perf_counter()
        all_paths = [s.path for s in base.shards] + [p["path"] for p in parts]
        all_rows = [s.rows for s in base.shards] + [p["rows"] for p in parts]
        trained_rows = base.trained_rows or stored_rows
        rebuild = _why_rebuild_tiers(base.tiers, stored_rows + len(delta_ids), trained_rows, cfg.index)
        if rebuild:
            log(f"[embindex] {rebuild}: rebuilding every tier from the stored vectors (nothing re-embedded)")
            tier_entries, quality = build_tiers(
                store, all_paths, job.info.dim, job.tier_dims, cfg.index, job.run_id, shard_rows=all_rows,
                vector_files=[s.vectors for s in base.shards] + [p.get("vectors") for p in parts])
            trained_rows = stored_rows + len(delta_ids)
        else:
            tier_entries = extend_tiers(store, base.tiers, [p["path"] for p in parts], stored_rows, job.run_id)
            quality = dict(base.quality)
            quality["carried_from"] = base.quality.get("carried_from", base_version)
        token_index = None
        if cfg.outputs.multivector is not None and cfg.outputs.multivector.candidates == "tokens":
            token_index = build_token_index(store, all_paths, job.info.token_dim or job.info.dim, job.run_id)
        tomb_rel = f"{layout.run_dir(job.run_id)}/tombstones.parquet"
        put_table(store, tomb_rel, tombstone_table(dead, delta.dead_ids))
        job.timings["tiers_s"] = round(time.perf_counter() - t, 3)

    total_rows = stored_rows + len(delta_ids)
    live_rows_n = total_rows - len(dead)
    counts = Counts(rows_in=rows_in, documents=n_docs, chunks=live_rows_n, vectors=live_rows_n, rejected=n_rej)
    n_frag = len(job.corpus.fragments)
    embedded = len([f for f in job.corpus.fragments if wanted(f)])
    base_tokens = int((base.outputs.get("multivector") or {}).get("tokens", 0))
    return job.publish(
        shards=list(base.shards) + shard_entries(parts), tokens=base_tokens + token_count(parts), rejects=rejects,
        tier_entries=tier_entries, quality=quality, counts=counts, token_index=token_index,
        fragments={"total": n_frag, "embedded": embedded - job.committed_before,
                   "reused": n_frag - embedded + job.committed_before},
        tombstones={"path": tomb_rel, "rows": int(len(dead))},
        dtype=merge_dtypes(base.model.dtype, used_dtype(parts)),  # base rows keep the dtype they were embedded in
        delta={**delta.summary(), "documents_embedded": len(delta_docs), "rejected_when_embedded": len(late)},
        trained_rows=trained_rows,
    )


def _why_rebuild_tiers(base: list, rows: int, trained_rows: int, index_cfg: Any) -> str | None:
    """Why the tiers are rebuilt from the stored vectors instead of extended with a delta, or None."""
    if rows > index_cfg.retrain_growth * trained_rows:
        return f"{rows} rows > {index_cfg.retrain_growth}x the {trained_rows} the tiers were trained on"
    if not extendable(base, index_cfg.max_tier_deltas):
        return (f"the tiers hold {index_cfg.max_tier_deltas} delta indexes (index.max_tier_deltas)"
                if all(t.metric == "ip" for t in base) else "binary tiers are not extended in place")
    return None
