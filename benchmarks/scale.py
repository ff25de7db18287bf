"""Driver memory and stage timings of `embindex build` as the corpus grows (a benchmark, not a test).

The point: the driver holds O(fragments) values, not O(documents) (distributed census, per-fragment
commit records, reconcile by adding them up), so its peak RSS should barely move between 1M and 10M
documents. The model is the tiny random-weight jina-embeddings-v3 checkpoint of the tests (64 dims),
so the run measures the pipeline rather than the forward.

Each size is one build in a fresh subprocess (its driver's peak RSS is that build's alone), with a
local Ray started by the build itself (`resources.num_cpus` 3). Documents: 15-25 words drawn with a
seeded RNG from a fixed vocabulary (the fixture tokenizer's whole-word pieces, one token each; ~29
tokens per document), unique ids, written as plain JSONL files (`--files`, default max(16, rows / 62,500)
files, one fragment each).

    .venv/bin/python benchmarks/scale.py --rows 100000 1000000
    .venv/bin/python benchmarks/scale.py --rows 100000 1000000 --compare-src /tmp/old_src/src
    .venv/bin/python benchmarks/scale.py --rows 1000000 10000000          # ~10x the 1M time

`--compare-src` runs every size a second time with PYTHONPATH pointing at another checkout's `src`
(e.g. `git -C . archive 67112b8 src | tar -x -C /tmp/old_src`); the child prints `embindex.__file__`
so the table shows which code ran. Only config keys both versions accept are used.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
FIXTURE = os.path.join(ROOT, "tests", "fixtures", "jina-embeddings-v3-tiny")
ENV = {"RAY_AUTH_MODE": "disabled", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
WORDS_PER_DOC = 20


def vocabulary() -> list[str]:
    """The fixed vocabulary: the whole-word pieces of the fixture's tokenizer (ASCII letters, >= 3 chars),
    so a word is one token and a document ~22 tokens: the forward stays small next to the pipeline."""
    with open(os.path.join(FIXTURE, "tokenizer.json")) as f:
        pieces = [p[0] for p in json.load(f)["model"]["vocab"]]
    return sorted({p[1:] for p in pieces if p.startswith("\u2581") and len(p) > 3 and p[1:].isascii()
                   and p[1:].isalpha()})


def write_corpus(folder: str, rows: int, files: int, seed: int = 0) -> int:
    """`rows` documents of 15-25 vocabulary words each in `files` JSONL files; returns bytes written."""
    import numpy as np

    shutil.rmtree(folder, ignore_errors=True)
    os.makedirs(folder)
    vocab = np.array(vocabulary(), dtype=object)
    rng = np.random.default_rng(seed + 1)
    per = -(-rows // files)
    total = 0
    for f in range(files):
        lo, hi = f * per, min(rows, (f + 1) * per)
        with open(os.path.join(folder, f"part-{f:05d}.jsonl"), "w") as out:
            for start in range(lo, hi, 100_000):
                stop = min(hi, start + 100_000)
                n_words = rng.integers(WORDS_PER_DOC - 5, WORDS_PER_DOC + 6, size=stop - start)
                picks = vocab[rng.integers(0, len(vocab), size=(stop - start, WORDS_PER_DOC + 5))]
                lines = [json.dumps({"id": f"doc-{start + i:09d}", "text": " ".join(picks[i, :n_words[i]])}) + "\n"
                         for i in range(stop - start)]
                out.writelines(lines)
        total += os.path.getsize(out.name)
    return total


def config(corpus: str, index: str, num_cpus: int, factory: str) -> dict:
    return {
        "source": {"uri": corpus, "format": "jsonl"},
        "model": {"name": "jina-embeddings-v3", "path": FIXTURE, "task": "retrieval.passage", "dtype": "float32"},
        "index": {"uri": index, "tiers": [16, "full"], "factory": factory, "quality_sample": 200},
        "resources": {"num_cpus": num_cpus},
        "run": {"progress": False},
    }


class RssPeaks:
    """Peaks of the driver's resident memory by kind, sampled every 0.2 s by a thread: RssAnon (heap,
    arrays), RssFile (mapped files) and RssShmem (shared memory: Ray's object store). ru_maxrss counts
    all three; RssAnon is what grows with what the driver holds."""

    def __init__(self) -> None:
        import threading

        self.peaks_kb = {"RssAnon": 0, "RssFile": 0, "RssShmem": 0}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            self.sample()

    def sample(self) -> None:
        with open("/proc/self/status") as f:
            for line in f:
                key = line.split(":", 1)[0]
                if key in self.peaks_kb:
                    self.peaks_kb[key] = max(self.peaks_kb[key], int(line.split()[1]))

    def stop_mb(self) -> dict[str, float]:
        self._stop.set()
        self._thread.join()
        self.sample()
        return {k: round(v / 1024, 1) for k, v in self.peaks_kb.items()}


def child(args: argparse.Namespace) -> None:
    """One build; prints one JSON line (prefixed RESULT) with the driver's peak RSS and the timings."""
    import embindex

    cfg = json.loads(args.child)
    peaks = RssPeaks()
    t = time.perf_counter()
    result = embindex.build(cfg, log=lambda m: print(m, file=sys.stderr, flush=True))
    wall = time.perf_counter() - t
    peaks_mb = peaks.stop_mb()
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    m = result.manifest
    print("RESULT " + json.dumps({
        "embindex": embindex.__file__, "wall_s": round(wall, 2), "driver_peak_rss_mb": round(rss_mb, 1),
        "driver_peak_anon_mb": peaks_mb["RssAnon"], "driver_peaks_mb": peaks_mb,
        "timings": result.timings, "counts": result.counts,
        "fragments": (m.source or {}).get("fragments"), "shards": len(m.shards),
        "tiers": [(t.dim, t.factory, getattr(t, "layout", None)) for t in m.tiers],
    }), flush=True)


def run_one(cfg: dict, src: str | None, log_path: str, timeout: float) -> dict:
    env = dict(os.environ, **ENV)
    env.pop("PYTHONPATH", None)
    if src:
        env["PYTHONPATH"] = src
    cmd = [sys.executable, os.path.abspath(__file__), "--child", json.dumps(cfg)]
    with open(log_path, "w") as err:
        p = subprocess.run(cmd, env=env, cwd=tempfile.gettempdir(), stdout=subprocess.PIPE, stderr=err,
                           text=True, timeout=timeout)
    lines = [x for x in p.stdout.splitlines() if x.startswith("RESULT ")]
    if p.returncode or not lines:
        tail = open(log_path).read()[-3000:]
        raise RuntimeError(f"build failed (rc {p.returncode}); log {log_path}:\n{tail}")
    return json.loads(lines[-1][len("RESULT "):])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, nargs="+", default=[100_000, 1_000_000])
    ap.add_argument("--files", type=int, default=None, help="JSONL files per corpus (default max(16, rows/62500))")
    ap.add_argument("--num-cpus", type=int, default=3)
    ap.add_argument("--factory", default="auto", help="index.factory (default auto: Flat / HNSW / IVF by size)")
    ap.add_argument("--src", default=None, help="run the builds with PYTHONPATH=<this src> (a snapshot, e.g. "
                    "`git worktree add`, so that edits to the working tree cannot reach a long run's workers)")
    ap.add_argument("--compare-src", default=None, help="also run each size with PYTHONPATH=<this src>")
    ap.add_argument("--work", default=None, help="scratch folder (default a temp dir, removed at the end)")
    ap.add_argument("--timeout", type=float, default=3600, help="seconds per build")
    ap.add_argument("--json", default=None, help="also write the results here")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args)
        return

    work = args.work or tempfile.mkdtemp(prefix="embindex-scale-")
    os.makedirs(work, exist_ok=True)
    variants = [("current", args.src)] + ([("previous", args.compare_src)] if args.compare_src else [])
    results = []
    try:
        for rows in args.rows:
            files = args.files or max(16, rows // 62_500)
            corpus = os.path.join(work, f"corpus-{rows}")
            t = time.perf_counter()
            nbytes = write_corpus(corpus, rows, files)
            print(f"[scale] {rows} rows in {files} files ({nbytes / 2**20:.0f} MiB) written in "
                  f"{time.perf_counter() - t:.0f}s", flush=True)
            for name, src in variants:  # same size back to back, so both see the same machine load
                index = os.path.join(work, f"index-{rows}-{name}")
                shutil.rmtree(index, ignore_errors=True)
                log_path = os.path.join(work, f"build-{rows}-{name}.log")
                r = run_one(config(corpus, index, args.num_cpus, args.factory), src, log_path, args.timeout)
                r.update(rows=rows, files=files, variant=name)
                results.append(r)
                if args.json:  # after every build, so an interrupted run keeps what it measured
                    with open(args.json, "w") as f:
                        json.dump(results, f, indent=1)
                t = r["timings"]
                print(f"[scale] {name:8s} {rows:>9d} rows: wall {r['wall_s']:.1f}s, driver peak RSS "
                      f"{r['driver_peak_rss_mb']:.0f} MB, anon {r.get('driver_peak_anon_mb', 0):.0f} MB ({r['embindex']})",
                      flush=True)
                shutil.rmtree(index, ignore_errors=True)
            shutil.rmtree(corpus, ignore_errors=True)
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)

    print("\n| code | rows | fragments | documents | driver peak RSS MB | peak RssAnon MB | wall s | read_s | first_batch_s | "
          "pipeline_s | tiers_s | total_s | rows/s (total) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        t, c = r["timings"], r["counts"]
        print(f"| {r['variant']} | {r['rows']:,} | {r['fragments']} | {c.get('documents', 0):,} | "
              f"{r['driver_peak_rss_mb']:.0f} | {r.get('driver_peak_anon_mb', 0):.0f} | {r['wall_s']:.1f} | {t.get('read_s', 0):.1f} | "
              f"{t.get('first_batch_s', float('nan')):.1f} | {t.get('pipeline_s', 0):.1f} | "
              f"{t.get('tiers_s', 0):.1f} | {t.get('total_s', 0):.1f} | {r['rows'] / t['total_s']:,.0f} |")
    print()
    for name, _ in variants:
        rs = sorted((r for r in results if r["variant"] == name), key=lambda r: r["rows"])
        if len(rs) >= 2:
            lo, hi = rs[0], rs[-1]
            print(f"{name}: driver peak RSS {hi['rows']:,} / {lo['rows']:,} rows = "
                  f"{hi['driver_peak_rss_mb'] / lo['driver_peak_rss_mb']:.2f}x "
                  f"({hi['driver_peak_rss_mb']:.0f} / {lo['driver_peak_rss_mb']:.0f} MB); peak RssAnon "
                  f"{hi['driver_peak_anon_mb'] / lo['driver_peak_anon_mb']:.2f}x "
                  f"({hi['driver_peak_anon_mb']:.0f} / {lo['driver_peak_anon_mb']:.0f} MB)")
    for r in results:
        print(f"tiers {r['variant']} {r['rows']:,}: {r['tiers']}")


if __name__ == "__main__":
    main()
