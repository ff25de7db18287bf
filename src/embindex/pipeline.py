"""Assemble and run one build: its stages (read -> normalize -> [generative stages] -> tokenize -> embed ->
write, `stages/`) over the fragments, then tiers -> publish."""

from __future__ import annotations

import json
import os
import hashlib
import secrets
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
from .index.commits import published_version, read_commits, read_run_record, unfinished_runs, write_run_record
from .index.gc import collect_garbage
from .index.publish import latest_version, list_versions, publish, read_manifest
from .index.shards import count_documents, read_table
from .index.multivector import build_token_index
from .index.tier_builder import build_tiers
from .models import load_family
from .models.checkpoint_files import checkpoint_hash
from .sources.census import take_census
from .ray_runtime import classify_failure, quiet_ray_data, ray_session
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


class ReconciliationError(RuntimeError):
    """Rows in != documents indexed + rows rejected, or an id indexed twice: nothing is published."""


def _run_id(cfg: JobConfig) -> str:
    if cfg.run.id:
        return cfg.run.id
    return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S") + "-" + secrets.token_hex(3)


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
        self.run_id = _resolve_run(self.cfg, self.store, self.fingerprint, self.log, self.kind, self.base)
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
        self.stage_counts = _stage_counts(records)
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


def _stage_counts(records: list[dict]) -> dict[str, dict[str, int]]:
    """Generative stages' counts summed over part records: {output column: {documents, tokens, flags...}}."""
    total: dict[str, dict[str, int]] = {}
    for r in records:
        for out, counts in json.loads(r.get("stages") or "{}").items():
            entry = total.setdefault(out, {})
            for k, v in counts.items():
                entry[k] = entry.get(k, 0) + int(v)
    return total


def merge_dtypes(*values: str | None) -> str | None:
    """'float32 (cpu)' and 'bfloat16 (cuda), float32 (cpu)' -> 'bfloat16 (cuda), float32 (cpu)'."""
    found = sorted({d.strip() for v in values for d in (v or "").split(",") if d.strip()})
    return ", ".join(found) or None


def used_dtype(parts: list[dict]) -> str | None:
    """The dtype and device the embed actors ran, from the part records (None: no part says)."""
    return merge_dtypes(*(r.get("dtype") for r in parts))


def token_count(parts: list[dict]) -> int:
    """Token vectors stored in these parts (multi-vector outputs)."""
    return sum(int(p.get("tokens") or 0) for p in parts)


def shard_entries(parts: list[dict]) -> list[ShardEntry]:
    return [ShardEntry(path=p["path"], rows=p["rows"], bytes=p["bytes"], sha256=p["sha256"], vectors=p.get("vectors"))
            for p in parts]


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
                                            shard_rows=[p["rows"] for p in parts])
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


def reconcile(store: Storage, parts: list[dict[str, Any]], rejects: list[dict[str, Any]],
              rows_in: int) -> tuple[int, int, int]:
    """Check rows in = documents indexed + rows rejected from the commit records (O(fragments)); the
    write step checked each fragment for repeated (id, chunk) and the pre-pass made ids unique across
    fragments. Returns (rows, documents, rejected); raises ReconciliationError (nothing is published)."""
    n_rows = sum(r["rows"] for r in parts)
    n_rej = sum(r["rows"] for r in rejects)
    n_docs = sum(_documents(store, p) for p in parts)
    if n_docs + n_rej != rows_in:
        raise ReconciliationError(f"rows in {rows_in} != indexed {n_docs} + rejected {n_rej}; not published")
    return n_rows, n_docs, n_rej


def _documents(store: Storage, part: dict[str, Any]) -> int:
    """Documents in a part: from its commit record (runs committed before records carried the count:
    its ids, one part at a time)."""
    if part.get("documents") is not None:
        return int(part["documents"])
    return count_documents(read_table(store, part["path"], columns=["id", "chunk"]))


def build_fingerprint(cfg: JobConfig, checkpoint: str, stages: list[str] | None = None) -> str:
    """What makes two builds' vectors comparable: model, task, role, dtype, length and outputs, and the
    fingerprints of the generative stages that wrote the embedded text."""
    m = cfg.model
    payload = {"model": [m.name, checkpoint, m.task, m.role, m.dtype, m.max_length, m.pooling],
               "outputs": cfg.outputs.model_dump(mode="json")}
    if stages:
        payload["stages"] = list(stages)
    return "sha256:" + hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:32]


def _resolve_run(cfg: JobConfig, store: Storage, fingerprint: str, log: Log, kind: str = "build",
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


def window_overlap(cfg: JobConfig, window: int) -> int:
    lc = cfg.outputs.late_chunking
    return lc.window_overlap if lc and lc.window_overlap is not None else min(256, window // 4)


def check_outputs(cfg: JobConfig, info: Any) -> None:
    """Fail before any worker starts when the model cannot produce the configured outputs."""
    mode = cfg.outputs.mode
    multi = bool(info.extra.get("multi_vector"))  # multi-vector only (ColBERT)
    if multi and mode != "multivector":
        raise ValueError(f"model family {info.family!r} is multi-vector: set outputs.multivector")
    if mode == "multivector" and not (multi or info.extra.get("multi_vector_capable")):
        raise ValueError(f"model family {info.family!r} has no multi-vector output")
    if mode == "late" and info.pooling != "mean":
        raise ValueError(f"late chunking needs a mean-pooling model; {info.family!r} pools with {info.pooling!r}")
    lc = cfg.outputs.late_chunking
    if lc is not None and lc.window_overlap is not None and lc.window_overlap >= (lc.window or info.max_length):
        raise ValueError("outputs.late_chunking.window_overlap must be smaller than the window")


def check_offsets(cfg: JobConfig, family: Any) -> None:
    """Late chunking and the "tokens" chunker map chunks through token offsets: refuse, before any worker
    starts, a tokenizer that gives none."""
    out = cfg.outputs
    what = ("outputs.late_chunking" if out.late_chunking is not None else
            "outputs.chunking.chunker: tokens" if out.chunking is not None and out.chunking.chunker == "tokens"
            else None)
    if what and not family.load_tokenizer().has_offsets:
        raise ValueError(f"{what} needs token offsets, which the {family.name!r} tokenizer does not give; "
                         f"use outputs.chunking with chunker: sentences or paragraphs")


def outputs_entry(cfg: JobConfig, info: Any, window: int, tokens: int,
                  token_index: dict[str, Any] | None) -> dict[str, Any]:
    """What the manifest records about the outputs: the mode, its settings and multi-vector storage."""
    entry: dict[str, Any] = {"mode": cfg.outputs.mode, **cfg.outputs.model_dump(mode="json")}
    if cfg.outputs.late_chunking is not None:
        entry["late_chunking"].update(window=window, window_overlap=window_overlap(cfg, window))
    if cfg.outputs.multivector is not None:
        dim = info.token_dim or info.dim
        entry["multivector"].update(
            dim=dim, codec="float16", column="token_vectors", tokens=tokens, bytes_per_token=2 * dim,
            score="maxsim",
        )
        if token_index is not None:
            entry["multivector"]["token_index"] = token_index
    return entry


def _scrub_secrets(config: Any) -> None:
    """Credentials never reach the manifest: every `storage` mapping, at any depth (a stage's model too)."""
    items = config.values() if isinstance(config, dict) else config if isinstance(config, list) else []
    if isinstance(config, dict) and isinstance(config.get("storage"), dict):
        for key in ("key", "secret", "token"):
            if config["storage"].get(key):
                config["storage"][key] = "***"
    for value in items:
        _scrub_secrets(value)
