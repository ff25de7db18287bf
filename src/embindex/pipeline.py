"""Assemble and run one build: read -> normalize -> tokenize -> embed -> write shards -> tiers -> publish."""

from __future__ import annotations

import json
import logging
import os
import hashlib
import secrets
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Callable

import pyarrow as pa
import pyarrow.compute as pc

from .checkpoints import model_spec
from .config import JobConfig, load_config
from .embed.progress import ProgressReporter
from .embed.stages import EmbedActor, tokenize_batch
from .index import tiers
from .index.manifest import Counts, Manifest, ModelEntry, RejectsEntry, ShardEntry
from .index.commits import read_commits, read_run_record, unfinished_runs, write_run_record
from .index.publish import latest_version, list_versions, next_version, publish, read_manifest
from .index.shards import read_table, write_fragment
from .index.multivector import build_token_index
from .index.tier_builder import build_tiers
from .models import load_family
from .models.base import checkpoint_hash
from .sources.normalize import mark_duplicates
from .ray_runtime import actor_resources, ray_session
from .sources.readers import open_corpus
from .storage import Storage

Log = Callable[[str], None]


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


@dataclass
class BuildResult:
    index_uri: str
    version: str
    manifest_uri: str
    counts: dict[str, int]
    timings: dict[str, float]
    manifest: Manifest = field(repr=False)

    def summary(self) -> str:
        c = self.counts
        return (
            f"published {self.version} at {self.index_uri}\n"
            f"  rows in {c['rows_in']}: indexed {c['documents']}, rejected {c['rejected']}; "
            f"chunks {c['chunks']}, vectors {c['vectors']}\n"
            f"  wall time {self.timings['total_s']:.1f}s (embed+write {self.timings['pipeline_s']:.1f}s, "
            f"tiers {self.timings['tiers_s']:.1f}s)\n"
            f"  manifest {self.manifest_uri}"
        )


class ReconciliationError(RuntimeError):
    """Rows in != documents indexed + rows rejected, or an id indexed twice: nothing is published."""


def _run_id(cfg: JobConfig) -> str:
    if cfg.run.id:
        return cfg.run.id
    return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S") + "-" + secrets.token_hex(3)


def _count_and_find_duplicates(ds: Any) -> tuple[Counter[str], set[str]]:
    """First pass over the normalized rows: rows per fragment and the ids that occur more than once
    among documents."""
    seen: Counter[str] = Counter()
    per_fragment: Counter[str] = Counter()
    for batch in ds.select_columns(["id", "reject", "fragment"]).iter_batches(batch_format="pyarrow",
                                                                              batch_size=None):
        per_fragment.update(batch.column("fragment").to_pylist())
        seen.update(batch.filter(pc.is_null(batch.column("reject"))).column("id").to_pylist())
    return per_fragment, {i for i, n in seen.items() if n > 1}


def build(
    config: str | os.PathLike | dict[str, Any] | JobConfig,
    overrides: dict[str, Any] | None = None,
    log: Log | None = _stderr,
) -> BuildResult:
    """Build and publish a new index version from a job config (path, dict or JobConfig).

    With `run.id` set (or `run.resume: true`) a rerun resumes: fragments with a commit marker are not
    embedded again."""
    import ray
    import ray.data

    log = log or (lambda _m: None)
    cfg = load_config(config, overrides)
    t0 = time.perf_counter()
    spec = model_spec(cfg.model)
    family = load_family(spec)
    family.check_task(cfg.model.task)
    info = family.info()
    check_outputs(cfg, info)
    tier_dims = tiers.resolve_tiers(cfg.index.tiers, info.dim)
    ckpt_hash = checkpoint_hash(spec.path)
    store = Storage(cfg.index.uri, cfg.index.storage_options())
    fingerprint = build_fingerprint(cfg, ckpt_hash)
    run_id = _resolve_run(cfg, store, fingerprint, log)
    model_json = cfg.model.model_dump_json()
    outputs_json = cfg.outputs.model_dump_json()
    window = (cfg.outputs.late_chunking.window if cfg.outputs.late_chunking else None) or info.max_length
    query_task = getattr(family, "query_task_for", lambda t: t)(cfg.model.task)

    with ray_session(cfg.resources):
        logging.getLogger("ray.data").setLevel(logging.WARNING)
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = bool(cfg.run.progress and sys.stderr.isatty())
        ctx.verbose_progress = False
        ctx.target_max_block_size = None  # one block per fragment, never split: fragments are the commit unit
        cpus, gpus, threads = actor_resources(cfg.resources)

        log(f"[embindex] run {run_id}: reading {cfg.source.uri}")
        corpus = open_corpus(cfg.source)
        per_fragment, duplicates = _count_and_find_duplicates(corpus.dataset())
        rows_in = sum(per_fragment.values())
        committed = read_commits(store, run_id)
        todo = [f for f in corpus.fragments if f.id not in committed and per_fragment[f.id]]
        reused = len(corpus.fragments) - len(todo)
        log(f"[embindex] {rows_in} rows in {len(corpus.files)} {corpus.format} file(s), "
            f"{len(corpus.fragments)} fragment(s) ({len(corpus.fragments) - len(todo)} already committed); "
            f"{len(duplicates)} duplicated id(s)")
        t_read = time.perf_counter()

        t_embed = time.perf_counter()
        embed_kwargs = {"model_json": model_json, "outputs_json": outputs_json, "task": cfg.model.task,
                        "batch_tokens": cfg.resources.batch_tokens, "torch_threads": threads,
                        "window": window, "window_overlap": window_overlap(cfg, window)}
        for attempt in range(1, cfg.run.max_attempts + 1):
            try:
                _embed_fragments(cfg, corpus, todo, duplicates, run_id, info.max_length, embed_kwargs,
                                 (cpus, gpus), rows_in, log)
                break
            except (ray.exceptions.RayError, OSError) as e:
                if attempt == cfg.run.max_attempts:
                    raise
                committed = read_commits(store, run_id)
                todo = [f for f in corpus.fragments if f.id not in committed and per_fragment[f.id]]
                log(f"[embindex] attempt {attempt} failed ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
                    f"retrying the {len(todo)} uncommitted fragment(s)")
        committed = read_commits(store, run_id)
        missing = [f.id for f in corpus.fragments if f.id not in committed and per_fragment[f.id]]
        if missing:
            raise ReconciliationError(f"{len(missing)} fragment(s) have no commit marker; not published")
        for f in corpus.fragments:
            got = sum(r["rows"] for r in committed.get(f.id, []))
            if got and got < per_fragment[f.id]:
                raise ReconciliationError(f"fragment {f.id} committed {got} of {per_fragment[f.id]} rows")
        records = [r for f in corpus.fragments for r in committed.get(f.id, [])]
        t_pipe = time.perf_counter()

        parts = sorted((r for r in records if r["kind"] == "part"), key=lambda r: r["path"])
        rejects = sorted((r for r in records if r["kind"] == "rejects"), key=lambda r: r["path"])
        n_rows, n_docs, n_rej = reconcile(store, parts, rejects, rows_in)
        dim = info.dim
        tier_entries, quality = build_tiers(store, [p["path"] for p in parts], dim, tier_dims, cfg.index, run_id)
        token_index = None
        if cfg.outputs.multivector is not None and cfg.outputs.multivector.candidates == "tokens":
            token_index = build_token_index(store, [p["path"] for p in parts], dim, run_id)
        t_tiers = time.perf_counter()

    version = next_version(store)
    timings = {
        "read_s": round(t_read - t0, 3),
        "pipeline_s": round(t_pipe - t_embed, 3),
        "tiers_s": round(t_tiers - t_pipe, 3),
        "total_s": round(t_tiers - t0, 3),
    }
    counts = Counts(rows_in=rows_in, documents=n_docs, chunks=n_rows, vectors=n_rows, rejected=n_rej)
    manifest = Manifest(
        version=version,
        created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        run_id=run_id,
        parent=latest_version(store),
        model=ModelEntry(
            name=cfg.model.name, path=cfg.model.path, checkpoint_hash=ckpt_hash, task=cfg.model.task,
            query_task=query_task, max_length=info.max_length, pooling=info.pooling, dtype=cfg.model.dtype,
            prefixes=info.prefixes,
        ),
        outputs=outputs_entry(cfg, info, window, parts, token_index),
        dim=dim,
        tiers=tier_entries,
        shards=[ShardEntry(path=p["path"], rows=p["rows"], bytes=p["bytes"], sha256=p["sha256"]) for p in parts],
        rejects=[RejectsEntry(path=r["path"], rows=r["rows"], bytes=r["bytes"], sha256=r["sha256"],
                              reasons=json.loads(r["reasons"] or "{}")) for r in rejects],
        counts=counts,
        quality=quality,
        source={"uri": cfg.source.uri, "format": corpus.format, "files": len(corpus.files),
                "fragments": len(corpus.fragments)},
        config=json.loads(cfg.model_dump_json()),
        timings=timings,
        fingerprint=fingerprint,
        fragments={"total": len(corpus.fragments), "embedded": len(corpus.fragments) - reused,
                   "reused": reused},
    )
    _scrub_secrets(manifest.config)
    manifest_uri = publish(store, manifest)
    return BuildResult(cfg.index.uri, version, manifest_uri, counts.model_dump(), timings, manifest)


def _embed_fragments(cfg: JobConfig, corpus: Any, todo: list[Any], duplicates: set[str], run_id: str,
                     max_length: int, embed_kwargs: dict[str, Any], actor_res: tuple[float, float],
                     rows_in: int, log: Log) -> None:
    """Run read -> tokenize -> embed -> write+commit over the fragments in `todo`."""
    import ray.data

    if not todo:
        return
    ds = corpus.dataset(todo)
    if duplicates:
        ds = ds.map_batches(mark_duplicates, batch_format="pyarrow", batch_size=None,
                            fn_kwargs={"duplicate_ids": frozenset(duplicates)})
    ds = ds.map_batches(tokenize_batch, batch_format="pyarrow", batch_size=None,
                        fn_kwargs={"model_json": embed_kwargs["model_json"],
                                   "outputs_json": embed_kwargs["outputs_json"], "role": cfg.model.role,
                                   "task": cfg.model.task, "max_length": max_length})
    reporter = ProgressReporter(rows_in, log, every=cfg.run.progress_seconds)
    ds = ds.map_batches(
        EmbedActor, fn_constructor_kwargs={**embed_kwargs, "progress": reporter.counter},
        compute=ray.data.ActorPoolStrategy(size=cfg.resources.actors),
        batch_size=None, batch_format="pyarrow", num_cpus=actor_res[0], num_gpus=actor_res[1],
    )
    ds = ds.map_batches(write_fragment, batch_format="pyarrow", batch_size=None,
                        fn_kwargs={"root": cfg.index.uri, "storage": cfg.index.storage, "run_id": run_id})
    written, start = 0, time.perf_counter()
    with reporter:
        for rec in ds.iter_rows():
            written += rec["rows"]
            rate = written / max(time.perf_counter() - start, 1e-9)
            log(f"[embindex] {written} rows written this pass ({rate:.0f} rows/s)")


def reconcile(store: Storage, parts: list[dict[str, Any]], rejects: list[dict[str, Any]],
              rows_in: int) -> tuple[int, int, int]:
    """Check rows in = documents indexed + rows rejected and that no (id, chunk) is indexed twice.
    Returns (rows, documents, rejected); raises ReconciliationError (nothing is published)."""
    n_rows = sum(r["rows"] for r in parts)
    n_rej = sum(r["rows"] for r in rejects)
    keys = [k for p in parts for k in _row_keys(read_table(store, p["path"], columns=["id", "chunk"]))]
    n_docs = len({i for i, _ in keys})
    if len(set(keys)) != len(keys):
        raise ReconciliationError("a document (or chunk) was indexed more than once; not published")
    if n_docs + n_rej != rows_in:
        raise ReconciliationError(f"rows in {rows_in} != indexed {n_docs} + rejected {n_rej}; not published")
    return n_rows, n_docs, n_rej


def build_fingerprint(cfg: JobConfig, checkpoint: str) -> str:
    """What makes two builds' vectors comparable: model, task, role, dtype, length and outputs."""
    m = cfg.model
    payload = {"model": [m.name, checkpoint, m.task, m.role, m.dtype, m.max_length, m.pooling],
               "outputs": cfg.outputs.model_dump(mode="json")}
    return "sha256:" + hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:32]


def _resolve_run(cfg: JobConfig, store: Storage, fingerprint: str, log: Log) -> str:
    """The run id: `run.id`, or with `run.resume` the newest unpublished run, or a new one. A resumed run
    must have the same fingerprint as the run it continues."""
    run_id = cfg.run.id
    if run_id is None and cfg.run.resume:
        published = {read_manifest(store, v).run_id for v in list_versions(store)}
        pending = unfinished_runs(store, published)
        run_id = pending[-1] if pending else None
        if run_id:
            log(f"[embindex] resuming run {run_id}")
    run_id = run_id or _run_id(cfg)
    record = read_run_record(store, run_id)
    if record is not None and record["fingerprint"] != fingerprint:
        raise ValueError(f"run {run_id} was started with another model/outputs fingerprint; "
                         "use a new run id")
    if record is None:
        write_run_record(store, run_id, fingerprint)
    return run_id


def window_overlap(cfg: JobConfig, window: int) -> int:
    lc = cfg.outputs.late_chunking
    return lc.window_overlap if lc and lc.window_overlap is not None else min(256, window // 4)


def _row_keys(table: pa.Table) -> list[tuple[str, int | None]]:
    return list(zip(table.column("id").to_pylist(), table.column("chunk").to_pylist()))


def check_outputs(cfg: JobConfig, info: Any) -> None:
    """Fail before any worker starts when the model cannot produce the configured outputs."""
    mode = cfg.outputs.mode
    multi = bool(info.extra.get("multi_vector"))
    if multi and mode != "multivector":
        raise ValueError(f"model family {info.family!r} is multi-vector: set outputs.multivector")
    if mode == "multivector" and not multi:
        raise ValueError(f"model family {info.family!r} has no multi-vector output")
    if mode == "late" and info.pooling != "mean":
        raise ValueError(f"late chunking needs a mean-pooling model; {info.family!r} pools with {info.pooling!r}")
    lc = cfg.outputs.late_chunking
    if lc is not None and lc.window_overlap is not None and lc.window_overlap >= (lc.window or info.max_length):
        raise ValueError("outputs.late_chunking.window_overlap must be smaller than the window")


def outputs_entry(cfg: JobConfig, info: Any, window: int, parts: list[dict[str, Any]],
                  token_index: tuple[str, int] | None) -> dict[str, Any]:
    """What the manifest records about the outputs: the mode, its settings and multi-vector storage."""
    entry: dict[str, Any] = {"mode": cfg.outputs.mode, **cfg.outputs.model_dump(mode="json")}
    if cfg.outputs.late_chunking is not None:
        entry["late_chunking"].update(window=window, window_overlap=window_overlap(cfg, window))
    if cfg.outputs.multivector is not None:
        tokens = sum(int(p.get("tokens") or 0) for p in parts)
        entry["multivector"].update(
            dim=info.dim, codec="float16", column="token_vectors", tokens=tokens, bytes_per_token=2 * info.dim,
            score="maxsim",
        )
        if token_index is not None:
            entry["multivector"]["token_index"] = {"file": token_index[0], "factory": "IDMap2,Flat",
                                                   "vectors": token_index[1]}
    return entry


def _scrub_secrets(config: dict[str, Any]) -> None:
    """Credentials never reach the manifest."""
    for section in config.values():
        if isinstance(section, dict) and isinstance(section.get("storage"), dict):
            for key in ("key", "secret", "token"):
                if section["storage"].get(key):
                    section["storage"][key] = "***"
