"""Embedding time saved by an incremental re-index against a full rebuild (a benchmark, not a test).

Day 1 builds an index of N documents; day 2 edits, deletes and adds a given fraction of them; then, on
the same Ray, the day-2 corpus is (a) re-indexed incrementally from day 1 and (b) built from scratch.
Prints the embed+write time (the accelerator time of a GPU run), documents embedded, and the ratio.

    .venv/bin/python benchmarks/incremental.py --docs 3300 --change 0.05

Layout mode (`--factories`): for each FAISS factory (one for every tier), day 1 builds N documents, day 2
edits 0.4%, deletes 0.3% and adds 0.3% (`--edit/--delete/--add`); then, on the same Ray, (a) reindex
from day 1 and (b) a full build of the day-2 corpus into a fresh index. Prints wall times, (a)/(b)
(target <= 0.05) and documents embedded by each, and asserts (a) embedded only the edited and added
documents (manifest.delta["documents_embedded"]).

    .venv/bin/python benchmarks/incremental.py --docs 20000 --factories Flat "HNSW32,Flat" "IVF256,Flat"
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


def day2(docs: list[dict], edit: float, delete: float, add: float, seed: int = 0) -> tuple[list[dict], int, int, int]:
    """The day-2 corpus: `edit` of the documents revised, `delete` removed, `add` new ones appended."""
    rng = random.Random(seed)
    n_edit, n_del, n_add = (round(len(docs) * f) for f in (edit, delete, add))
    picked = rng.sample(range(len(docs)), n_edit + n_del)
    edited, deleted = set(picked[:n_edit]), set(picked[n_edit:])
    out = [dict(d, text=d["text"] + " (revised)") if i in edited else d
           for i, d in enumerate(docs) if i not in deleted]
    out += [{"id": f"new:{i}", "text": docs[i]["text"] + " (new page)"} for i in rng.sample(range(len(docs)), n_add)]
    return out, n_edit, n_del, n_add


MODELS = {
    "minilm": {},  # the default model: builtin:all-MiniLM-L6-v2
    "tiny-v3": {"name": "jina-embeddings-v3", "task": "retrieval.passage",
                "path": os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "jina-embeddings-v3-tiny")},
}


def layouts(args: argparse.Namespace) -> None:
    """Per FAISS layout: day 1 build; day 2 (a) reindex from day 1, (b) full build into a fresh index."""
    work = tempfile.mkdtemp(prefix="embindex-incr-")
    ray.init(num_cpus=args.num_cpus or (os.cpu_count() or 2) + 1, include_dashboard=False, log_to_driver=False)
    docs = corpus(args.docs)
    new, n_edit, n_del, n_add = day2(docs, args.edit, args.delete, args.add)
    d1, d2 = os.path.join(work, "day1"), os.path.join(work, "day2")
    write(d1, docs, args.files)
    write(d2, new, args.files)
    model = dict(MODELS[args.model], dtype=args.dtype)
    tiers = {"tiers": [16, "full"]} if args.model == "tiny-v3" else {}
    rows = []
    try:
        for factory in args.factories:
            tag = factory.replace(",", "_")

            def cfg(src: str, idx: str) -> dict:
                return {"source": {"uri": src}, "model": model,
                        "index": {"uri": os.path.join(work, f"{idx}-{tag}"), "quality_sample": 200,
                                  "factory": factory, **tiers},
                        "run": {"progress": False}}

            t = time.perf_counter()
            day1 = embindex.build(cfg(d1, "incremental"), log=None)
            day1_wall = time.perf_counter() - t
            # the reindex reads the day-2 corpus from the same index uri
            t = time.perf_counter()
            inc = reindex(cfg(d2, "incremental"), log=None)
            inc_wall = time.perf_counter() - t
            t = time.perf_counter()
            full = embindex.build(cfg(d2, "full"), log=None)
            full_wall = time.perf_counter() - t
            embedded = inc.manifest.delta["documents_embedded"]
            assert embedded == n_edit + n_add, (factory, inc.manifest.delta, n_edit, n_add)
            assert inc.counts["documents"] == full.counts["documents"] == len(new), (inc.counts, full.counts)
            assert day1.counts["documents"] == len(docs), day1.counts
            row = {"factory": factory, "tiers": [(e.dim, e.factory, e.layout) for e in inc.manifest.tiers],
                   "day1_wall_s": day1_wall, "reindex_wall_s": inc_wall, "full_wall_s": full_wall,
                   "ratio": inc_wall / full_wall, "reindex_embedded": embedded,
                   "full_embedded": full.counts["documents"], "delta": inc.manifest.delta,
                   "reindex_timings": inc.timings, "full_timings": full.timings}
            rows.append(row)
            print(f"[incremental] {json.dumps(row, default=str)}", flush=True)
            for idx in ("incremental", "full"):
                shutil.rmtree(os.path.join(work, f"{idx}-{tag}"), ignore_errors=True)
    finally:
        ray.shutdown()
        shutil.rmtree(work, ignore_errors=True)
    print(f"\n{args.docs} documents in {args.files} JSONL files, model {args.model} ({args.dtype}); day 2: "
          f"{n_edit} edited, {n_del} deleted, {n_add} added ({(n_edit + n_del + n_add) / args.docs:.1%})\n")
    print("| factory | tier layouts | day 1 build s | (a) reindex s | (b) full build s | (a)/(b) | "
          "embedded (a) | embedded (b) | (a) read / embed+write / tiers s | (b) read / embed+write / tiers s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        a, b = r["reindex_timings"], r["full_timings"]
        lay = ", ".join(sorted({f"{f} {lo}" for _, f, lo in r["tiers"]}))
        print(f"| {r['factory']} | {lay} | {r['day1_wall_s']:.1f} | {r['reindex_wall_s']:.1f} | "
              f"{r['full_wall_s']:.1f} | {r['ratio']:.3f} | {r['reindex_embedded']:,} | {r['full_embedded']:,} | "
              f"{a.get('read_s', 0):.1f} / {a.get('pipeline_s', 0):.1f} / {a.get('tiers_s', 0):.1f} | "
              f"{b.get('read_s', 0):.1f} / {b.get('pipeline_s', 0):.1f} / {b.get('tiers_s', 0):.1f} |")
    print(f"\ntarget (a)/(b) <= {args.target}: " + ", ".join(
        f"{r['factory']} {'met' if r['ratio'] <= args.target else 'NOT met'}" for r in rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1, default=str)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--docs", type=int, default=3300)
    ap.add_argument("--change", type=float, default=0.05, help="fraction edited; as many deleted and added")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--factories", nargs="+", default=None,
                    help="layout mode: per index.factory (e.g. Flat 'HNSW32,Flat' 'IVF256,Flat') day 1 build, "
                         "then (a) reindex vs (b) full build of day 2, wall times and (a)/(b)")
    ap.add_argument("--edit", type=float, default=0.004, help="layout mode: fraction edited")
    ap.add_argument("--delete", type=float, default=0.003, help="layout mode: fraction deleted")
    ap.add_argument("--add", type=float, default=0.003, help="layout mode: fraction added")
    ap.add_argument("--model", choices=sorted(MODELS), default="minilm", help="layout mode: model")
    ap.add_argument("--files", type=int, default=8, help="layout mode: JSONL files per corpus")
    ap.add_argument("--num-cpus", type=int, default=None, help="layout mode: logical CPUs of the local Ray")
    ap.add_argument("--target", type=float, default=0.05, help="layout mode: the (a)/(b) target")
    ap.add_argument("--json", default=None, help="layout mode: also write the rows here")
    args = ap.parse_args()
    if args.factories:
        layouts(args)
        return
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
