"""Garbage collection under live readers and concurrent runs.

The published history is the chain of manifests from `_latest` through `parent`. A version beyond the
`keep` newest is dropped only when
- it stopped being `_latest` more than `grace_seconds` ago (when its successor was published), so a
  reader that opened it keeps working for at least the grace period; and
- no in-flight run started from it (a run records its base version when it starts; runs older than
  `inflight_seconds` count as abandoned).
Then its manifest is removed first (no new reader opens it) and after that every file it referenced
that no retained version references, and the run folders only dropped versions used. Files of
unpublished (resumable) runs are never touched. Manifests that were claimed but never published (a
writer died between claiming a number and switching `_latest`) are removed after the grace period.
"""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime

from ..logs import Log
from ..storage import Storage
from . import commits, layout
from .manifest import Manifest
from .publish import latest_version, list_versions, read_manifest

GRACE_SECONDS = 3600.0
INFLIGHT_SECONDS = 7 * 86400.0


def files_of(m: Manifest) -> set[str]:
    """Every file a version references."""
    files = {s.path for s in m.shards} | {s.vectors for s in m.shards if s.vectors} | {r.path for r in m.rejects}
    for t in m.tiers:
        files.update(t.files)
        files.update(t.deltas)
    mv = (m.outputs or {}).get("multivector") or {}
    if mv.get("token_index"):
        files.update(mv["token_index"].get("files") or [mv["token_index"]["file"]])
    if (m.tombstones or {}).get("path"):
        files.add(m.tombstones["path"])
    return files


def _timestamp(iso: str) -> float:
    return datetime.fromisoformat(iso).timestamp()


def published_chain(store: Storage) -> list[Manifest]:
    """The published versions still present, newest first: `_latest`, its parent, and so on."""
    chain: list[Manifest] = []
    version = latest_version(store)
    while version and store.exists(layout.manifest_path(version)):
        chain.append(read_manifest(store, version))
        version = chain[-1].parent
    return chain


def inflight_bases(store: Storage, published_runs: set[str], now: float, inflight_seconds: float) -> set[str]:
    """Base versions of runs that started less than `inflight_seconds` ago and have not published."""
    runs = [r for r in store.listdir(layout.SHARDS_DIR) if r not in published_runs]

    def base_of(run_id: str) -> str | None:
        record = commits.read_run_record(store, run_id)
        if not record or now - float(record.get("started_at") or 0) > inflight_seconds:
            return None
        return None if commits.published_version(store, run_id) else record.get("base")

    with ThreadPoolExecutor(max_workers=commits.READ_THREADS) as pool:
        return {b for b in pool.map(base_of, runs) if b}


def collect_garbage(store: Storage, keep: int, log: Log | None = None, *, grace_seconds: float = GRACE_SECONDS,
                    inflight_seconds: float = INFLIGHT_SECONDS, now: float | None = None) -> list[str]:
    """Drop versions beyond the `keep` newest whose grace period is over and that no in-flight run
    builds on, and the files only they referenced. Returns the versions removed."""
    log = log or (lambda _m: None)
    now = time.time() if now is None else now
    chain = published_chain(store)
    if not chain:
        return []
    bases = inflight_bases(store, {m.run_id for m in chain}, now, inflight_seconds)
    keep = max(keep, 1)
    dropped, retained = [], chain[:keep]
    for successor, m in zip(chain[keep - 1:], chain[keep:]):
        # `m` stopped being _latest when its successor was published
        if now - _timestamp(successor.created_at) < grace_seconds or m.version in bases:
            retained.append(m)
        else:
            dropped.append(m)
    _remove_unpublished_claims(store, {m.version for m in chain}, now, grace_seconds, log)
    if not dropped:
        return []
    referenced = set().union(*(files_of(m) for m in retained))
    for m in dropped:  # manifests first: no new reader opens a version whose files are going away
        store.delete(f"{layout.VERSIONS_DIR}/{m.version}")
        log(f"[embindex] removed version {m.version}")
    garbage = set().union(*(files_of(m) for m in dropped)) - referenced
    with ThreadPoolExecutor(max_workers=commits.READ_THREADS) as pool:
        list(pool.map(store.delete, sorted(garbage)))
    used_runs = {f.split("/")[1] for f in referenced if f.startswith(layout.SHARDS_DIR + "/")}
    runs = {m.run_id for m in dropped} | {f.split("/")[1] for f in garbage if f.startswith(layout.SHARDS_DIR + "/")}
    for run_id in runs - used_runs:  # commit markers, run record, tier folders
        store.delete(layout.run_dir(run_id))
    return [m.version for m in dropped]


def _remove_unpublished_claims(store: Storage, published: set[str], now: float, grace_seconds: float,
                               log: Log) -> None:
    """Manifests no `_latest` ever pointed to, older than the grace period (a claim in progress is
    seconds old)."""
    for v in list_versions(store):
        if v in published:
            continue
        rel = layout.manifest_path(v)
        try:
            created = _timestamp(json.loads(store.read_text(rel))["created_at"])
        except (FileNotFoundError, KeyError, ValueError):
            continue
        if now - created >= grace_seconds:
            store.delete(f"{layout.VERSIONS_DIR}/{v}")
            log(f"[embindex] removed unpublished version {v}")
