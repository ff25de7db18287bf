"""Throughput benchmark: bare forward loop vs `embindex.build` vs sentence-transformers.

Run from the repository root:

    .venv/bin/python benchmarks/throughput.py --docs 5000 --dtype bfloat16

On the same documents (the bundled sample corpus of Python-stdlib docstrings, repeated with
distinct ids up to --docs) and the same model (bundled all-MiniLM-L6-v2) it measures

  (a) bare:  `Embedder` in this process (tokenize + token-budget batches + forward + pool +
             L2 norm), torch threads = all cores, the pipeline's dtype and batch_tokens;
  (b) build: `embindex.build(...)` end to end into a temp dir (quickstart config), with Ray
             started explicitly beforehand so that its start-up is reported separately;
  (c) st:    `SentenceTransformer(path).encode(texts)` with its defaults (fp32, batch 32);

and prints docs/s, tokens/s (real tokens, no padding), the ratios b/a and b/c, the min cosine of
(a) and (b) against the fp32 reference (c), the retrieval quality of each (MRR@10 and nDCG@10 of the
bundled 32 sample queries and their qrels; (b) through `embindex search` on the index it built, its
default tier and rescoring; (a) and (c) exact search over their vectors; copies of a document count
as the document), and markdown rows for benchmarks/RESULTS.md.
Each variant runs --repeats times (interleaved a, b, c); medians are reported.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import statistics
import sys
import tempfile
import time
from importlib.resources import files
from pathlib import Path
from typing import Any

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")

import numpy as np  # noqa: E402
from machine_info import cpu_name  # noqa: E402

MODEL = "builtin:all-MiniLM-L6-v2"
QUICKSTART = Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml"


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------- corpus


def sample_corpus() -> list[dict[str, Any]]:
    """The bundled sample corpus (1,650 stdlib docstrings), as tests/conftest.py loads it."""
    path = files("embindex") / "data" / "sample_corpus.jsonl.gz"
    with gzip.open(str(path), "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def make_corpus(n: int) -> list[dict[str, Any]]:
    """n documents: the sample corpus repeated in order, copy k>0 with ids suffixed `~k`."""
    base = sample_corpus()
    out = []
    for i in range(n):
        k, row = divmod(i, len(base))
        doc = dict(base[row])
        if k:
            doc["id"] = f"{doc['id']}~{k}"
        out.append(doc)
    return out


def write_corpus(docs: list[dict[str, Any]], folder: Path, n_files: int) -> Path:
    """Write the documents as n_files JSONL files under folder/corpus/; returns that folder."""
    root = folder / "corpus"
    root.mkdir(parents=True, exist_ok=True)
    for f, part in enumerate(np.array_split(np.arange(len(docs)), n_files)):
        with open(root / f"part-{f:03d}.jsonl", "w", encoding="utf-8") as fh:
            for i in part:
                fh.write(json.dumps(docs[i], ensure_ascii=False) + "\n")
    return root


# ------------------------------------------------------------------------------------- variants


def sample_queries() -> tuple[list[str], list[str], dict[str, dict[str, int]]]:
    """(query ids, query texts, qrels) of the bundled sample queries."""
    from embindex.retrieve.trec import read_qrels

    with open(str(files("embindex") / "data" / "sample_queries.jsonl"), encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return [r["id"] for r in rows], [r["text"] for r in rows], read_qrels("builtin:sample-qrels")


def base_id(doc_id: str) -> str:
    """A copy's id (`id~k`) -> the document it copies."""
    return doc_id.split("~", 1)[0]


def quality(rankings: list[list[str]]) -> dict[str, float]:
    """MRR@10 and nDCG@10 of the sample queries from one ranking of document ids per query."""
    from embindex.retrieve.metrics import mean_metrics

    qids, _, qrels = sample_queries()
    runs = {q: [base_id(d) for d in r] for q, r in zip(qids, rankings)}
    return {k: round(v, 4) for k, v in mean_metrics(runs, qrels, ("MRR@10", "nDCG@10")).items()}


def exact_rankings(queries: np.ndarray, docs: np.ndarray, ids: list[str], depth: int) -> list[list[str]]:
    scores = queries @ docs.T
    top = np.argsort(-scores, axis=1, kind="stable")[:, :depth]
    return [[ids[j] for j in row] for row in top]


def run_bare(texts: list[str], dtype: str, batch_tokens: int) -> dict[str, Any]:
    """(a) Embedder in this process: tokenize + token-budget batches + forward + pool + normalize."""
    import torch

    from embindex.checkpoints import model_spec
    from embindex.config import ModelConfig
    from embindex.models import load_family
    from embindex.models.embedder import Embedder

    torch.set_num_threads(os.cpu_count() or 1)
    t0 = time.perf_counter()
    emb = Embedder(load_family(model_spec(ModelConfig(path=MODEL, dtype=dtype))), batch_tokens=batch_tokens)
    emb.encode(texts[:32])  # warm-up (first-call allocations), not timed
    load_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    ids = emb.tokenize(texts, "document")
    t2 = time.perf_counter()
    vecs = emb.embed_ids(ids)
    t3 = time.perf_counter()
    return {"seconds": t3 - t1, "tokenize_s": t2 - t1, "forward_s": t3 - t2, "load_s": load_s,
            "tokens": int(sum(len(x) for x in ids)), "vectors": vecs, "threads": torch.get_num_threads(),
            "queries": emb.encode(sample_queries()[1], role="query")}


def run_st(texts: list[str]) -> dict[str, Any]:
    """(c) sentence-transformers defaults: fp32, batch_size 32, its own length sorting."""
    import torch
    from sentence_transformers import SentenceTransformer

    from embindex.checkpoints import resolve_model_path

    torch.set_num_threads(os.cpu_count() or 1)
    t0 = time.perf_counter()
    model = SentenceTransformer(resolve_model_path(MODEL), device="cpu")
    model.encode(texts[:32])
    load_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    vecs = model.encode(texts)
    seconds = time.perf_counter() - t1
    queries = model.encode(sample_queries()[1], normalize_embeddings=True)
    return {"seconds": seconds, "load_s": load_s, "vectors": np.asarray(vecs, np.float32),
            "queries": np.asarray(queries, np.float32)}


def ray_start(num_cpus: int | None, worker_niceness: int | None = None) -> float:
    """Start a local Ray the way `embindex.build` would (num_cpus = cores + 1 unless given).

    Ray starts its workers (the embed actor included) at nice 15; worker_niceness=0 puts them on
    an equal footing with other processes (the driver, or other jobs on a shared machine)."""
    import ray
    import ray.data

    if worker_niceness is not None:
        os.environ["RAY_worker_niceness"] = str(worker_niceness)
    t0 = time.perf_counter()
    ray.init(num_cpus=num_cpus or (os.cpu_count() or 2) + 1, include_dashboard=False,
             log_to_driver=False, configure_logging=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    return time.perf_counter() - t0


def run_build(corpus: Path, workdir: Path, dtype: str, overrides: dict[str, Any], tag: str) -> dict[str, Any]:
    """(b) `embindex.build` with the quickstart config into a fresh index folder (Ray already up)."""
    import pyarrow.parquet as pq
    import yaml

    import embindex

    cfg = yaml.safe_load(QUICKSTART.read_text())
    cfg["source"].update({"uri": str(corpus), "format": "jsonl"})
    cfg["model"].update({"path": MODEL, "dtype": dtype})
    cfg["index"]["uri"] = str(workdir / f"index-{tag}")
    cfg.setdefault("run", {})["progress"] = False
    t0 = time.perf_counter()
    res = embindex.build(cfg, overrides, log=None)
    seconds = time.perf_counter() - t0
    reader = embindex.open_index(res.index_uri)
    hits = reader.search(sample_queries()[1], k=30)  # default tier, the config's rescoring
    ids, vecs = [], []
    for shard in res.manifest.shards:
        t = pq.read_table(os.path.join(res.index_uri, shard.path), columns=["id", "vector"])
        ids += t.column("id").to_pylist()
        col = t.column("vector").combine_chunks()
        vecs.append(col.flatten().to_numpy(zero_copy_only=False).reshape(len(t), -1).astype(np.float32))
    return {"seconds": seconds, "timings": dict(res.timings), "counts": dict(res.counts),
            "quality": quality([[h.id for h in row] for row in hits]), "search_tier": reader.default_tier,
            "ids": ids, "vectors": np.concatenate(vecs) if vecs else np.zeros((0, 0), np.float32)}


# -------------------------------------------------------------------------------------- report


def min_cosine(x: np.ndarray, ref: np.ndarray) -> float:
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    ref = ref / np.maximum(np.linalg.norm(ref, axis=1, keepdims=True), 1e-12)
    return float(np.min(np.sum(x * ref, axis=1)))




def med(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--docs", type=int, default=5000, help="documents (sample corpus repeated with distinct ids)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="bfloat16")
    p.add_argument("--repeats", type=int, default=1, help="runs of each variant; medians are reported")
    p.add_argument("--only", default="a,b,c", help="variants to run, e.g. 'a,b'")
    p.add_argument("--files", type=int, default=4, help="JSONL files the corpus is split into for (b)")
    p.add_argument("--batch-tokens", type=int, default=None, help="default: the quickstart config's")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="config override for (b), e.g. resources.torch_threads=2 (repeatable)")
    p.add_argument("--worker-niceness", type=int, default=None,
                   help="RAY_worker_niceness for the local Ray of (b); Ray's default is 15")
    p.add_argument("--markdown", type=Path, help="also write the markdown rows to this file")
    p.add_argument("--json", type=Path, help="write all measurements as JSON to this file")
    args = p.parse_args(argv)

    import yaml

    from embindex.config import parse_override

    only = {v.strip() for v in args.only.split(",")}
    overrides = dict(parse_override(s) for s in args.set)
    quick = yaml.safe_load(QUICKSTART.read_text())
    batch_tokens = args.batch_tokens or int(overrides.get("resources.batch_tokens")
                                            or quick["resources"]["batch_tokens"])
    overrides.setdefault("resources.batch_tokens", batch_tokens)
    docs = make_corpus(args.docs)
    texts = [d["text"] for d in docs]
    runs: dict[str, list[dict[str, Any]]] = {"a": [], "b": [], "c": []}
    ray_init_s = None

    with tempfile.TemporaryDirectory(prefix="embindex-bench-") as tmp:
        work = Path(tmp)
        corpus = write_corpus(docs, work, args.files)
        try:
            for r in range(args.repeats):
                if "a" in only:
                    runs["a"].append(run_bare(texts, args.dtype, batch_tokens))
                    log(f"[bench] a#{r}: {runs['a'][-1]['seconds']:.1f}s")
                if "b" in only:
                    if ray_init_s is None:
                        ray_init_s = ray_start(overrides.get("resources.num_cpus"), args.worker_niceness)
                    runs["b"].append(run_build(corpus, work, args.dtype, overrides, f"r{r}"))
                    log(f"[bench] b#{r}: {runs['b'][-1]['seconds']:.1f}s {runs['b'][-1]['timings']}")
                if "c" in only:
                    runs["c"].append(run_st(texts))
                    log(f"[bench] c#{r}: {runs['c'][-1]['seconds']:.1f}s")
        finally:
            if ray_init_s is not None:
                import ray

                ray.shutdown()

    n = len(texts)
    tokens = runs["a"][0]["tokens"] if runs["a"] else None
    if tokens is None:
        from embindex.checkpoints import model_spec
        from embindex.config import ModelConfig
        from embindex.models import load_family

        tok = load_family(model_spec(ModelConfig(path=MODEL))).load_tokenizer()
        tokens = int(sum(len(x) for x in tok(texts, "document")))

    a_s = med([x["seconds"] for x in runs["a"]])
    b_s = med([x["seconds"] for x in runs["b"]])
    c_s = med([x["seconds"] for x in runs["c"]])
    b_incl = b_s + (ray_init_s or 0.0)
    b_pipe = med([x["timings"]["read_s"] + x["timings"]["pipeline_s"] for x in runs["b"]])
    startup_s = med([x["timings"]["first_batch_s"] for x in runs["b"] if "first_batch_s" in x["timings"]])
    ref = runs["c"][0]["vectors"] if runs["c"] else None
    cos_a = min_cosine(runs["a"][0]["vectors"], ref) if runs["a"] and ref is not None else None
    cos_b = cos_ba = None
    if runs["b"]:
        pos = {d["id"]: i for i, d in enumerate(docs)}
        order = np.array([pos[i] for i in runs["b"][0]["ids"]])
        if len(order) != n:
            log(f"[bench] WARNING: build indexed {len(order)} of {n} documents")
        vb = runs["b"][0]["vectors"]
        cos_b = min_cosine(vb, ref[order]) if ref is not None else None
        cos_ba = min_cosine(vb, runs["a"][0]["vectors"][order]) if runs["a"] else None

    def rate(sec: float) -> str:
        return f"{n / sec:,.1f} docs/s, {tokens / sec:,.0f} tok/s" if sec == sec else "-"

    machine = f"{os.cpu_count()} cores, {cpu_name()}"
    print(f"\n{n} docs, {tokens:,} real tokens ({tokens / n:.1f}/doc), dtype {args.dtype}, "
          f"batch_tokens {batch_tokens}, repeats {args.repeats}; {machine}")
    print(f"(b) overrides {overrides}; Ray worker niceness "
          f"{args.worker_niceness if args.worker_niceness is not None else '15 (Ray default)'}")
    if runs["a"]:
        print(f"(a) bare Embedder   {a_s:7.1f}s  {rate(a_s)}  (tokenize {med([x['tokenize_s'] for x in runs['a']]):.1f}s, "
              f"load {runs['a'][0]['load_s']:.1f}s, threads {runs['a'][0]['threads']})")
    if runs["b"]:
        print(f"(b) embindex.build  {b_s:7.1f}s  {rate(b_s)}  (excluding Ray start-up)")
        print(f"    incl. ray.init  {b_incl:7.1f}s  {rate(b_incl)}  (ray.init {ray_init_s:.1f}s)")
        print(f"    read+pipeline   {b_pipe:7.1f}s  {rate(b_pipe)}  (no tiers)")
        for i, x in enumerate(runs["b"]):
            pair = f", b/a of this pair {runs['a'][i]['seconds'] / x['seconds']:.3f}" if i < len(runs["a"]) else ""
            print(f"    run {i} timings {x['timings']}{pair}")
        if startup_s == startup_s:
            print(f"    start-up        {startup_s:7.1f}s  (build start -> first embed batch) = "
                  f"{100 * startup_s / b_s:.1f}% of (b); with ray.init {100 * (startup_s + ray_init_s) / b_incl:.1f}% "
                  f"(the b/a target asks for a corpus where start-up is < 5%)")
    if runs["c"]:
        print(f"(c) sentence-transformers {c_s:7.1f}s  {rate(c_s)}  (fp32, batch 32)")
    if runs["a"] and runs["b"]:
        print(f"b/a = {a_s / b_s:.3f} (excl. Ray start-up), {a_s / b_incl:.3f} (incl.), "
              f"{a_s / b_pipe:.3f} (read+pipeline only)")
    if runs["b"] and runs["c"]:
        print(f"b/c = {c_s / b_s:.3f} (excl. Ray start-up), {c_s / b_incl:.3f} (incl.)")
    if cos_a is not None:
        print(f"min cosine vs fp32 sentence-transformers: a {cos_a:.6f}" + (f", b {cos_b:.6f}" if cos_b else ""))
    if cos_ba is not None:
        print(f"min cosine b vs a (b stored as float16): {cos_ba:.6f}")
    ids = [d["id"] for d in docs]
    qual = {}
    if runs["a"]:
        qual["a"] = quality(exact_rankings(runs["a"][0]["queries"], runs["a"][0]["vectors"], ids, 30))
    if runs["b"]:
        qual["b"] = runs["b"][0]["quality"]
    if runs["c"]:
        qual["c"] = quality(exact_rankings(runs["c"][0]["queries"], runs["c"][0]["vectors"], ids, 30))
    for k, v in qual.items():
        where = (f"embindex search, default tier {runs['b'][0]['search_tier']}" if k == "b" else "exact search")
        print(f"retrieval quality ({k}, {where}): MRR@10 {v['MRR@10']:.4f}, nDCG@10 {v['nDCG@10']:.4f} "
              f"(32 sample queries)")

    # Markdown rows for benchmarks/RESULTS.md
    rows = []
    cos = lambda v: f"{v:.5f}" if v is not None else "-"  # noqa: E731
    if runs["a"]:
        rows.append(f"| (a) bare `Embedder` | {args.dtype} | {n} | {a_s:.1f} | {n / a_s:.1f} | {tokens / a_s:,.0f} | 1.00 | {cos(cos_a)} |")
    if runs["b"]:
        ra = f"{a_s / b_s:.2f}" if runs["a"] else "-"
        rai = f"{a_s / b_incl:.2f}" if runs["a"] else "-"
        rows.append(f"| (b) `embindex.build`, excl. `ray.init` | {args.dtype} | {n} | {b_s:.1f} | {n / b_s:.1f} | {tokens / b_s:,.0f} | {ra} | {cos(cos_b)} |")
        rows.append(f"| (b) `embindex.build`, incl. `ray.init` ({ray_init_s:.1f}s) | {args.dtype} | {n} | {b_incl:.1f} | {n / b_incl:.1f} | {tokens / b_incl:,.0f} | {rai} | {cos(cos_b)} |")
    if runs["c"]:
        rc = f"{a_s / c_s:.2f}" if runs["a"] else "-"
        rows.append(f"| (c) sentence-transformers `encode` | float32 | {n} | {c_s:.1f} | {n / c_s:.1f} | {tokens / c_s:,.0f} | {rc} | 1.00000 |")
    header = ("| variant | dtype | docs | seconds (median) | docs/s | tokens/s | vs (a) | min cosine vs fp32 ST |\n"
              "|---|---|---|---|---|---|---|---|")
    ratios = []
    if runs["a"] and runs["b"]:
        ratios.append(f"b/a = {a_s / b_s:.2f} excl. Ray start-up, {a_s / b_incl:.2f} incl.; "
                      f"start-up {100 * startup_s / b_s:.1f}% of (b)")
    if runs["b"] and runs["c"]:
        ratios.append(f"b/c = {c_s / b_s:.2f} excl. Ray start-up, {c_s / b_incl:.2f} incl.")
    if qual:
        ratios.append("MRR@10 " + ", ".join(f"{k} {v['MRR@10']:.4f}" for k, v in qual.items()))
    md = header + "\n" + "\n".join(rows) + ("\n\n" + "; ".join(ratios) + "\n" if ratios else "\n")
    print("\n" + md)
    if args.markdown:
        args.markdown.write_text(md)
    if args.json:
        strip = lambda x: {k: v for k, v in x.items() if k not in ("vectors", "ids", "queries")}  # noqa: E731
        args.json.write_text(json.dumps({
            "docs": n, "tokens": tokens, "dtype": args.dtype, "batch_tokens": batch_tokens, "machine": machine,
            "overrides": overrides, "worker_niceness": args.worker_niceness, "ray_init_s": ray_init_s, "min_cosine": {"a": cos_a, "b": cos_b, "b_vs_a": cos_ba},
            "runs": {k: [strip(x) for x in v] for k, v in runs.items()}, "quality": qual,
        }, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
