"""Fragment commits and run records: what makes a build exactly-once and resumable.

Each fragment's part and rejects files are written under deterministic names, then a small marker
`shards/<run_id>/_commits/<fragment_id>.json` is written last: a fragment counts as done exactly
when its marker exists. A rerun with the same run id lists the markers (one per fragment, never one
per document) and embeds only the fragments that have none.
"""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from ..storage import Storage
from . import layout

READ_THREADS = 32


def write_commit(store: Storage, run_id: str, fragment_id: str, records: list[dict[str, Any]]) -> None:
    store.write_text(layout.commit_path(run_id, fragment_id), json.dumps({"fragment": fragment_id, "records": records}))


def read_commits(store: Storage, run_id: str) -> dict[str, list[dict[str, Any]]]:
    """fragment id -> the shard records its commit lists. Markers are read concurrently (one small GET
    each on an object store)."""
    folder = layout.commits_dir(run_id)
    names = [n for n in store.listdir(folder) if n.endswith(".json")]
    with ThreadPoolExecutor(max_workers=READ_THREADS) as pool:
        markers = list(pool.map(lambda n: json.loads(store.read_text(f"{folder}/{n}")), names))
    return {m["fragment"]: m["records"] for m in markers}


def write_run_record(store: Storage, run_id: str, fingerprint: str, *, kind: str = "build",
                     base: str | None = None, source: str | None = None) -> None:
    """The run's record: its fingerprint, what it is, the version it started from (garbage collection
    keeps an in-flight run's base) and when it started."""
    store.write_text(layout.run_record_path(run_id), json.dumps({
        "run_id": run_id, "fingerprint": fingerprint, "kind": kind, "base": base, "source": source,
        "started_at": time.time()}))


def read_run_record(store: Storage, run_id: str) -> dict[str, Any] | None:
    rel = layout.run_record_path(run_id)
    return json.loads(store.read_text(rel)) if store.exists(rel) else None


def mark_publishing(store: Storage, run_id: str, version: str) -> None:
    """Written between claiming `version` and switching `_latest` to it: from then on the run's files
    may belong to a published version, so the run id is never resumed (see published_version)."""
    store.write_text(layout.published_path(run_id), json.dumps({"run_id": run_id, "version": version}))


def clear_publishing(store: Storage, run_id: str, version: str) -> None:
    """The claim of `version` was withdrawn (another writer moved `_latest`): the run was not published."""
    rel = layout.published_path(run_id)
    if store.exists(rel) and json.loads(store.read_text(rel)).get("version") == version:
        store.delete(rel)


def published_version(store: Storage, run_id: str) -> str | None:
    """The version this run published (or was publishing when it stopped), or None."""
    rel = layout.published_path(run_id)
    if not store.exists(rel):
        return None
    version = json.loads(store.read_text(rel))["version"]
    manifest = layout.manifest_path(version)
    if store.exists(manifest) and json.loads(store.read_text(manifest)).get("run_id") != run_id:
        return None  # the claim was withdrawn and the number went to another run
    # published (possibly since collected), or withdrawn by a writer that died before clearing the
    # marker: either way the run's files are not to be rewritten
    return version


def unfinished_runs(store: Storage, published_run_ids: set[str]) -> list[str]:
    """Runs with a run record that never published a version, oldest first."""
    runs = [r for r in store.listdir(layout.SHARDS_DIR) if r not in published_run_ids]
    return [r for r in runs if store.exists(layout.run_record_path(r))
            and published_version(store, r) is None]
