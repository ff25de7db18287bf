"""Fragment commits and run records: what makes a build exactly-once and resumable.

Each fragment's part and rejects files are written under deterministic names, then a small marker
`shards/<run_id>/_commits/<fragment_id>.json` is written last: a fragment counts as done exactly
when its marker exists. A rerun with the same run id lists the markers (one per fragment, never one
per document) and embeds only the fragments that have none.
"""

from __future__ import annotations

import json
from typing import Any

from ..storage import Storage
from . import layout

RUN_RECORD = "_run.json"


def commit_path(run_id: str, fragment_id: str) -> str:
    return f"{layout.run_dir(run_id)}/_commits/{fragment_id}.json"


def write_commit(store: Storage, run_id: str, fragment_id: str, records: list[dict[str, Any]]) -> None:
    store.write_text(commit_path(run_id, fragment_id), json.dumps({"fragment": fragment_id, "records": records}))


def read_commits(store: Storage, run_id: str) -> dict[str, list[dict[str, Any]]]:
    """fragment id -> the shard records its commit lists."""
    out = {}
    for name in store.listdir(f"{layout.run_dir(run_id)}/_commits"):
        if not name.endswith(".json"):
            continue
        data = json.loads(store.read_text(f"{layout.run_dir(run_id)}/_commits/{name}"))
        out[data["fragment"]] = data["records"]
    return out


def write_run_record(store: Storage, run_id: str, fingerprint: str) -> None:
    store.write_text(f"{layout.run_dir(run_id)}/{RUN_RECORD}", json.dumps({"run_id": run_id,
                                                                          "fingerprint": fingerprint}))


def read_run_record(store: Storage, run_id: str) -> dict[str, Any] | None:
    rel = f"{layout.run_dir(run_id)}/{RUN_RECORD}"
    return json.loads(store.read_text(rel)) if store.exists(rel) else None


def unfinished_runs(store: Storage, published_run_ids: set[str]) -> list[str]:
    """Runs with a run record that no published version came from, oldest first."""
    runs = [r for r in store.listdir(layout.SHARDS_DIR) if r not in published_run_ids]
    return [r for r in runs if store.exists(f"{layout.run_dir(r)}/{RUN_RECORD}")]
