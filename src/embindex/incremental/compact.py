"""Compaction and retention.

`compact` rewrites a version whose tombstones pass a threshold: live rows only, one new part per old
shard (read and written one shard at a time), tiers trained and built again, no tombstones. No model
runs: vectors are copied. `collect_garbage` drops versions beyond `keep` and the files that only they
referenced; files of retained versions and of unpublished (resumable) runs are never touched.
"""

from __future__ import annotations

import json
import secrets
import time
from datetime import datetime, timezone
from typing import Any, Callable

import pyarrow as pa

from ..config import IndexConfig
from ..index import layout
from ..index.manifest import Manifest, ShardEntry
from ..index.multivector import build_token_index
from ..index.publish import latest_version, list_versions, next_version, publish, read_manifest
from ..index.shards import put_table, read_table
from ..index.tier_builder import build_tiers
from ..index.tombstones import read_tombstones, tombstone_mask
from ..storage import Storage, StorageOptions

Log = Callable[[str], None]


def dead_fraction(manifest: Manifest) -> float:
    total = sum(s.rows for s in manifest.shards)
    return (manifest.tombstones or {}).get("rows", 0) / total if total else 0.0


def compact(uri: str, storage: dict[str, Any] | None = None, threshold: float = 0.2, force: bool = False,
            log: Log | None = None) -> Manifest | None:
    """Publish a compacted copy of the latest version when its tombstoned fraction >= `threshold`
    (or `force`); returns the new manifest, or None when there was nothing to do."""
    log = log or (lambda _m: None)
    store = Storage(uri, StorageOptions.from_dict(storage))
    base = read_manifest(store)
    frac = dead_fraction(base)
    if not force and frac < threshold:
        log(f"[embindex] {base.version}: {frac:.1%} of rows tombstoned < {threshold:.0%}; nothing to compact")
        return None
    t0 = time.perf_counter()
    run_id = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S") + "-compact-" + secrets.token_hex(2)
    dead = read_tombstones(store, base)
    shards, offset = [], 0
    for i, s in enumerate(base.shards):
        table = read_table(store, s.path)
        ordinals = pa.array(range(offset, offset + table.num_rows)).to_numpy()
        offset += table.num_rows
        live = table.filter(pa.array(~tombstone_mask(ordinals, dead)))
        if live.num_rows == 0:
            continue
        rel = f"{layout.run_dir(run_id)}/part-{i:05d}.parquet"
        size, sha = put_table(store, rel, live)
        shards.append(ShardEntry(path=rel, rows=live.num_rows, bytes=size, sha256=sha))
    index_cfg = IndexConfig.model_validate({**base.config.get("index", {}), "uri": uri, "storage": {}})
    paths = [s.path for s in shards]
    tier_entries, quality = build_tiers(store, paths, base.dim, [t.dim for t in base.tiers], index_cfg, run_id)
    outputs = json.loads(json.dumps(base.outputs))
    mv = outputs.get("multivector")
    if mv and mv.get("token_index"):
        rel, n = build_token_index(store, paths, int(mv.get("dim") or base.dim), run_id)
        mv["token_index"] = {**mv["token_index"], "file": rel, "vectors": n}
    rows = sum(s.rows for s in shards)
    manifest = base.model_copy(deep=True, update={
        "version": next_version(store), "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "run_id": run_id, "parent": base.version, "shards": shards, "tiers": tier_entries, "quality": quality,
        "tombstones": {}, "delta": {}, "outputs": outputs, "trained_rows": sum(s.rows for s in shards),
        "counts": base.counts.model_copy(update={"chunks": rows, "vectors": rows}),
        "fragments": {"total": 0, "embedded": 0, "reused": 0},
        "timings": {"total_s": round(time.perf_counter() - t0, 3)},
    })
    publish(store, manifest)
    log(f"[embindex] compacted {base.version} -> {manifest.version}: {offset} rows -> {rows} live rows")
    return manifest


def _files_of(m: Manifest) -> set[str]:
    files = {s.path for s in m.shards} | {r.path for r in m.rejects}
    for t in m.tiers:
        files.update(t.files)
    mv = (m.outputs or {}).get("multivector") or {}
    if mv.get("token_index"):
        files.add(mv["token_index"]["file"])
    if (m.tombstones or {}).get("path"):
        files.add(m.tombstones["path"])
    return files


def collect_garbage(store: Storage, keep: int, log: Log | None = None) -> list[str]:
    """Delete versions older than the `keep` newest and the files no retained version references.
    Returns the versions removed."""
    log = log or (lambda _m: None)
    versions = list_versions(store)
    latest = latest_version(store)
    retained = versions[-keep:] if keep > 0 else versions
    if latest and latest not in retained:
        retained.append(latest)
    dropped = [v for v in versions if v not in retained]
    if not dropped:
        return []
    referenced: set[str] = set()
    for v in retained:
        referenced |= _files_of(read_manifest(store, v))
    garbage: set[str] = set()
    for v in dropped:
        garbage |= _files_of(read_manifest(store, v))
    for v in dropped:  # manifests first: no new reader opens a version whose files are going away
        store.fs.rm(store.fs_path(f"{layout.VERSIONS_DIR}/{v}"), recursive=True)
        log(f"[embindex] removed version {v}")
    for rel in sorted(garbage - referenced):
        if store.exists(rel):
            store.fs.rm(store.fs_path(rel), recursive=True)
    return dropped
