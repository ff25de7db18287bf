"""Reader cost on a large index: open + first query, warm queries, peak RSS (`IndexReader`).

Run from the repository root:

    .venv/bin/python benchmarks/search_latency.py --rows 1000000 [--old-src /tmp/old_src/src]

The index is written directly (no model forward for the corpus): `--rows` synthetic unit vectors
(`tiers_scale.draw`: a 1,000-cluster Gaussian mixture with Matryoshka-like decaying variance) at
`--dim`, stored as float16 Parquet parts with the pipeline's schema and row groups, each with its
float16 row matrix (`put_part`, what the write stage writes), tiers
built with `build_tiers` (IVF on-disk lists by default) and a published manifest that records the
bundled MiniLM, so one text query can also go through the model. A built index is reused when
`--root` already holds one of the same size.

Each reader runs in a fresh process (peak RSS = that process's ru_maxrss): open + first query (one
query vector, k=10), then the median of 20 warm single queries, on the narrowest tier and on the
reader's default tier (recall target), then one text query (model load included). The same index is
measured twice, side by side: rescoring from the row matrices ("row matrix"), and the reader told the
parts have none ("parquet": the shortlisted rows' row groups decoded, as for parts written before row
matrices existed). `--old-src` adds the same measurement with another source tree first on PYTHONPATH
(e.g. `git archive HEAD src`).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from tiers_scale import draw  # noqa: E402

RUN_ID = "bench"


def _shard(start: int, n: int, dim: int, seed: int):
    import pyarrow as pa

    v = draw(n, dim, seed=seed).astype(np.float16)
    ords = np.arange(start, start + n)
    return pa.table({
        "id": [f"doc-{j:08d}" for j in ords], "chunk": pa.nulls(n, pa.int32()), "start": pa.nulls(n, pa.int64()),
        "end": pa.nulls(n, pa.int64()), "content_hash": [f"{j:016x}" for j in ords],
        "meta": [json.dumps({"title": f"document {j}", "shard": int(start)}) for j in ords],
        "source": pa.array(["synthetic"] * n), "modality": pa.array(["text"] * n),
        "vector": pa.FixedSizeListArray.from_arrays(pa.array(v.ravel(), pa.float16()), dim),
    })


def build(root: str, rows: int, dim: int, tier_dims: list[int], shard_rows: int, factory: str) -> dict:
    """Write shards, tiers and a manifest under `root` (one shard in memory at a time)."""
    from embindex.config import IndexConfig, JobConfig
    from embindex.index.manifest import Counts, Manifest, ModelEntry, ShardEntry
    from embindex.index.shards import put_part
    from embindex.index.tier_builder import build_tiers
    from embindex.storage import Storage

    store = Storage(root)
    t0 = time.perf_counter()
    shards = []
    for i, start in enumerate(range(0, rows, shard_rows)):
        n = min(shard_rows, rows - start)
        rel = f"shards/{RUN_ID}/part-{i:05d}.parquet"
        shards.append(ShardEntry(**put_part(store, rel, _shard(start, n, dim, seed=1000 + i))))
    t_shards = time.perf_counter() - t0
    cfg = IndexConfig(uri=root, tiers=tier_dims, factory=factory, quality_sample=200, train_sample=50_000)
    entries, quality = build_tiers(store, [s.path for s in shards], dim, tier_dims, cfg, RUN_ID)
    job = JobConfig.model_validate({"source": {"uri": "synthetic"}, "index": {"uri": root, "tiers": tier_dims}})
    m = Manifest(version="v000001", created_at="2026-01-01T00:00:00+00:00", run_id=RUN_ID,
                 model=ModelEntry(name="hf-encoder", path="builtin:all-MiniLM-L6-v2", checkpoint_hash="sha256:-",
                                  max_length=128, pooling="mean", dtype="float32"),
                 outputs={"mode": "document"}, dim=dim, tiers=entries, shards=shards,
                 counts=Counts(rows_in=rows, documents=rows, chunks=rows, vectors=rows, rejected=0),
                 quality=quality, config=json.loads(job.model_dump_json()))
    m.config["model"] = {"dtype": "float32", "max_length": 128, "pooling": "mean"}
    store.write_text("versions/v000001/manifest.json", m.to_json())
    store.write_text("_latest", "v000001")
    return {"shards_s": round(t_shards, 1), "tiers_s": round(time.perf_counter() - t0 - t_shards, 1),
            "factories": {e.dim: f"{e.factory} ({e.layout})" for e in entries},
            "rescored_recall@10": {d: q.get("recall@10_rescored") for d, q in quality["tiers"].items()}}


def _rss_mb() -> float:
    """Peak RSS of this process (VmHWM: unlike ru_maxrss it is not inherited across exec)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def measure(root: str, dim: int, narrowest: int, parquet: bool = False) -> dict:
    """One reader in this process: open + first query, warm queries, peak RSS, then a text query.
    `parquet`: rescore from the Parquet row groups, as if the parts had no row matrix."""
    import embindex

    queries = draw(41, dim, seed=7)
    base_rss = _rss_mb()
    out: dict = {"rss_after_imports_mb": round(base_rss, 1)}

    def open_reader():
        reader = embindex.open_index(root)
        if parquet:
            for s in reader.manifest.shards:
                s.vectors = None
        return reader

    t_open, reader = _timed(open_reader)
    t_first, _ = _timed(lambda: reader.search_vectors(queries[:1], k=10, tier=narrowest))
    out["open_s"] = round(t_open, 3)
    out["open_plus_first_query_s"] = round(t_open + t_first, 3)
    warm = [_timed(lambda i=i: reader.search_vectors(queries[i:i + 1], k=10, tier=narrowest))[0]
            for i in range(1, 21)]
    out["warm_query_median_ms"] = round(1000 * statistics.median(warm), 1)
    out["peak_rss_mb"] = round(_rss_mb(), 1)
    default = getattr(reader, "default_tier", None)
    if default is not None and default != narrowest:
        t_d, _ = _timed(lambda: reader.search_vectors(queries[21:22], k=10))
        warm_d = [_timed(lambda i=i: reader.search_vectors(queries[i:i + 1], k=10))[0] for i in range(22, 41)]
        out[f"default_tier_{default}"] = {"first_query_s": round(t_d, 3),
                                          "warm_query_median_ms": round(1000 * statistics.median(warm_d), 1),
                                          "peak_rss_mb": round(_rss_mb(), 1)}
    t_text, hits = _timed(lambda: reader.search(["how do I read a compressed file"], k=10, tier=narrowest))
    warm_text = [_timed(lambda: reader.search(["list files in a directory"], k=10, tier=narrowest))[0]
                 for _ in range(5)]
    out["text_query_first_s_with_model_load"] = round(t_text, 3)
    out["text_query_warm_median_ms"] = round(1000 * statistics.median(warm_text), 1)
    out["peak_rss_with_model_mb"] = round(_rss_mb(), 1)
    out["hits"] = len(hits[0])
    return out


def _run_measure(args: argparse.Namespace, src: str | None, parquet: bool = False) -> dict:
    env = dict(os.environ)
    if src:
        env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, __file__, "--phase", "measure", "--root", args.root, "--dim", str(args.dim),
           "--tiers", args.tiers] + (["--parquet"] if parquet else [])
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if res.returncode:
        raise RuntimeError(res.stderr[-3000:])
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--dim", type=int, default=384)
    p.add_argument("--tiers", default="64,128,384")
    p.add_argument("--shard-rows", type=int, default=100_000)
    p.add_argument("--factory", default="IVF1024,Flat", help="FAISS factory of every tier")
    p.add_argument("--root", default="/tmp/embindex-bench-search")
    p.add_argument("--old-src", default=None, help="source tree of the reader to compare with (PYTHONPATH)")
    p.add_argument("--phase", default="all", choices=["all", "measure"])
    p.add_argument("--parquet", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    tier_dims = [int(t) for t in args.tiers.split(",")]
    if args.phase == "measure":
        print(json.dumps(measure(args.root, args.dim, min(tier_dims), parquet=args.parquet)))
        return
    marker = os.path.join(args.root, f"_bench-{args.rows}-{args.dim}-{args.tiers}-{args.factory}-rowmatrix.json")
    if os.path.exists(marker):
        built = json.load(open(marker))
    else:
        t0 = time.perf_counter()
        built = build(args.root, args.rows, args.dim, tier_dims, args.shard_rows, args.factory)
        built["build_total_s"] = round(time.perf_counter() - t0, 1)
        built["build_peak_rss_mb"] = round(_rss_mb(), 1)
        json.dump(built, open(marker, "w"))
    print(json.dumps({"rows": args.rows, "dim": args.dim, "tiers": tier_dims, "index": built}, indent=1))
    results = {"row matrix": _run_measure(args, None), "parquet": _run_measure(args, None, parquet=True)}
    if args.old_src:
        results["old"] = _run_measure(args, args.old_src)
    keys = [k for k in results["row matrix"] if k != "hits"]
    print(f"{'':38s}" + "".join(f"{name:>16s}" for name in results))
    for k in keys:
        print(f"{k:38s}" + "".join(f"{str(r.get(k, '-')):>16s}" for r in results.values()))
    print(json.dumps(results))


if __name__ == "__main__":
    main()
