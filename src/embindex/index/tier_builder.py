"""Build every Matryoshka tier of a version from its Parquet shards and measure their quality.

Memory is bounded by the sample plus one shard (per parallel task), not by the corpus:

  1. sample   row counts (-> ordinal offsets) and a uniform sample of `train_sample + quality_sample`
              full-width rows (float16), drawn by one task per shard (sampling.py)
  2. plan     per tier: factory (`auto` by corpus size and `memory_budget_mb`, see factories.py)
              and layout: IVF -> "ondisk"; others -> "single" up to `single_file_max_rows`, else "shards"
  3. train    once per tier on the sample minus the held-out queries (GPU when faiss-gpu sees one)
  4. fill     "single" tiers: here, shard by shard into one index. "shards"/"ondisk" tiers: one Ray
              task per Parquet shard fills all of them from one read of the shard (filling.py)
  5. quality  recall@10 / latency per tier and for the funnel on the held-out queries (quality.py);
              IVF tiers are searched as their shards, loaded one at a time (same results as the
              merged index up to exact ties, see tests) so that no corpus-sized file is mapped here
  6. merge    "ondisk" tiers: one task per tier copies the shard lists into one on-disk
              inverted-lists file (merge.py) and removes the shard files
"""

from __future__ import annotations

import hashlib
import os
import resource
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from ..config import IndexConfig
from ..storage import Storage, StorageOptions
from . import layout, tiers
from .factories import auto_factory, default_search_params, ivf_of, make_index, metric_name
from ..ray_runtime import run_tasks
from .filling import FillJob, fill_shard
from .rescore_vectors import full_width_source
from .tier_search import ShardedIndex, TierSearcher
from .manifest import TierEntry
from .merge import merge_ondisk, staged_outputs, stored_indexes
from .quality import quality_report, split_queries
from .sampling import ShardScan, sample_shards
from .tier_io import ONDISK, SHARDS, SINGLE, file_sha256
from .training import train_index
from .vector_io import read_vectors


@dataclass
class TierPlan:
    dim: int
    factory: str
    layout: str
    trained: Any = None
    build: dict[str, Any] = field(default_factory=dict)
    files: list[str] = field(default_factory=list)
    sha256: dict[str, str] = field(default_factory=dict)  # file -> content hash, for the manifest
    nbytes: int = 0
    index: Any = None  # the in-memory index of a "single" tier


def plan_tier(dim: int, factory: str, n: int, cfg: IndexConfig) -> TierPlan:
    """Resolve `auto` and choose the layout of one tier."""
    if factory == "auto":
        factory = auto_factory(n, dim, cfg.memory_budget_mb)
    probe = make_index(factory, dim)
    if ivf_of(probe) is not None:
        layout = ONDISK
    elif n <= cfg.single_file_max_rows:
        layout = SINGLE
    else:
        layout = SHARDS
    return TierPlan(dim=dim, factory=factory, layout=layout)


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _train(plans: Sequence[TierPlan], sample: np.ndarray) -> None:
    for p in plans:
        t0 = time.perf_counter()
        p.trained = train_index(p.factory, p.dim, tiers.truncate(sample, p.dim))
        p.build["train_s"] = round(time.perf_counter() - t0, 3)
        p.build["train_rows"] = int(len(sample)) if not make_index(p.factory, p.dim).is_trained else 0


def _fill_single(store: Storage, shard_paths: Sequence[str], scan: ShardScan, plans: Sequence[TierPlan],
                 run_id: str) -> None:
    """Single-file tiers: one read per shard (none when the sample holds every row), added in ordinal
    order (ids = ordinals, no id map)."""
    if not plans:
        return
    for p in plans:
        p.index = tiers.deserialize(tiers.serialize(p.trained))
        p.build["fill_s"] = 0.0
    blocks = [scan.vectors] if scan.complete else (read_vectors(store, rel) for rel in shard_paths)
    for full in blocks:
        for p in plans:
            t0 = time.perf_counter()
            p.index.add(tiers.truncate(full, p.dim))
            p.build["fill_s"] += time.perf_counter() - t0
        del full
    for p in plans:
        data = tiers.serialize(p.index)
        rel = layout.tier_path(run_id, p.dim)
        store.write_bytes(rel, data)
        p.files, p.nbytes = [rel], len(data)
        p.sha256 = {rel: hashlib.sha256(data).hexdigest()}
        p.build["fill_s"] = round(p.build["fill_s"], 3)


def _fill_parallel(store: Storage, shard_paths: Sequence[str], scan: ShardScan, plans: Sequence[TierPlan],
                   run_id: str) -> dict[int, list[dict[str, Any]]]:
    """Sharded and on-disk tiers: one task per shard fills all of them; returns per-tier task results."""
    if not plans:
        return {}
    calls = []
    for i, (rel, off) in enumerate(zip(shard_paths, scan.offsets)):
        jobs = [FillJob(p.dim, layout.tier_shard_path(run_id, p.dim, i), wrap_ids=p.layout == SHARDS) for p in plans]
        calls.append((store.root, store.options, rel, off, jobs))
    trained = {p.dim: tiers.serialize(p.trained) for p in plans}
    results = run_tasks(fill_shard, calls, shared={"trained": trained})
    per_tier: dict[int, list[dict[str, Any]]] = {p.dim: [] for p in plans}
    for shard_results in results:
        for r in shard_results:
            per_tier[r["dim"]].append(r)
    for p in plans:
        rs = per_tier[p.dim]
        p.build["fill_s"] = round(sum(r["seconds"] for r in rs), 3)
        p.build["fill_task_peak_rss_mb"] = round(max(r["peak_rss_mb"] for r in rs), 1)
        if p.layout == SHARDS:
            p.files = [r["rel"] for r in rs]
            p.sha256 = {r["rel"]: r["sha256"] for r in rs}
            p.nbytes = sum(r["bytes"] for r in rs)
    return per_tier


def merge_tier(root: str, options: StorageOptions, run_id: str, dim: int, results: list[dict[str, Any]],
               trained: dict[int, bytes]) -> dict[str, Any]:
    """Task: merge one IVF tier's shard indexes into tier-<dim>.faiss + tier-<dim>.ivfdata and drop the
    shard files. Runs off the driver: the merge maps every shard's lists and writes the data file
    through a mapping, so its resident pages grow with the tier. Returns files, bytes, hashes, seconds."""
    t0 = time.perf_counter()
    store = Storage(root, options)
    rels = [layout.tier_path(run_id, dim), layout.tier_ivfdata_path(run_id, dim)]
    with staged_outputs(store, rels) as paths:
        merge_ondisk(tiers.deserialize(trained[dim]), stored_indexes(store, [r["rel"] for r in results]),
                     [r["list_sizes"] for r in results], *paths)
        out = {"files": rels, "nbytes": sum(os.path.getsize(p) for p in paths),
               "sha256": {rel: file_sha256(p) for rel, p in zip(rels, paths)}}
    for r in results:
        store.fs.rm(store.fs_path(r["rel"]))
    out.update(seconds=round(time.perf_counter() - t0, 3), peak_rss_mb=round(_peak_rss_mb(), 1))
    return out


def _merge(store: Storage, plans: Sequence[TierPlan], per_tier: dict[int, list[dict[str, Any]]],
           run_id: str) -> None:
    """Merge the on-disk tiers, one task per tier."""
    if not plans:
        return
    calls = [(store.root, store.options, run_id, p.dim, per_tier[p.dim]) for p in plans]
    trained = {p.dim: tiers.serialize(p.trained) for p in plans}
    for p, r in zip(plans, run_tasks(merge_tier, calls, shared={"trained": trained})):
        p.files, p.nbytes, p.sha256 = r["files"], r["nbytes"], r["sha256"]
        p.build["merge_s"] = r["seconds"]
        p.build["merge_task_peak_rss_mb"] = r["peak_rss_mb"]


def _searcher(store: Storage, plan: TierPlan, n_per_shard: Sequence[int]):
    """Search object over what was written, memory-bounded: the in-memory single index, or the shard
    files loaded one at a time (sharded and not-yet-merged IVF tiers)."""
    metric = metric_name(plan.factory)
    params = default_search_params(plan.trained)
    if plan.layout == SINGLE:
        index = plan.index
    else:
        loaders = [lambda f=f: tiers.deserialize(store.read_bytes(f)) for f in plan.files]
        index = ShardedIndex(loaders, higher_is_better=metric != "hamming", ntotals=n_per_shard, d=plan.dim)
    return TierSearcher(index, metric=metric, params=params)


def build_tiers(store: Storage, shard_paths: Sequence[str], dim: int, tier_dims: Sequence[int],
                cfg: IndexConfig, run_id: str, shard_rows: Sequence[int] | None = None,
                vector_files: Sequence[str | None] | None = None) -> tuple[list[TierEntry], dict]:
    """Write the FAISS files of every tier under the run's folder; return manifest entries and the quality report.

    `shard_rows`: the shards' row counts where the caller knows them (else read from the footers);
    `vector_files`: the shards' row matrices (the quality step rescores candidates from them)."""
    t_start = time.perf_counter()
    scan = sample_shards(store, shard_paths, cfg.train_sample + cfg.quality_sample, dim, rows=shard_rows)
    n = scan.total
    t_sample = time.perf_counter()
    plans = [plan_tier(d, cfg.factory_for(d), n, cfg) for d in tier_dims]
    if n == 0:
        entries = [TierEntry(dim=p.dim, factory=p.factory, metric=metric_name(p.factory),
                             files=[layout.tier_path(run_id, p.dim)], layout=p.layout, ntotal=0) for p in plans]
        return entries, {"k": 10, "queries": 0, "rescore_factor": cfg.rescore, "tiers": {}}
    q_pos, train_pos = split_queries(scan.ordinals, cfg.quality_sample)
    _train(plans, scan.vectors[train_pos].astype(np.float32))
    t_train = time.perf_counter()
    _fill_single(store, shard_paths, scan, [p for p in plans if p.layout == SINGLE], run_id)
    per_tier = _fill_parallel(store, shard_paths, scan, [p for p in plans if p.layout != SINGLE], run_id)
    t_fill = time.perf_counter()
    for p in plans:
        if p.layout == ONDISK:
            p.files = [r["rel"] for r in per_tier[p.dim]]
            p.nbytes = sum(r["bytes"] for r in per_tier[p.dim])  # estimate until merged
    searchers = {p.dim: _searcher(store, p, scan.rows) for p in plans}
    # a corpus that fits the sample is scored from memory; larger ones stream from Parquet
    load = (lambda: tiers.truncate(scan.vectors, dim)) if scan.complete else None
    source = full_width_source(store, shard_paths, scan.rows, dim, load=load, vector_files=vector_files)
    queries = scan.vectors[q_pos].astype(np.float32)
    quality = quality_report(searchers, source, queries, scan.ordinals[q_pos], 10, cfg.rescore)
    del searchers
    t_quality = time.perf_counter()
    for p in plans:
        p.index = None
    _merge(store, [p for p in plans if p.layout == ONDISK], per_tier, run_id)
    t_merge = time.perf_counter()

    entries = []
    for p in plans:
        b = p.build
        seconds = round(b.get("train_s", 0) + b.get("fill_s", 0) + b.get("merge_s", 0), 3)
        bpv = round(p.nbytes / n, 2)
        entries.append(TierEntry(dim=p.dim, factory=p.factory, metric=metric_name(p.factory), files=p.files,
                                 bytes_per_vector=bpv, build_seconds=seconds, layout=p.layout, ntotal=n,
                                 search_params=default_search_params(p.trained), build=dict(b),
                                 sha256=dict(p.sha256)))
        if str(p.dim) in quality["tiers"]:
            quality["tiers"][str(p.dim)].update(factory=p.factory, layout=p.layout, bytes_per_vector=bpv,
                                                build_seconds=seconds)
    quality["build"] = {
        "vectors": n, "shards": len(shard_paths), "sample_rows": int(len(scan.ordinals)),
        "train_rows": int(len(train_pos)), "sample_s": round(t_sample - t_start, 3),
        "train_s": round(t_train - t_sample, 3), "fill_s": round(t_fill - t_train, 3),
        "quality_s": round(t_quality - t_fill, 3), "merge_s": round(t_merge - t_quality, 3),
        "driver_peak_rss_mb": round(_peak_rss_mb(), 1),
    }
    return entries, quality

