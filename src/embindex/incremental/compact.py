"""Compaction and retention.

`compact` rewrites a version whose tombstones pass a threshold: live rows only, one new part per old
shard (one task per shard, in Ray when it is up), tiers trained and built again, no tombstones. No
model runs: vectors are copied. It publishes only on top of the version it compacted (index/publish.py);
retention is index/gc.py's job.
"""

from __future__ import annotations

import json
import secrets
import time
from datetime import datetime, timezone
from typing import Any

import numpy as np
import pyarrow as pa

from ..config import IndexConfig, ResourcesConfig
from ..index import layout
from ..index.manifest import Manifest, ShardEntry
from ..index.multivector import build_token_index
from ..index.commits import write_run_record
from ..index.publish import latest_version, publish, read_manifest
from ..index.shards import put_part, read_table
from ..index.tier_builder import build_tiers
from ..index.tombstones import read_tombstones, tombstone_mask
from ..logs import Log
from ..ray_runtime import ray_session, run_tasks
from ..storage import Storage, StorageOptions


def dead_fraction(manifest: Manifest) -> float:
    total = sum(s.rows for s in manifest.shards)
    return (manifest.tombstones or {}).get("rows", 0) / total if total else 0.0


def _compact_shard(root: str, options: StorageOptions, rel: str, offset: int, out_rel: str,
                   dead: np.ndarray) -> ShardEntry | None:
    """Task: one shard's live rows (ordinals offset.. not in the sorted `dead`) written to `out_rel`;
    None when no row is live."""
    store = Storage(root, options)
    table = read_table(store, rel)
    ordinals = np.arange(offset, offset + table.num_rows, dtype=np.int64)
    lo, hi = np.searchsorted(dead, [offset, offset + table.num_rows])
    live = table.filter(pa.array(~tombstone_mask(ordinals, dead[lo:hi])))
    if live.num_rows == 0:
        return None
    return ShardEntry(**put_part(store, out_rel, live))


def compact(uri: str, storage: dict[str, Any] | None = None, threshold: float = 0.2, force: bool = False,
            log: Log | None = None) -> Manifest | None:
    """Publish a compacted copy of the latest version when its tombstoned fraction >= `threshold`
    (or `force`); returns the new manifest, or None when there was nothing to do."""
    log = log or (lambda _m: None)
    store = Storage(uri, StorageOptions.from_dict(storage))
    base_version = latest_version(store)
    base = read_manifest(store, base_version)
    frac = dead_fraction(base)
    if not force and frac < threshold:
        log(f"[embindex] {base.version}: {frac:.1%} of rows tombstoned < {threshold:.0%}; nothing to compact")
        return None
    with ray_session(ResourcesConfig()):  # $RAY_ADDRESS (a cluster job), else a local Ray
        return _compact(store, base, uri, log)


def _compact(store: Storage, base: Manifest, uri: str, log: Log) -> Manifest:
    t0 = time.perf_counter()
    run_id = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S") + "-compact-" + secrets.token_hex(2)
    write_run_record(store, run_id, base.fingerprint or "", kind="compact", base=base.version)
    dead = read_tombstones(store, base)
    offsets = np.cumsum([0] + [s.rows for s in base.shards]).tolist()
    offset = offsets[-1]
    calls = [(store.root, store.options, s.path, offsets[i], layout.part_path(run_id, f"{i:05d}"))
             for i, s in enumerate(base.shards)]
    shards = [s for s in run_tasks(_compact_shard, calls, shared={"dead": dead}) if s is not None]
    index_cfg = IndexConfig.model_validate({**base.config.get("index", {}), "uri": uri, "storage": {}})
    paths = [s.path for s in shards]
    tier_entries, quality = build_tiers(store, paths, base.dim, [t.dim for t in base.tiers], index_cfg, run_id,
                                        shard_rows=[s.rows for s in shards], vector_files=[s.vectors for s in shards])
    outputs = json.loads(json.dumps(base.outputs))
    mv = outputs.get("multivector")
    if mv and mv.get("token_index"):
        mv["token_index"] = build_token_index(store, paths, int(mv.get("dim") or base.dim), run_id)
    rows = sum(s.rows for s in shards)
    extra = {}
    if getattr(base, "stages", None):  # the same stages; their counts are this run's, and it generated nothing
        extra["stages"] = [s if isinstance(s, str) else {**s, "counts": {"documents": 0, "tokens": 0}}
                           for s in base.stages]
    manifest = base.model_copy(deep=True, update={
        **extra, "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"), "run_id": run_id,
        "shards": shards, "tiers": tier_entries, "quality": quality, "tombstones": {}, "delta": {},
        "outputs": outputs, "trained_rows": rows,
        "counts": base.counts.model_copy(update={"chunks": rows, "vectors": rows}),
        "fragments": {"total": 0, "embedded": 0, "reused": 0},
        "timings": {"total_s": round(time.perf_counter() - t0, 3)},
    })
    manifest = publish(store, manifest, base.version, commit=index_cfg.commit, log=log)
    log(f"[embindex] compacted {base.version} -> {manifest.version}: {offset} rows -> {rows} live rows")
    return manifest
