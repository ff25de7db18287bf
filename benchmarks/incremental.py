"""Embedding time saved by an incremental re-index against a full rebuild (a benchmark, not a test).

Day 1 builds an index of N documents; day 2 edits, deletes and adds a given fraction of them; then, on
the same Ray, the day-2 corpus is (a) re-indexed incrementally from day 1 and (b) built from scratch.
Prints the embed+write time (the accelerator time of a GPU run), documents embedded, and the ratio.

    .venv/bin/python benchmarks/incremental.py --docs 3300 --change 0.05
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import tempfile
import time

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_worker_niceness", "0")
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))

import ray  # noqa: E402

import embindex  # noqa: E402
from conftest import sample_docs  # noqa: E402
from embindex.reindex import reindex  # noqa: E402


def corpus(n: int) -> list[dict]:
    base = sample_docs()
    return [{"id": f"{i // len(base)}:{d['id']}", "text": d["text"]} for i, d in
            ((i, base[i % len(base)]) for i in range(n))]


def write(folder: str, docs: list[dict], files: int = 8) -> None:
    shutil.rmtree(folder, ignore_errors=True)
    os.makedirs(folder)
    per = -(-len(docs) // files)
    for f in range(files):
        with open(os.path.join(folder, f"{f:02d}.jsonl"), "w") as out:
            out.writelines(json.dumps(d) + "\n" for d in docs[f * per:(f + 1) * per])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--docs", type=int, default=3300)
    ap.add_argument("--change", type=float, default=0.05, help="fraction edited; as many deleted and added")
    ap.add_argument("--dtype", default="bfloat16")
    args = ap.parse_args()
    rng = random.Random(0)
    work = tempfile.mkdtemp(prefix="embindex-incr-")
    ray.init(num_cpus=(os.cpu_count() or 2) + 1, include_dashboard=False, log_to_driver=False)
    try:
        docs = corpus(args.docs)
        src = os.path.join(work, "corpus")
        cfg = {"source": {"uri": src}, "model": {"dtype": args.dtype},
               "index": {"uri": os.path.join(work, "incremental"), "quality_sample": 200},
               "run": {"progress": False}}
        write(src, docs)
        day1 = embindex.build(cfg, log=None)
        k = int(args.docs * args.change)
        picked = rng.sample(range(len(docs)), 2 * k)
        edited, deleted = set(picked[:k]), set(picked[k:])
        day2 = [dict(d, text=d["text"] + " (revised)") if i in edited else d
                for i, d in enumerate(docs) if i not in deleted]
        day2 += [{"id": f"new:{i}", "text": docs[i]["text"] + " (new page)"} for i in rng.sample(range(len(docs)), k)]
        write(src, day2)
        t = time.perf_counter()
        inc = reindex(cfg, log=None)
        inc_wall = time.perf_counter() - t
        t = time.perf_counter()
        full = embindex.build(dict(cfg, index={**cfg["index"], "uri": os.path.join(work, "full")}), log=None)
        full_wall = time.perf_counter() - t
    finally:
        ray.shutdown()
        shutil.rmtree(work, ignore_errors=True)
    rows = [
        ("day 1 full build", day1.counts["documents"], day1.timings["pipeline_s"], day1.timings["total_s"]),
        ("day 2 reindex", inc.manifest.delta["documents_embedded"], inc.timings["pipeline_s"], inc_wall),
        ("day 2 full rebuild", full.counts["documents"], full.timings["pipeline_s"], full_wall),
    ]
    print(f"\n{args.docs} documents, {args.change:.0%} edited + {args.change:.0%} deleted + {args.change:.0%} "
          f"added, dtype {args.dtype}; delta {inc.manifest.delta}\n")
    print("| run | documents embedded | embed+write s | wall s |\n|---|---|---|---|")
    for name, n, pipe, wall in rows:
        print(f"| {name} | {n} | {pipe:.1f} | {wall:.1f} |")
    print(f"\nembed time saved by the reindex: {1 - inc.timings['pipeline_s'] / full.timings['pipeline_s']:.0%} "
          f"(reindex/rebuild = {inc.timings['pipeline_s'] / full.timings['pipeline_s']:.2f}); "
          f"wall {inc_wall / full_wall:.2f}")


if __name__ == "__main__":
    main()
