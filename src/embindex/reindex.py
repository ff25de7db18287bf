"""`embindex reindex`: embed only what changed since the published version.

1. snapshot the source (id -> content hash of every valid document), diff it against the live rows of
   the current version: added and changed documents are embedded, deleted and changed ones get
   tombstones, unchanged rows are reused as they are;
2. the new version lists the previous (immutable) Parquet shards plus this run's delta shards; every
   tier gets one more index file for the delta, built on the tier's trained index (no retraining);
3. rejects are those of the current source; rows in = live documents + rejects is checked before
   publishing. A changed model/outputs fingerprint, or tiers that cannot be extended in place (merged
   on disk, binary), make it a full build.
"""

from __future__ import annotations

import os
import time
from typing import Any

import pyarrow as pa


from .config import JobConfig, load_config
from .incremental.delta_tiers import extend_tiers, extendable
from .incremental.diff import Delta, diff, keep_delta_rows, live_rows, new_tombstones, take_snapshot, \
    tombstone_table
from .index import layout
from .index.manifest import Counts
from .index.multivector import build_token_index
from .index.publish import latest_version, read_manifest
from .index.shards import put_table, read_table
from .index.tier_builder import build_tiers
from .index.tombstones import read_tombstones
from .pipeline import BuildResult, Job, Log, ReconciliationError, _stderr, build, shard_entries, token_count
from .ray_runtime import ray_session
from .sources.normalize import mark_duplicates
from .storage import Storage


def reindex(config: str | os.PathLike | dict[str, Any] | JobConfig, overrides: dict[str, Any] | None = None,
            log: Log | None = _stderr) -> BuildResult:
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
    if not extendable(base.tiers):
        log("[embindex] the published tiers cannot be extended in place: full rebuild")
        return build(cfg, log=log)

    with ray_session(cfg.resources):
        job.start()
        snap = take_snapshot(job.corpus.dataset())
        rows_in = sum(snap.per_fragment.values())
        base_paths = [s.path for s in base.shards]
        live = live_rows(store, base_paths, read_tombstones(store, base))
        delta: Delta = diff(snap, live)
        log(f"[embindex] {rows_in} rows; delta against {base_version}: {delta.summary()}")
        embed_fragments = {snap.fragment_of[i] for i in delta.to_embed}

        def wanted(f: Any) -> bool:
            return f.id in embed_fragments or f.id in snap.fragments_with_rejects

        steps = [(keep_delta_rows, {"embed_ids": pa.array(sorted(delta.to_embed), pa.string())})]
        if snap.duplicates:
            steps.insert(0, (mark_duplicates, {"duplicate_ids": frozenset(snap.duplicates)}))
        job.embed(wanted, rows_in, steps)
        parts, rejects = job.records(wanted)

        dead = new_tombstones(live, delta)
        n_rej = sum(r["rows"] for r in rejects)
        delta_ids = [i for p in parts for i in read_table(store, p["path"], columns=["id"]).column("id").to_pylist()]
        delta_docs = set(delta_ids)
        kept = set(live.hashes) - delta.deleted - delta.changed
        # rows that only the embed pass could reject (an image that does not decode, an image for a
        # text-only model) were counted as documents by the snapshot
        late = delta.to_embed & {i for r in rejects for i in read_table(store, r["path"], columns=["id"])
                                 .column("id").to_pylist()}
        if delta_docs != delta.to_embed - late:
            raise ReconciliationError(f"embedded {len(delta_docs)} documents, expected "
                                      f"{len(delta.to_embed - late)}")
        n_docs = len(kept) + len(delta_docs)
        if n_docs + n_rej != rows_in:
            raise ReconciliationError(f"rows in {rows_in} != live {n_docs} + rejected {n_rej}; not published")

        t = time.perf_counter()
        all_paths = base_paths + [p["path"] for p in parts]
        trained_rows = base.trained_rows or live.total
        if live.total + len(delta_ids) > cfg.index.retrain_growth * trained_rows:
            log(f"[embindex] {live.total + len(delta_ids)} rows > {cfg.index.retrain_growth}x the {trained_rows} "
                "the tiers were trained on: retraining every tier")
            tier_entries, quality = build_tiers(store, all_paths, job.info.dim, job.tier_dims, cfg.index,
                                                job.run_id)
            trained_rows = live.total + len(delta_ids)
        else:
            tier_entries = extend_tiers(store, base.tiers, [p["path"] for p in parts], live.total, job.run_id)
            quality = dict(base.quality)
            quality["carried_from"] = base.quality.get("carried_from", base_version)
        token_index = None
        if cfg.outputs.multivector is not None and cfg.outputs.multivector.candidates == "tokens":
            token_index = build_token_index(store, all_paths, job.info.token_dim or job.info.dim, job.run_id)
        tomb_rel = f"{layout.run_dir(job.run_id)}/tombstones.parquet"
        put_table(store, tomb_rel, tombstone_table(dead, live.ids))
        job.timings["tiers_s"] = round(time.perf_counter() - t, 3)

    total_rows = live.total + len(delta_ids)
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
        delta={**delta.summary(), "documents_embedded": len(delta_docs), "rejected_when_embedded": len(late)},
        trained_rows=trained_rows,
    )
