"""Assemble and run one build: its stages (read -> normalize -> [generative stages] -> tokenize -> embed ->
write, `stages/`) over the fragments, then tiers -> publish."""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Callable


from .checkpoints import model_spec
from .logs import Log, stderr_log
from .config import JobConfig, load_config
from .embed.progress import ProgressReporter
from .index import layout, tiers
from .index.manifest import Counts, Manifest, ModelEntry, RejectsEntry, ShardEntry
from .index.commits import read_commits
from .index.gc import collect_garbage
from .index.publish import latest_version, publish
from .index.multivector import build_token_index
from .index.tier_builder import build_tiers
from .models import load_family
from .models.checkpoint_files import checkpoint_hash
from .outputs import check_offsets, check_outputs, outputs_entry, window_overlap
from .sources.census import take_census
from .ray_runtime import classify_failure, quiet_ray_data, ray_session
from .reconcile import ReconciliationError, reconcile, shard_entries, stage_counts, token_count, used_dtype
from .run_state import build_fingerprint, resolve_run
from .sources.readers import open_corpus
from .stages import actor_stages, apply_stages, generative_stages, plan_stages
from .stages.normalize import Normalize
from .stages.read import Read
from .storage import Storage

@dataclass
class BuildResult:
    index_uri: str
    version: str
    manifest_uri: str
    counts: dict[str, int]
    timings: dict[str, float]
    manifest: Manifest = field(repr=False)

    def summary(self) -> str:
        c, t = self.counts, self.timings
        first = f", first batch at {t['first_batch_s']:.1f}s" if "first_batch_s" in t else ""
        busy = f", embed actors busy {t['embed_busy_s']:.1f} actor-s" if t.get("embed_busy_s") else ""
        return (
            f"published {self.version} at {self.index_uri}\n"
            f"  rows in {c['rows_in']}: indexed {c['documents']}, rejected {c['rejected']}; "
            f"chunks {c['chunks']}, vectors {c['vectors']}\n"
            + "".join(f"  {line}\n" for line in stage_lines(getattr(self.manifest, "stages", None) or [])) +
            f"  wall time {t['total_s']:.1f}s (embed+write {t['pipeline_s']:.1f}s, "
            f"tiers {t['tiers_s']:.1f}s{first}{busy})\n"
            f"  manifest {self.manifest_uri}"
        )


def stage_lines(stages: list[Any]) -> list[str]:
    """One line per generative stage: what this run generated."""
    lines = []
    for s in stages:
        if isinstance(s, dict):
            c = dict(s.get("counts") or {})
            docs, tokens = c.pop("documents", 0), c.pop("tokens", 0)
            flags = "".join(f", {n} {flag}" for flag, n in sorted(c.items()))
            lines.append(f"{s['stage']} ({s['family']}): generated {docs} document(s), {tokens} tokens{flags}")
    return lines


class BuildError(RuntimeError):
    """A run that cannot succeed as configured (or ran out of attempts): one readable line."""


class Job:
    """One run against an index: the resolved model, the run id, the corpus plan, and the steps that
    `build` and `reindex` compose (embed fragments with retries, collect commits, publish).

    `kind` is "build" (a full build: publishes on top of whatever is latest by then) or "reindex" (a
    delta against `base`, the version it started from: publishes only on top of it)."""

    def __init__(self, cfg: JobConfig, log: Log, kind: str = "build", base: str | None = None):
        self.cfg, self.log, self.t0 = cfg, log, time.perf_counter()
        self.kind = kind
        self.started_at = time.time()
        self.spec = model_spec(cfg.model)
        self.family = load_family(self.spec)
        self.family.check_task(cfg.model.task)
        self.info = self.family.info()
        check_outputs(cfg, self.info)
        check_offsets(cfg, self.family)
        self.tier_dims = tiers.resolve_tiers(cfg.index.tiers, self.info.dim)
        self.checkpoint_hash = checkpoint_hash(self.spec.path)
        self.store = Storage(cfg.index.uri, cfg.index.storage_options())
        self.base = base if kind == "reindex" else latest_version(self.store)
        self.generate = generative_stages(cfg)
        self.fingerprint = build_fingerprint(cfg, self.checkpoint_hash, [g.fingerprint for g in self.generate])
        lc = cfg.outputs.late_chunking
        self.window = (lc.window if lc else None) or self.info.max_length
        self.query_task = getattr(self.family, "query_task_for", lambda t: t)(cfg.model.task)
        self.run_id = ""
        self.timings: dict[str, float] = {}
        self.embedded: set[str] = set()  # the fragments this run embeds (not those a resume reuses)

    def start(self) -> None:
        """Inside the Ray session: Ray Data settings, the run id (resumed or new), the corpus plan."""
        ctx = quiet_ray_data(self.cfg.run.progress)
        ctx.target_max_block_size = None  # one block per fragment, never split: fragments are the commit unit
        self.run_id = resolve_run(self.cfg, self.store, self.fingerprint, self.log, self.kind, self.base)
        self.log(f"[embindex] run {self.run_id}: reading {self.cfg.source.uri}")
        self.corpus = open_corpus(self.cfg.source)

    def embed(self, wanted: Callable[[Any], bool], rows_in: int, normalize: Normalize) -> None:
        """Run the stages on every fragment for which `wanted(fragment)` and that has no commit marker,
        retrying uncommitted fragments after a failure (`run.max_attempts`)."""
        import ray
        import ray.data.exceptions

        self.timings["read_s"] = round(time.perf_counter() - self.t0, 3)
        start = time.perf_counter()
        for attempt in range(1, self.cfg.run.max_attempts + 1):
            committed = read_commits(self.store, self.run_id)
            todo = [f for f in self.corpus.fragments if f.id not in committed and wanted(f)]
            if attempt == 1:
                self.committed_before = len([f for f in self.corpus.fragments if f.id in committed and wanted(f)])
                self.embedded = {f.id for f in todo}
            try:
                _run_stages(self, todo, normalize, rows_in)
                break
            except (ray.exceptions.RayError, ray.data.exceptions.RayDataUserCodeException, OSError) as e:
                failure = classify_failure(e)
                if not failure.retryable or attempt == self.cfg.run.max_attempts:
                    tries = "" if not failure.retryable else f" after {attempt} attempts"
                    raise BuildError(f"embedding failed{tries}: {failure.message} (run {self.run_id}; "
                                     f"committed fragments are kept for a resume)") from e
                self.log(f"[embindex] attempt {attempt} failed ({failure.message[:200]}); "
                         f"retrying the uncommitted fragment(s)")
        self.timings["pipeline_s"] = round(time.perf_counter() - start, 3)

    def records(self, wanted: Callable[[Any], bool]) -> tuple[list[dict], list[dict]]:
        """(parts, rejects) records of the committed fragments; fails when a wanted fragment has none."""
        committed = read_commits(self.store, self.run_id)
        missing = [f.id for f in self.corpus.fragments if f.id not in committed and wanted(f)]
        if missing:
            raise ReconciliationError(f"{len(missing)} fragment(s) have no commit marker; not published")
        records = [r for f in self.corpus.fragments if wanted(f) for r in committed.get(f.id, [])]
        self.stage_counts = stage_counts(records)
        self.timings["embed_busy_s"] = round(sum(r.get("embed_s") or 0.0 for r in records
                                                 if r["fragment"] in self.embedded), 3)
        parts = sorted((r for r in records if r["kind"] == "part"), key=lambda r: r["path"])
        rejects = sorted((r for r in records if r["kind"] == "rejects"), key=lambda r: r["path"])
        return parts, rejects

    def publish(self, *, shards: list[ShardEntry], tokens: int, rejects: list[dict],
                tier_entries: list, quality: dict, counts: Counts, token_index: dict[str, Any] | None,
                fragments: dict[str, int], dtype: str | None = None, **extra: Any) -> BuildResult:
        cfg, info = self.cfg, self.info
        self.timings["total_s"] = round(time.perf_counter() - self.t0, 3)
        manifest = Manifest(
            version="v000000",  # the number, parent and time are set when publish claims a version
            created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            run_id=self.run_id,
            parent=self.base,
            model=ModelEntry(
                name=cfg.model.name, path=cfg.model.path, checkpoint_hash=self.checkpoint_hash, task=cfg.model.task,
                query_task=self.query_task, max_length=info.max_length, pooling=info.pooling,
                dtype=dtype or cfg.model.dtype, prefixes=info.prefixes, modalities=info.modalities,
            ),
            outputs=outputs_entry(cfg, info, self.window, tokens, token_index),
            dim=info.dim,
            tiers=tier_entries,
            shards=shards,
            rejects=[RejectsEntry(path=r["path"], rows=r["rows"], bytes=r["bytes"], sha256=r["sha256"],
                                  reasons=json.loads(r["reasons"] or "{}")) for r in rejects],
            counts=counts,
            quality=quality,
            source={"uri": cfg.source.uri, "format": self.corpus.format, "files": len(self.corpus.files),
                    "fragments": len(self.corpus.fragments)},
            config=json.loads(cfg.model_dump_json()),
            timings=self.timings,
            fingerprint=self.fingerprint,
            fragments=fragments,
            stages=self.stage_entries(),
            **extra,
        )
        _scrub_secrets(manifest.config)
        manifest = publish(self.store, manifest, self.base, rebase=self.kind == "build", commit=cfg.index.commit,
                           log=self.log)
        manifest_uri = self.store.uri(layout.manifest_path(manifest.version))
        if cfg.index.keep_versions:
            collect_garbage(self.store, cfg.index.keep_versions, self.log, grace_seconds=cfg.index.gc_grace_seconds,
                            inflight_seconds=cfg.index.gc_inflight_seconds)
        return BuildResult(cfg.index.uri, manifest.version, manifest_uri, counts.model_dump(), dict(self.timings),
                           manifest)


    def stage_entries(self) -> list[Any]:
        """The stage list for the manifest: built-in stages by name, generative ones with their model,
        fingerprint and this run's counts."""
        by_name = {g.name: g for g in self.generate}
        counts = getattr(self, "stage_counts", {})
        return [s if isinstance(s, str) else by_name[s.stage].manifest_entry(
                counts.get(by_name[s.stage].output_column(), {"documents": 0, "tokens": 0}))
                for s in self.cfg.stages]


def build(
    config: str | os.PathLike | dict[str, Any] | JobConfig,
    overrides: dict[str, Any] | None = None,
    log: Log | None = stderr_log,
) -> BuildResult:
    """Build and publish a new index version from a job config (path, dict or JobConfig).

    With `run.id` set (or `run.resume: true`) a rerun resumes: fragments with a commit marker are not
    embedded again."""
    log = log or (lambda _m: None)
    job = Job(load_config(config, overrides), log)
    cfg = job.cfg
    with ray_session(cfg.resources):
        job.start()
        census = take_census(job.corpus.dataset(), len(job.corpus.fragments))
        per_fragment, duplicates, rows_in = census.rows, census.duplicates, census.rows_in
        log(f"[embindex] {rows_in} rows in {len(job.corpus.files)} {job.corpus.format} file(s), "
            f"{len(job.corpus.fragments)} fragment(s); {len(duplicates)} duplicated id(s)")

        def wanted(f: Any) -> bool:
            return per_fragment[f.id] > 0

        job.embed(wanted, rows_in, Normalize(frozenset(duplicates)))
        parts, rejects = job.records(wanted)
        n_rows, n_docs, n_rej = reconcile(job.store, parts, rejects, rows_in)
        t = time.perf_counter()
        paths = [p["path"] for p in parts]
        tier_entries, quality = build_tiers(job.store, paths, job.info.dim, job.tier_dims, cfg.index, job.run_id,
                                            shard_rows=[p["rows"] for p in parts],
                                            vector_files=[p.get("vectors") for p in parts])
        token_index = None
        if cfg.outputs.multivector is not None and cfg.outputs.multivector.candidates == "tokens":
            token_index = build_token_index(job.store, paths, job.info.token_dim or job.info.dim, job.run_id)
        job.timings["tiers_s"] = round(time.perf_counter() - t, 3)

    total = len([f for f in job.corpus.fragments if wanted(f)])
    counts = Counts(rows_in=rows_in, documents=n_docs, chunks=n_rows, vectors=n_rows, rejected=n_rej)
    return job.publish(shards=shard_entries(parts), tokens=token_count(parts), rejects=rejects, tier_entries=tier_entries,
                       quality=quality, counts=counts, token_index=token_index,
                       fragments={"total": total, "embedded": total - job.committed_before,
                                  "reused": job.committed_before},
                       trained_rows=n_rows, dtype=used_dtype(parts))


def _run_stages(job: Job, todo: list[Any], normalize: Normalize, rows_in: int) -> None:
    """Run the job's stages over the fragments in `todo`; every fragment ends written and committed."""
    if not todo:
        return
    cfg = job.cfg
    reporter = ProgressReporter(rows_in, job.log, every=cfg.run.progress_seconds)
    stages = plan_stages(cfg, read=Read(job.corpus, todo), normalize=normalize, generate=job.generate,
                         max_length=job.info.max_length, window=job.window,
                         window_overlap=window_overlap(cfg, job.window), run_id=job.run_id,
                         progress=reporter.prefix)
    job.log(f"[embindex] stages: {' -> '.join(s.name for s in stages)}")
    for stage in actor_stages(stages):
        job.log(f"[embindex] {stage.describe()}")
    ds = apply_stages(stages)
    written, start = 0, time.perf_counter()
    with reporter:
        for rec in ds.iter_rows():
            written += rec["rows"]
            rate = written / max(time.perf_counter() - start, 1e-9)
            job.log(f"[embindex] {written} rows written this pass ({rate:.0f} rows/s)")
    if reporter.first_batch_at is not None and "first_batch_s" not in job.timings:
        # start-up: from the job's start until an embed actor began its first batch
        job.timings["first_batch_s"] = round(reporter.first_batch_at - job.started_at, 3)


def _scrub_secrets(config: Any) -> None:
    """Credentials never reach the manifest: every `storage` mapping, at any depth (a stage's model too)."""
    items = config.values() if isinstance(config, dict) else config if isinstance(config, list) else []
    if isinstance(config, dict) and isinstance(config.get("storage"), dict):
        for key in ("key", "secret", "token"):
            if config["storage"].get(key):
                config["storage"][key] = "***"
    for value in items:
        _scrub_secrets(value)
