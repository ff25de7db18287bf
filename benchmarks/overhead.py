"""The pipeline's CPU cost per document outside the model, per stage, with a near-free model.

Run from the repository root:

    .venv/bin/python benchmarks/overhead.py                              # 30/100/500 tokens, 12,000 docs each
    .venv/bin/python benchmarks/overhead.py --tokens 100 --docs 40000 --json overhead.json
    .venv/bin/python benchmarks/overhead.py --no-e2e                     # per stage only (no Ray)

The model is the tiny jina-embeddings-v3 fixture (tests/fixtures/jina-embeddings-v3-tiny: hidden 64, its
forward costs a few microseconds per token), so what is measured is everything around the forward. Each
corpus is synthetic: words drawn from the bundled sample corpus, as many per document as give the target
token count with the model's tokenizer, in JSONL files of `--fragment-docs` documents (one fragment each).

1. Per stage, in this process, one fragment at a time (the block a Ray task or actor call gets), CPU time
   of the process (`time.process_time`, all threads; torch runs 1 thread) per document:
   - read:      `Read.run` (JSONL bytes -> normalized rows: ids, content hashes, reject rules);
   - normalize: `Normalize.run` (duplicate marking);
   - tokenize:  `Tokenize.run` (ids, chunk columns);
   - transfer:  what Ray does with a block at a stage boundary that is not fused (into the embed actor
                and out of it): pickle protocol 5 with out-of-band buffers, and back (Ray's serializer
                for Arrow tables; the copy into shared memory is not counted);
   - embed:     the embed actor's call minus the model's forward (`forward_pooled`, timed around it):
                sorting, padding, tensors in and out, output packing;
   - forward:   the model's forward, reported apart (it is the model's cost, not the pipeline's);
   - write:     `Write.run` (the fragment's Parquet part, rejects and commit marker, on local disk).
   The embed actor and the tokenizer are loaded once, before timing; each stage is timed over all
   fragments, best of `--repeat` passes.
2. End to end (`--e2e`, default on): `embindex.build` of the same corpus on a local Ray started in this
   process (`--num-cpus`, default all cores), one embed actor. CPU time of every process of the Ray
   session (this driver, GCS, raylet, workers; sampled every 0.2 s, a process's last sample kept after
   it exits) over the build, per document; minus the forward's per-document CPU time from part 1 =
   the pipeline's cost outside the model end to end, which includes Ray's own scheduling, the object
   store, the census pass and the write tasks. Per document = (CPU of the big build - CPU of a one-fragment
   build) / (difference in documents), so a build's fixed costs (actor start and model load, tiers,
   publish) are reported apart, not spread over the documents. documents/s per core = 1 / that.
   An untimed warm-up build of one fragment runs first (Ray starts its worker processes then).

Target (issue "keep the accelerator fed"): outside the model, <= 0.25 core-ms per 100-token document.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import pickle
import platform
import random
import shutil
import sys
import tempfile
import threading
import time
from importlib.resources import files
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[1]
MODEL = REPO / "tests" / "fixtures" / "jina-embeddings-v3-tiny"
STAGES = ("read", "normalize", "tokenize", "transfer", "embed", "write")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def vocabulary() -> list[str]:
    with gzip.open(str(files("embindex") / "data" / "sample_corpus.jsonl.gz"), "rt", encoding="utf-8") as f:
        words = [w for line in f for w in json.loads(line)["text"].split()]
    return words


def words_per_doc(tokens: int, words: list[str], count_tokens: Callable[[list[str]], list[int]]) -> int:
    """Words per document that give about `tokens` tokens (special tokens included)."""
    rng = random.Random(1)
    probe = [" ".join(rng.choices(words, k=100)) for _ in range(200)]
    per_word = sum(count_tokens(probe)) / (100 * len(probe))
    return max(1, round((tokens - 2) / per_word))


def write_corpus(folder: Path, docs: int, n_words: int, fragment_docs: int, words: list[str]) -> list[str]:
    """JSONL files of `fragment_docs` documents; returns the first 500 texts."""
    folder.mkdir(parents=True)
    rng = random.Random(0)
    head: list[str] = []
    for start in range(0, docs, fragment_docs):
        with open(folder / f"part-{start // fragment_docs:05d}.jsonl", "w", encoding="utf-8") as f:
            for i in range(start, min(docs, start + fragment_docs)):
                text = " ".join(rng.choices(words, k=n_words))
                f.write(json.dumps({"id": f"d{i}", "text": text}) + "\n")
                if len(head) < 500:
                    head.append(text)
    return head


def job_config(corpus: Path, index: Path, fragment_docs: int) -> dict[str, Any]:
    return {
        "source": {"uri": str(corpus)},
        "model": {"name": "jina-embeddings-v3", "path": str(MODEL), "dtype": "float32", "max_length": 1024,
                  "task": "retrieval.passage"},
        "index": {"uri": str(index), "tiers": ["full"], "quality_sample": 100},
        "resources": {"actors": 1, "cpus_per_actor": 1, "torch_threads": 1, "batch_tokens": 16384},
        "run": {"progress": False},
    }


class TimedForward:
    """Wraps an encoder: CPU seconds spent inside its forwards."""

    def __init__(self, encoder: Any):
        self.inner, self.cpu_s = encoder, 0.0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def _timed(self, fn: Callable[..., Any], *args: Any, **kw: Any) -> Any:
        t = time.process_time()
        try:
            return fn(*args, **kw)
        finally:
            self.cpu_s += time.process_time() - t

    def forward_pooled(self, *args: Any, **kw: Any) -> Any:
        return self._timed(self.inner.forward_pooled, *args, **kw)

    def forward_token_states(self, *args: Any, **kw: Any) -> Any:
        return self._timed(self.inner.forward_token_states, *args, **kw)


def roundtrip(table: Any) -> Any:
    """Pickle protocol 5 with out-of-band buffers and back (Ray's serialization of an Arrow block)."""
    buffers: list[Any] = []
    data = pickle.dumps(table, protocol=5, buffer_callback=buffers.append)
    return pickle.loads(data, buffers=[b.raw() for b in buffers])


def per_stage(corpus: Path, workdir: Path, fragment_docs: int, repeat: int) -> dict[str, float]:
    """CPU seconds per stage over the whole corpus (best of `repeat` passes) and the document count."""
    import torch

    from embindex.config import load_config
    from embindex.pipeline import Job
    from embindex.sources.readers import open_corpus
    from embindex.stages import plan_stages
    from embindex.stages.normalize import Normalize
    from embindex.stages.read import Read

    torch.set_num_threads(1)
    cfg = load_config(job_config(corpus, workdir / "stage-index", fragment_docs))
    job = Job(cfg, log=lambda _m: None)
    source = open_corpus(cfg.source)
    plan = plan_stages(cfg, read=Read(source, source.fragments), normalize=Normalize(), generate=[],
                       max_length=job.info.max_length, window=job.window, window_overlap=0, run_id="bench")
    by_name = {s.name: s for s in plan}
    cls, kwargs = by_name["embed"].actor(1)
    actor = cls(**kwargs)
    timed = TimedForward(actor.embedder.encoder)
    actor.embedder.encoder = timed
    by_name["tokenize"].run(by_name["normalize"].run(Read(source, source.fragments[:1]).run()))  # warm caches

    best: dict[str, float] = {}
    docs = 0
    for _ in range(repeat):
        spent = dict.fromkeys((*STAGES, "forward"), 0.0)
        docs = 0
        timed.cpu_s = 0.0
        for fragment in source.fragments:
            t = time.process_time()
            table = Read(source, [fragment]).run()
            spent["read"] += time.process_time() - t
            docs += table.num_rows
            for name in ("normalize", "tokenize"):
                t = time.process_time()
                table = by_name[name].run(table)
                spent[name] += time.process_time() - t
            t = time.process_time()
            table = roundtrip(table)
            spent["transfer"] += time.process_time() - t
            before = timed.cpu_s
            t = time.process_time()
            table = actor(table)
            call = time.process_time() - t
            spent["forward"] += timed.cpu_s - before
            spent["embed"] += call - (timed.cpu_s - before)
            t = time.process_time()
            table = roundtrip(table)
            spent["transfer"] += time.process_time() - t
            t = time.process_time()
            by_name["write"].run(table)
            spent["write"] += time.process_time() - t
        shutil.rmtree(workdir / "stage-index", ignore_errors=True)
        for k, v in spent.items():
            best[k] = min(best.get(k, v), v)
    best["docs"] = docs
    return best


class CpuSampler:
    """CPU seconds of this process and all its descendants (the Ray session), sampled in a thread."""

    def __init__(self, every: float = 0.2):
        import psutil

        self.psutil, self.every = psutil, every
        self.last: dict[tuple[int, float], float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _sample(self) -> None:
        me = self.psutil.Process()
        for p in [me, *me.children(recursive=True)]:
            try:
                t = p.cpu_times()
                self.last[(p.pid, p.create_time())] = t.user + t.system
            except self.psutil.Error:
                pass

    def _loop(self) -> None:
        while not self._stop.wait(self.every):
            self._sample()

    def total(self) -> float:
        self._sample()
        return sum(self.last.values())

    def __enter__(self) -> "CpuSampler":
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()


def timed_build(corpus: Path, index: Path, fragment_docs: int) -> dict[str, float]:
    import embindex

    with CpuSampler() as cpu:
        before, t = cpu.total(), time.perf_counter()
        result = embindex.build(job_config(corpus, index, fragment_docs), log=None)
        wall = time.perf_counter() - t
        spent = cpu.total() - before
    shutil.rmtree(index, ignore_errors=True)
    return {"docs": result.counts["documents"], "wall_s": wall, "cpu_s": spent}


def end_to_end(corpus: Path, small: Path, workdir: Path, fragment_docs: int) -> dict[str, float]:
    """The big build and a one-fragment build (after an untimed one-fragment warm-up): the per-document
    cost is the difference over the difference in documents, so fixed costs (actor start, model load,
    tiers, publish) are not spread over the documents; they are reported apart."""
    timed_build(small, workdir / "warm-index", fragment_docs)
    one = timed_build(small, workdir / "small-index", fragment_docs)
    big = timed_build(corpus, workdir / "e2e-index", fragment_docs)
    docs = big["docs"] - one["docs"]
    return {"docs": big["docs"], "wall_s": big["wall_s"], "cpu_s": big["cpu_s"],
            "marginal_cpu_s_per_doc": (big["cpu_s"] - one["cpu_s"]) / docs,
            "marginal_wall_s_per_doc": (big["wall_s"] - one["wall_s"]) / docs,
            "fixed_cpu_s": one["cpu_s"] - one["docs"] * (big["cpu_s"] - one["cpu_s"]) / docs,
            "fixed_wall_s": one["wall_s"] - one["docs"] * (big["wall_s"] - one["wall_s"]) / docs}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, nargs="+", default=[30, 100, 500], help="tokens per document")
    ap.add_argument("--docs", type=int, default=12000, help="documents per corpus")
    ap.add_argument("--fragment-docs", type=int, default=2000, help="documents per file (= per fragment)")
    ap.add_argument("--repeat", type=int, default=2, help="passes of part 1; the best is kept")
    ap.add_argument("--e2e", action=argparse.BooleanOptionalAction, default=True, help="part 2 (Ray build)")
    ap.add_argument("--num-cpus", type=int, default=os.cpu_count(), help="Ray's CPUs for part 2")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args(argv)

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from embindex.config import load_config
    from embindex.pipeline import Job

    words = vocabulary()
    cfg = load_config(job_config(Path("."), Path("."), args.fragment_docs))
    tok = Job(cfg, log=lambda _m: None).family.load_tokenizer()

    def count_tokens(texts: list[str]) -> list[int]:
        return [len(ids) for ids in tok(texts, "document")]

    log(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cores, Python "
        f"{platform.python_version()}; load average {os.getloadavg()}")
    results: dict[str, Any] = {"args": vars(args), "runs": {}}
    with tempfile.TemporaryDirectory(prefix="embindex-overhead-") as tmp:
        ray_started = False
        for tokens in args.tokens:
            work = Path(tmp) / f"t{tokens}"
            n_words = words_per_doc(tokens, words, count_tokens)
            head = write_corpus(work / "corpus", args.docs, n_words, args.fragment_docs, words)
            write_corpus(work / "warm", args.fragment_docs, n_words, args.fragment_docs, words)
            stage = per_stage(work / "corpus", work, args.fragment_docs, args.repeat)
            docs = stage.pop("docs")
            mean_tokens = sum(count_tokens(head)) / len(head)
            run: dict[str, Any] = {"tokens_per_doc": round(mean_tokens, 1), "docs": docs,
                                   "core_ms_per_doc": {k: 1000 * v / docs for k, v in stage.items()}}
            outside = sum(v for k, v in stage.items() if k != "forward")
            run["core_ms_per_doc"]["stages outside the model"] = 1000 * outside / docs
            if args.e2e:
                if not ray_started:
                    import ray

                    ray.init(num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False,
                             configure_logging=False)
                    ray_started = True
                e2e = end_to_end(work / "corpus", work / "warm", work, args.fragment_docs)
                per_doc = e2e["marginal_cpu_s_per_doc"]
                run["e2e"] = {
                    "wall_s": round(e2e["wall_s"], 2), "cpu_s": round(e2e["cpu_s"], 2),
                    "fixed_cpu_s": round(e2e["fixed_cpu_s"], 2), "fixed_wall_s": round(e2e["fixed_wall_s"], 2),
                    "core_ms_per_doc": 1000 * per_doc,
                    "core_ms_per_doc_outside_model": 1000 * (per_doc - stage["forward"] / docs),
                    "docs_per_s": 1 / e2e["marginal_wall_s_per_doc"],
                    "docs_per_core_s": 1 / per_doc,
                }
            results["runs"][str(tokens)] = run
            shutil.rmtree(work, ignore_errors=True)

    print(f"\ncore-ms per document ({args.docs} documents per corpus, fragments of {args.fragment_docs})")
    cols = list(results["runs"])
    print("| stage | " + " | ".join(f"{results['runs'][c]['tokens_per_doc']:.0f} tokens" for c in cols) + " |")
    print("|---|" + "---:|" * len(cols))
    for name in (*STAGES, "stages outside the model", "forward"):
        print(f"| {name} | " + " | ".join(f"{results['runs'][c]['core_ms_per_doc'][name]:.4f}" for c in cols) + " |")
    if args.e2e:
        for key, label in (("fixed_cpu_s", "end to end, fixed core-s per build (not per document)"),
                           ("core_ms_per_doc", "end to end, all processes"),
                           ("core_ms_per_doc_outside_model", "end to end, outside the model"),
                           ("docs_per_core_s", "end to end, documents / core-s"),
                           ("docs_per_s", "end to end, documents / s (wall)")):
            print(f"| {label} | " + " | ".join(f"{results['runs'][c]['e2e'][key]:.4f}" if key.startswith("core")
                                              else f"{results['runs'][c]['e2e'][key]:.1f}" for c in cols) + " |")
    log(f"# load average after: {os.getloadavg()}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
