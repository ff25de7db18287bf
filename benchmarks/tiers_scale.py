"""Tier build at corpus scale: build time, peak memory, recall@10 and latency per tier and for the funnel.

Run from the repository root:

    .venv/bin/python benchmarks/tiers_scale.py --vectors 1000000 --scales 0.25,1

Data: structured synthetic embeddings (not model outputs): a mixture of 1,000 Gaussian clusters in
`--dim` dims whose variance decays along the dims (so that leading dims carry most of the signal, as
in Matryoshka models), L2-normalized, stored as float16 Parquet shards of `--shard-rows` rows with
the pipeline's schema. Queries are fresh draws from the same mixture (not in the corpus).

For each scale (a fraction of --vectors) a fresh process generates the shards, then another fresh
process runs `build_tiers` inside a local Ray (the pipeline's path: reservoir sample, one training
per tier, one fill task per shard, on-disk merge for IVF tiers, quality report) and then measures
search on the served tiers: recall@10 against exact full-width search (streamed over the shards),
latency per query in a batch of --queries and for single queries. Peak memory is ru_maxrss of the
build process (driver) and of the fill tasks' worker processes.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")

import numpy as np

CLUSTERS = 1000


def _mixture(dim: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    scale = (1.0 / np.sqrt(1 + np.arange(dim) / 16)).astype(np.float32)
    return (rng.normal(size=(CLUSTERS, dim)).astype(np.float32) * scale), scale


def draw(n: int, dim: int, seed: int) -> np.ndarray:
    centers, scale = _mixture(dim)
    rng = np.random.default_rng(seed)
    x = centers[rng.integers(0, CLUSTERS, n)] + 0.6 * rng.normal(size=(n, dim)).astype(np.float32) * scale
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def generate(root: str, n: int, dim: int, shard_rows: int) -> list[str]:
    """Write the corpus as Parquet shards (id, meta, vector fixed_size_list<float16>), one shard in memory."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    os.makedirs(os.path.join(root, "shards", "bench"), exist_ok=True)
    paths = []
    for i, start in enumerate(range(0, n, shard_rows)):
        m = min(shard_rows, n - start)
        v = draw(m, dim, seed=1000 + i).astype(np.float16)
        col = pa.FixedSizeListArray.from_arrays(pa.array(v.ravel(), pa.float16()), dim)
        table = pa.table({"id": [f"d{j}" for j in range(start, start + m)], "meta": pa.nulls(m, pa.string()),
                          "vector": col})
        rel = f"shards/bench/part-{i:05d}.parquet"
        pq.write_table(table, os.path.join(root, rel), compression="zstd")
        paths.append(rel)
    return paths


def _timed(fn, *args) -> tuple[float, object]:
    t0 = time.perf_counter()
    out = fn(*args)
    return time.perf_counter() - t0, out


def build_and_measure(root: str, paths: list[str], dim: int, tiers_: list[int], factory, budget: float,
                      n_queries: int, train_sample: int) -> dict:
    import ray

    from embindex.config import IndexConfig
    from embindex.index.tier_builder import build_tiers
    from embindex.index.funnel import Funnel, Rescore, exact_topk
    from embindex.index.rescore_vectors import ParquetVectors
    from embindex.index.tier_search import TierSearcher, open_tier
    from embindex.storage import Storage

    store = Storage(root)
    cfg = IndexConfig(uri=root, tiers=tiers_, factory=factory, memory_budget_mb=budget, quality_sample=1000,
                      train_sample=train_sample)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        build_s, (entries, quality) = _timed(build_tiers, store, paths, dim, tiers_, cfg, "bench")
    finally:
        ray.shutdown()
    build_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    from embindex.index.vector_io import shard_rows as count_rows

    counts = [count_rows(store, p) for p in paths]
    source = ParquetVectors(store, paths, counts, dim)
    q = draw(n_queries, dim, seed=7)
    truth_s, truth_i = exact_topk(source, q, 10)

    def recall(ids: np.ndarray) -> float:
        exact = source.score(q, ids[:, :10])
        return float(np.mean(np.sum(exact >= truth_s[:, -1:] - 1e-5, axis=1) / 10))

    out = {"tiers": {}, "build": quality["build"], "build_total_s": round(build_s, 1),
           "driver_peak_rss_mb": round(build_rss, 1), "manifest_quality": quality}
    for e in entries:
        searcher = TierSearcher(open_tier(store, e), metric=e.metric, params=e.search_params)
        t, (s, ids) = _timed(searcher.search, q, 10)
        single = [_timed(searcher.search, q[i:i + 1], 10)[0] for i in range(50)]
        funnel = Funnel(searcher, [Rescore(ParquetVectors(store, paths, counts, dim))], factor=10)
        tf, (fs, fids) = _timed(funnel.search, q, 10)
        cached = Funnel(searcher, [Rescore(ParquetVectors(store, paths, counts, dim, cache_bytes=2**31))], factor=10)
        cached.search(q, 10)  # warm the shard cache (then it holds every shard: in-memory rescoring)
        single_f = [_timed(cached.search, q[i:i + 1], 10)[0] for i in range(20)]
        out["tiers"][e.dim] = {
            "factory": e.factory, "layout": e.layout, "bytes_per_vector": e.bytes_per_vector,
            "build_s": e.build_seconds, "train_s": e.build.get("train_s"), "fill_task_s": e.build.get("fill_s"),
            "merge_s": e.build.get("merge_s"), "fill_task_peak_rss_mb": e.build.get("fill_task_peak_rss_mb"),
            "recall@10": round(recall(ids), 4), "ms_per_query_batch": round(1000 * t / len(q), 3),
            "ms_single_query_median": round(1000 * statistics.median(single), 3),
            "funnel_recall@10": round(recall(fids), 4), "funnel_ms_per_query_batch": round(1000 * tf / len(q), 3),
            "funnel_ms_single_query_warm_median": round(1000 * statistics.median(single_f), 3),
        }
    return out


def _phase(args: argparse.Namespace) -> None:
    if args.phase == "gen":
        paths = generate(args.root, args.n, args.dim, args.shard_rows)
        print(json.dumps({"paths": paths, "gen_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
    else:
        paths = json.loads(args.paths)
        factory = json.loads(args.factory) if args.factory.startswith("{") else args.factory
        res = build_and_measure(args.root, paths, args.dim, [int(t) for t in args.tiers.split(",")], factory,
                                args.budget_mb, args.queries, args.train_sample)
        print(json.dumps(res, default=str))


def _run(cmd: list[str]) -> dict:
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vectors", type=int, default=1_000_000)
    p.add_argument("--scales", default="0.25,1", help="fractions of --vectors to build (memory flatness)")
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--tiers", default="64,128,256")
    p.add_argument("--factory", default='{"64": "IVF1024,PQ16", "128": "IVF1024,SQ8", "256": "IVF1024,Flat"}')
    p.add_argument("--budget-mb", type=float, default=4096)
    p.add_argument("--shard-rows", type=int, default=50_000)
    p.add_argument("--queries", type=int, default=1000)
    p.add_argument("--train-sample", type=int, default=50_000)
    p.add_argument("--workdir", default=None)
    p.add_argument("--phase", choices=["gen", "build"], help=argparse.SUPPRESS)
    p.add_argument("--root", help=argparse.SUPPRESS)
    p.add_argument("--n", type=int, help=argparse.SUPPRESS)
    p.add_argument("--paths", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.phase:
        _phase(args)
        return
    results = {}
    for frac in [float(f) for f in args.scales.split(",")]:
        n = int(args.vectors * frac)
        root = tempfile.mkdtemp(prefix=f"tiers-{n}-", dir=args.workdir)
        try:
            me = [sys.executable, __file__]
            t0 = time.perf_counter()
            gen = _run(me + ["--phase", "gen", "--root", root, "--n", str(n), "--dim", str(args.dim),
                             "--shard-rows", str(args.shard_rows)])
            gen_s = time.perf_counter() - t0
            res = _run(me + ["--phase", "build", "--root", root, "--paths", json.dumps(gen["paths"]),
                             "--dim", str(args.dim), "--tiers", args.tiers, "--factory", args.factory,
                             "--budget-mb", str(args.budget_mb), "--queries", str(args.queries),
                             "--train-sample", str(args.train_sample)])
            res["gen_s"] = round(gen_s, 1)
            results[n] = res
            print(f"[tiers_scale] n={n}: {json.dumps(res, default=str)}", file=sys.stderr, flush=True)
        finally:
            shutil.rmtree(root, ignore_errors=True)
    print(markdown(results, args))


def markdown(results: dict, args: argparse.Namespace) -> str:
    lines = ["| vectors | tier | factory | layout | B/vec | build s (train+fill+merge) | recall@10 | ms/q batch | "
             "ms/q single | funnel recall@10 | funnel ms/q batch | funnel ms/q single (warm shard cache) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for n, r in results.items():
        for d, t in r["tiers"].items():
            lines.append(f"| {n:,} | {d} | {t['factory']} | {t['layout']} | {t['bytes_per_vector']} | "
                         f"{t['build_s']} ({t['train_s']}+{t['fill_task_s']}+{t['merge_s']}) | {t['recall@10']} | "
                         f"{t['ms_per_query_batch']} | {t['ms_single_query_median']} | {t['funnel_recall@10']} | "
                         f"{t['funnel_ms_per_query_batch']} | {t['funnel_ms_single_query_warm_median']} |")
    lines += ["", "| vectors | build wall s | driver peak RSS MB | fill-task peak RSS MB | phases (s) |",
              "|---|---|---|---|---|"]
    for n, r in results.items():
        task = max((t["fill_task_peak_rss_mb"] or 0) for t in r["tiers"].values())
        b = r["build"]
        lines.append(f"| {n:,} | {r['build_total_s']} | {b['driver_peak_rss_mb']} | {task} | sample {b['sample_s']}, "
                     f"train {b['train_s']}, fill {b['fill_s']}, merge {b['merge_s']}, quality {b['quality_s']} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
