"""Export throughput: rows/s of `embindex export` into LanceDB, Postgres + pgvector, Elasticsearch and bulk
files (a benchmark, not a test).

    .venv/bin/python benchmarks/export.py --rows 20000 --width 128 [--ray]

The index is written directly (no model): `--rows` unit vectors of `--dim` dims (random, float16, like the
pipeline's shards) in shards of `--shard-rows` rows, with ids, chunk columns and a small metadata object per
row, under a manifest that lists the shards (no tier files: an export reads only the manifest, the shards and
the tombstones). Each target gets a fresh export of the whole version at `--width`:

- LanceDB: a local table (`--index` adds the IVF-PQ build to the end-to-end time).
- pgvector: a local Postgres from pgserver (Unix socket), HNSW index built after the load (end-to-end).
- Elasticsearch: the official client's streaming_bulk against the tests' loopback recorder running in a
  separate process; it parses only the action lines, so this measures our side (rows -> documents ->
  client -> HTTP), not an Elasticsearch cluster.
- file: mapping.json + bulk NDJSON files.

"load rows/s" counts reading the shards and writing their rows (ExportResult.load_seconds); "end-to-end"
adds connecting, planning, creating the table / mapping and building the ANN index.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import shutil
import sys
import tempfile
import time

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_worker_niceness", "0")
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

MODULES = ["os", "json", "gzip", "socket", "email", "random", "pathlib", "re"]


def write_index(root: str, rows: int, dim: int, shard_rows: int, seed: int = 0) -> None:
    """A published single-version index of `rows` random unit vectors (no tier files)."""
    from embindex.index import layout
    from embindex.index.manifest import Counts, Manifest, ModelEntry, ShardEntry, TierEntry

    rng = np.random.default_rng(seed)
    run = "bench-export"
    os.makedirs(os.path.join(root, layout.run_dir(run)), exist_ok=True)
    shards = []
    for i, start in enumerate(range(0, rows, shard_rows)):
        n = min(shard_rows, rows - start)
        v = rng.normal(size=(n, dim)).astype(np.float32)
        v = (v / np.linalg.norm(v, axis=1, keepdims=True)).astype(np.float16)
        ids = [f"doc-{j:07d}" for j in range(start, start + n)]
        meta = [json.dumps({"module": MODULES[j % len(MODULES)], "kind": "function", "line": j}) for j in range(start, start + n)]
        table = pa.table({"id": ids, "chunk": pa.nulls(n, pa.int32()), "start": pa.nulls(n, pa.int32()),
                          "end": pa.nulls(n, pa.int32()), "content_hash": ids, "meta": meta,
                          "source": ["synthetic"] * n,
                          "vector": pa.FixedSizeListArray.from_arrays(pa.array(v.reshape(-1), pa.float16()), dim),
                          "modality": ["text"] * n})
        rel = layout.part_path(run, f"{i:05d}")
        pq.write_table(table, os.path.join(root, rel), compression="zstd")
        shards.append(ShardEntry(path=rel, rows=n, bytes=os.path.getsize(os.path.join(root, rel)), sha256="-"))
    tiers = [TierEntry(dim=d, factory="Flat", files=[]) for d in (64, 128, 256, dim) if d <= dim]
    m = Manifest(version=layout.version_name(1), created_at="-", run_id=run,
                 model=ModelEntry(name="synthetic", path="-", checkpoint_hash="-", max_length=0, pooling="-",
                                  dtype="float16"),
                 outputs={"mode": "document"}, dim=dim, tiers=tiers, shards=shards,
                 counts=Counts(rows_in=rows, documents=rows, chunks=rows, vectors=rows, rejected=0),
                 fingerprint="sha256:synthetic")
    os.makedirs(os.path.join(root, "versions", m.version), exist_ok=True)
    with open(os.path.join(root, layout.manifest_path(m.version)), "w") as f:
        f.write(m.to_json())
    with open(os.path.join(root, layout.LATEST), "w") as f:
        f.write(m.version + "\n")


def run_one(name: str, index: str, target: str, width: int, **kwargs) -> dict:
    from embindex.export import export_index

    t0 = time.perf_counter()
    r = export_index(index, target, tier=width, **kwargs)
    total = time.perf_counter() - t0
    return {"target": name, "rows": r.rows_upserted, "shards": r.shards_written,
            "load_s": round(r.load_seconds, 2), "load_rows_per_s": round(r.rows_upserted / r.load_seconds),
            "end_to_end_s": round(total, 2), "end_to_end_rows_per_s": round(r.rows_upserted / total),
            "finish": r.finish}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=20000)
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--shard-rows", type=int, default=2000)
    ap.add_argument("--targets", default="lancedb,pgvector,es,file")
    ap.add_argument("--index", action="store_true", help="also build LanceDB's IVF-PQ index")
    ap.add_argument("--ray", action="store_true", help="one Ray task per shard on a local Ray (else inline)")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()

    work = tempfile.mkdtemp(prefix="embindex-export-bench-")
    index = os.path.join(work, "index")
    t0 = time.perf_counter()
    write_index(index, args.rows, args.dim, args.shard_rows)
    print(f"index: {args.rows} rows x {args.dim} dims in {-(-args.rows // args.shard_rows)} shards "
          f"({time.perf_counter() - t0:.1f} s to write); exporting {args.width} dims, "
          f"{'Ray tasks' if args.ray else 'inline'}", flush=True)
    if args.ray:
        import ray

        ray.init(num_cpus=os.cpu_count() or 2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    results, cleanup = [], []
    try:
        for name in args.targets.split(","):
            if name == "lancedb":
                results.append(run_one(name, index, f"lancedb://{work}/lance/docs", args.width,
                                       build_index=args.index,
                                       options={"num_partitions": 32, "num_sub_vectors": args.width // 8}))
            elif name == "pgvector":
                import pgserver

                server = pgserver.get_server(os.path.join(work, "pg"), cleanup_mode="stop")
                cleanup.append(server.cleanup)
                uri = server.get_uri() + "&table=docs"
                results.append(run_one(name, index, uri, args.width))
            elif name == "es":
                from es_recorder import serve

                ctx = mp.get_context("spawn")
                queue = ctx.Queue()
                proc = ctx.Process(target=serve, args=(queue, False), daemon=True)
                proc.start()
                cleanup.append(proc.terminate)
                results.append(run_one(name, index, f"es://{queue.get(timeout=60)}/docs", args.width))
            elif name == "file":
                results.append(run_one(name, index, f"file://{work}/files", args.width))
            print(json.dumps(results[-1]), flush=True)
    finally:
        for fn in cleanup:
            fn()
        shutil.rmtree(work, ignore_errors=True)
    print("\n| target | rows | load s | load rows/s | end-to-end s | end-to-end rows/s | finish |")
    print("|---|---:|---:|---:|---:|---:|---|")
    for r in results:
        fin = ", ".join(f"{k}: {v}" for k, v in r["finish"].items() if k != "files")
        print(f"| {r['target']} | {r['rows']} | {r['load_s']} | {r['load_rows_per_s']:,} | {r['end_to_end_s']} | "
              f"{r['end_to_end_rows_per_s']:,} | {fin} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
