"""A build's run: its id (new, given or resumed), the checks that a resumed run continues the same build,
and the fingerprint that says which builds' vectors are comparable."""

from __future__ import annotations

import hashlib
import json
import secrets
from datetime import datetime, timezone
from typing import Any

from .config import JobConfig
from .index.commits import published_version, read_run_record, unfinished_runs, write_run_record
from .index.publish import list_versions, read_manifest
from .logs import Log
from .storage import Storage


def _run_id(cfg: JobConfig) -> str:
    if cfg.run.id:
        return cfg.run.id
    return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S") + "-" + secrets.token_hex(3)


def build_fingerprint(cfg: JobConfig, checkpoint: str, stages: list[str] | None = None) -> str:
    """What makes two builds' vectors comparable: model, task, role, dtype, length and outputs, and the
    fingerprints of the generative stages that wrote the embedded text."""
    m = cfg.model
    payload = {"model": [m.name, checkpoint, m.task, m.role, m.dtype, m.max_length, m.pooling],
               "outputs": cfg.outputs.model_dump(mode="json")}
    if stages:
        payload["stages"] = list(stages)
    return "sha256:" + hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:32]


def resolve_run(cfg: JobConfig, store: Storage, fingerprint: str, log: Log, kind: str = "build",
                base: str | None = None) -> str:
    """The run id: `run.id`, or with `run.resume` the newest unpublished run of the same kind (a
    reindex: started from the same base), or a new one. A resumed run must have the same fingerprint
    and source as the run it continues; a run id that published a version is never reused (its files
    belong to that version and must not be rewritten)."""
    run_id = cfg.run.id
    if run_id is None and cfg.run.resume:
        published = {read_manifest(store, v).run_id for v in list_versions(store)}
        pending = [r for r in unfinished_runs(store, published) if _resumable(read_run_record(store, r), kind, base)]
        run_id = pending[-1] if pending else None
        if run_id:
            log(f"[embindex] resuming run {run_id}")
    run_id = run_id or _run_id(cfg)
    done = published_version(store, run_id)
    if done:
        raise ValueError(f"run {run_id} already published {done} of {store.root}; its files are immutable. "
                         "Use a new run id (or none: one is generated)")
    record = read_run_record(store, run_id)
    if record is not None and record["fingerprint"] != fingerprint:
        raise ValueError(f"run {run_id} was started with another model/outputs fingerprint; "
                         "use a new run id")
    if record is not None and record.get("source", cfg.source.uri) != cfg.source.uri:
        raise ValueError(f"run {run_id} was started on {record['source']}, not {cfg.source.uri}; use a new run id")
    write_run_record(store, run_id, fingerprint, kind=kind, base=base, source=cfg.source.uri)
    return run_id


def _resumable(record: dict[str, Any] | None, kind: str, base: str | None) -> bool:
    """A reindex continues only a reindex from the same base (its delta was computed against it)."""
    if record is None or record.get("kind", "build") != kind:
        return False
    return kind != "reindex" or record.get("base") == base
