"""Retrieval-quality benchmark: no chunking vs naive chunking vs late chunking on long documents.

Run from the repository root (CPU is fine; about 5-10 minutes on 2 shared cores):

    RAY_AUTH_MODE=disabled HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false \
        .venv/bin/python benchmarks/late_chunking.py

Corpus. The Python language-reference / library "topics" that ship with every CPython
(`pydoc_data.topics.topics`, the text `help("if")` prints). It is real technical prose written by
the CPython documentation authors (not by anyone working on this repository), it is present on every
machine that has Python (a fresh Debian + Python image has no man pages or /usr/share/doc texts:
Debian's slim images exclude them via dpkg path-exclude), and its sections are long: 79 topics in
Python 3.11, from 66 to ~17,500 MiniLM tokens. We keep the topics of at least --min-tokens tokens
(default 400, i.e. every kept document is longer than MiniLM's 256-token window): 38 documents,
~119k tokens on 3.11. The corpus depends on the interpreter version; the script prints its size.

Task (known item, inverse-cloze style). From each document we draw up to --queries-per-doc (8) prose
sentences, at most a third of its eligible ones (random.Random seeded with --seed and the document
id; 10-50 words; ending in . ! or ?; from an unindented paragraph, i.e. not a code or grammar block;
mostly letters). A sentence is only
eligible if its (whitespace-collapsed) text occurs in no other kept document: the pydoc topics overlap
(e.g. "compound" contains the "try"/"with"/"for" sections), and a sentence shared by two documents has
no single right answer. The query is the sentence itself; its only relevant document is the one it
came from. Topics contained in a longer one (e.g. "try" in "compound") get no queries but stay in the
index as (hard) distractors. Two variants:

  heldout  (default, primary) the query sentences are removed from the stored text, as in the Inverse
           Cloze Task (Lee et al., 2019): the index never contains the query verbatim, so the document
           must be found from the surrounding context, which is what chunk vectors should capture;
  verbatim the stored text is the original topic, so the query is an exact substring of its document
           (the classic known-item setup; near-duplicate matching, easier for small naive chunks).
           Not run by default (--variants heldout,verbatim) so that a run stays under ~10 minutes.

Systems (default model: bundled all-MiniLM-L6-v2, fp32, max_length 256 = its window):
  none   one vector per document, the document TRUNCATED to the model's 256 tokens;
  naive  outputs.chunking: each chunk embedded on its own;
  late   outputs.late_chunking: the whole document through the model in macro windows of 256 tokens
         overlapping by 64 (long late chunking: every document here is longer than the window), each
         chunk mean-pooled from token states that saw up to a whole window of context;
with the same chunker for naive and late, two settings: 3 sentences per chunk, and 128-token windows.
Search: `embindex.open_index(uri).search(queries, k=10)` (documents scored by their best chunk), on a
single exact "Flat" tier (tiers: [full]) so ANN error plays no part. As a check the script also
ranks documents exhaustively (max over all chunk vectors) and reports how many queries differ.

Metrics: MRR@10, nDCG@10 (one relevant document: 1/log2(rank+1)), Recall@1, Recall@10, and MRR@10 on
the subset of queries whose sentence starts beyond the first 256 tokens of the stored document (out of
reach of the truncated single vector). Throughput: documents / BuildResult.timings["pipeline_s"]
(read+tokenize+embed+write, without Ray start-up and tier building) and documents / total_s. The machine
is shared and tiny (2 cores): timings are noisy, compare them only within one run.

Multi-vector storage: one build with the tiny random jina-colbert-v2 fixture (tests/fixtures/
jina-colbert-v2-tiny, 32-d) and outputs.multivector; its retrieval quality is meaningless (random
weights), so only storage is reported: manifest outputs.multivector tokens and bytes_per_token, bytes per
document, and the on-disk Parquet bytes per document.

Writes: a markdown table on stdout and, unless --no-results, a section appended to
benchmarks/RESULTS.md (re-read right before appending; created if missing).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import re
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")

import numpy as np

REPO = Path(__file__).resolve().parent.parent
MINILM = "builtin:all-MiniLM-L6-v2"
COLBERT_FIXTURE = REPO / "tests" / "fixtures" / "jina-colbert-v2-tiny"
K = 10

# --------------------------------------------------------------------------------------------------
# corpus and queries


@dataclass
class Doc:
    id: str
    text: str  # original topic text
    n_tokens: int
    candidates: list[tuple[int, int]] = field(default_factory=list)  # char spans of eligible sentences
    picked: list[tuple[int, int]] = field(default_factory=list)


@dataclass
class Query:
    text: str
    doc_id: str
    token_pos: int = 0  # token index of the sentence start in the stored document text


_PARA = re.compile(r"\n[ \t]*\n")
_SENT = re.compile(r"(?<=[.!?])[\"')\]]?\s+(?=[A-Z\"'(*])")
_UNDERLINE = re.compile(r"^[*=\-~^\"]{3,}\s*$")
_WS = re.compile(r"\s+")


def collapse(s: str) -> str:
    return _WS.sub(" ", s).strip()


def paragraphs(text: str) -> list[tuple[int, int]]:
    spans, start = [], 0
    for m in _PARA.finditer(text):
        spans.append((start, m.start()))
        start = m.end()
    spans.append((start, len(text)))
    return [(s, e) for s, e in spans if text[s:e].strip()]


def prose_sentences(text: str) -> list[tuple[int, int]]:
    """Char spans of sentences that make sensible queries (prose, 10-50 words, mostly letters)."""
    out = []
    for ps, pe in paragraphs(text):
        para = text[ps:pe]
        lines = para.split("\n")
        if para[:1].isspace() or any(_UNDERLINE.match(ln) for ln in lines) or len(lines) < 1:
            continue  # code / grammar blocks are indented; headings are underlined
        start = 0
        for m in list(_SENT.finditer(para)) + [None]:
            end = m.start() if m else len(para)
            sent = para[start:end].strip()
            s0 = ps + start + (len(para[start:end]) - len(para[start:end].lstrip()))
            if m:
                start = m.end()
            words = sent.split()
            if not (10 <= len(words) <= 50) or sent[-1:] not in ".!?":
                continue
            visible = [c for c in sent if not c.isspace()]
            if sum(c.isalpha() for c in visible) < 0.75 * len(visible):
                continue
            out.append((s0, s0 + len(sent)))
    return out


def load_corpus(min_tokens: int, max_docs: int | None, tokenizer) -> list[Doc]:
    from pydoc_data.topics import topics

    docs = []
    for key in sorted(topics):
        text = topics[key].strip()
        n = len(tokenizer(text, add_special_tokens=False)["input_ids"])
        if n >= min_tokens:
            docs.append(Doc(id=key, text=text, n_tokens=n))
    if max_docs is not None and len(docs) > max_docs:
        docs = sorted(sorted(docs, key=lambda d: -d.n_tokens)[:max_docs], key=lambda d: d.id)
    return docs


def pick_queries(docs: list[Doc], per_doc: int, seed: int) -> None:
    collapsed = {d.id: collapse(d.text) for d in docs}
    for d in docs:
        seen = set()
        for s, e in prose_sentences(d.text):
            q = collapse(d.text[s:e])
            if q in seen or any(q in collapsed[o] for o in collapsed if o != d.id):
                continue  # not unique to this document: no single right answer
            seen.add(q)
            d.candidates.append((s, e))
        rng = random.Random(f"{seed}:{d.id}")
        n = min(per_doc, math.ceil(len(d.candidates) / 3))  # at most a third of a document's eligible sentences
        d.picked = sorted(rng.sample(d.candidates, n))


def stored_text(d: Doc, heldout: bool) -> tuple[str, list[int]]:
    """The text to index and, per picked sentence, the char position where it is (or was) in it."""
    if not heldout:
        return d.text, [s for s, _ in d.picked]
    parts, pos, cursor = [], [], 0
    for s, e in d.picked:
        parts.append(d.text[cursor:s])
        pos.append(sum(len(p) for p in parts))
        cursor = e
    parts.append(d.text[cursor:])
    return "".join(parts), pos


def make_task(docs: list[Doc], heldout: bool, tokenizer) -> tuple[list[dict], list[Query]]:
    rows, queries = [], []
    for d in docs:
        text, positions = stored_text(d, heldout)
        rows.append({"id": d.id, "text": text})
        offsets = tokenizer(text, add_special_tokens=True, return_offsets_mapping=True)["offset_mapping"]
        starts = [s if (s, e) != (0, 0) else -1 for s, e in offsets]
        for (s, e), p in zip(d.picked, positions):
            tok_pos = next((i for i, st in enumerate(starts) if st >= p), len(starts))
            queries.append(Query(collapse(d.text[s:e]), d.id, tok_pos))
    return rows, queries


# --------------------------------------------------------------------------------------------------
# builds and evaluation


def minilm_config(corpus: str, index_uri: str, outputs: dict) -> dict:
    return {
        "source": {"uri": corpus, "format": "jsonl"},
        "model": {"name": "hf-encoder", "path": MINILM, "dtype": "float32"},
        "outputs": outputs,
        "index": {"uri": index_uri, "tiers": ["full"], "factory": "Flat", "quality_sample": 0},
        "resources": {"actors": 1, "cpus_per_actor": 2, "torch_threads": 2, "batch_tokens": 16384},
        "run": {"progress": False},
    }


def ranks_from_search(reader, queries: list[Query]) -> list[int | None]:
    hits = reader.search([q.text for q in queries], k=K)
    out = []
    for q, hs in zip(queries, hits):
        ids = [h.id for h in hs]
        out.append(ids.index(q.doc_id) + 1 if q.doc_id in ids else None)
    return out


def exact_ranks(reader, queries: list[Query]) -> list[tuple[int, int]]:
    """Exhaustive document ranks: score of a document = max over its rows (chunks). Returned as the
    range (best, worst) the rank can take when other documents tie with the target's score exactly
    (identical chunks: some topics are contained in others, e.g. "naming" in "execmodel")."""
    qv = reader.encode_queries([q.text for q in queries])
    sims = qv @ reader.vectors.T
    ids = np.asarray(reader.ids)
    uniq, inv = np.unique(ids, return_inverse=True)
    doc_scores = np.full((len(queries), len(uniq)), -np.inf, dtype=np.float32)
    for j in range(sims.shape[1]):
        np.maximum(doc_scores[:, inv[j]], sims[:, j], out=doc_scores[:, inv[j]])
    pos = {d: i for i, d in enumerate(uniq)}
    out = []
    for r, q in enumerate(queries):
        t = doc_scores[r, pos[q.doc_id]]
        above = int(np.sum(doc_scores[r] > t))
        out.append((1 + above, above + int(np.sum(doc_scores[r] == t))))
    return out


def metrics(ranks: list[int | None]) -> dict[str, float]:
    def rr(r):
        return 1.0 / r if r is not None and r <= K else 0.0

    def dcg(r):
        return 1.0 / math.log2(r + 1) if r is not None and r <= K else 0.0

    n = max(len(ranks), 1)
    return {
        "mrr": sum(rr(r) for r in ranks) / n,
        "ndcg": sum(dcg(r) for r in ranks) / n,
        "r1": sum(1 for r in ranks if r == 1) / n,
        "r10": sum(1 for r in ranks if r is not None and r <= K) / n,
    }


def run_system(name: str, outputs: dict, corpus: str, workdir: Path, queries: list[Query],
               window: int) -> dict:
    import embindex

    uri = str(workdir / f"idx-{name}")
    t0 = time.perf_counter()
    res = embindex.build(minilm_config(corpus, uri, outputs), log=None)
    build_wall = time.perf_counter() - t0
    reader = embindex.open_index(uri)
    ranks = ranks_from_search(reader, queries)
    exact = exact_ranks(reader, queries)
    mismatch = sum(1 for r, (lo, hi) in zip(ranks, exact)
                   if not (min(lo, K + 1) <= (r if r is not None else K + 1) <= min(hi, K + 1)))
    far = [r for r, q in zip(ranks, queries) if q.token_pos >= window]
    m = metrics(ranks)
    docs = res.counts["documents"]
    return {
        "name": name, **m, "mrr_far": metrics(far)["mrr"] if far else float("nan"), "n_far": len(far),
        "docs": docs, "rows": res.counts["chunks"], "pipeline_s": res.timings["pipeline_s"],
        "total_s": res.timings["total_s"], "build_wall_s": build_wall,
        "docs_per_s": docs / max(res.timings["pipeline_s"], 1e-9),
        "docs_per_s_total": docs / max(res.timings["total_s"], 1e-9),
        "exact_mismatch": mismatch, "exact": metrics([lo if lo <= K else None for lo, _ in exact]),
        "late": res.manifest.outputs.get("late_chunking"),
    }


def run_multivector(corpus: str, workdir: Path, max_length: int | None) -> dict:
    import embindex

    uri = str(workdir / "idx-multivector")
    model = {"name": "jina-colbert-v2", "path": str(COLBERT_FIXTURE), "dtype": "float32"}
    if max_length:
        model["max_length"] = max_length
    cfg = minilm_config(corpus, uri, {"multivector": {"candidates": "tokens"}})
    cfg["model"] = model
    res = embindex.build(cfg, log=None)
    mv = res.manifest.outputs["multivector"]
    docs = res.counts["documents"]
    shard_bytes = sum(s.bytes for s in res.manifest.shards)
    return {
        "docs": docs, "dim": mv["dim"], "codec": mv["codec"], "tokens": mv["tokens"],
        "bytes_per_token": mv["bytes_per_token"], "tokens_per_doc": mv["tokens"] / docs,
        "bytes_per_doc": mv["tokens"] * mv["bytes_per_token"] / docs, "parquet_bytes_per_doc": shard_bytes / docs,
        "token_index_vectors": (mv.get("token_index") or {}).get("vectors"),
        "max_length": res.manifest.model.max_length, "pipeline_s": res.timings["pipeline_s"],
        "docs_per_s": docs / max(res.timings["pipeline_s"], 1e-9),
    }


# --------------------------------------------------------------------------------------------------
# report


def table(results: list[dict], window: int) -> str:
    head = ("| variant | system | chunker | rows (chunks) | MRR@10 | nDCG@10 | R@1 | R@10 "
            f"| MRR@10, query beyond token {window} (n) | docs/s (embed+write) | docs/s (total) |")
    lines = [head, "|" + "|".join(["---"] * 11) + "|"]
    for r in results:
        lines.append(
            f"| {r['variant']} | {r['system']} | {r['chunker']} | {r['rows']} | {r['mrr']:.3f} | {r['ndcg']:.3f} "
            f"| {r['r1']:.3f} | {r['r10']:.3f} | {r['mrr_far']:.3f} ({r['n_far']}) | {r['docs_per_s']:.2f} "
            f"| {r['docs_per_s_total']:.2f} |")
    return "\n".join(lines)


def append_results(path: Path, section: str) -> None:
    # Another benchmark may append to the same file: read it right before writing, append only ours.
    existing = path.read_text() if path.exists() else None
    with open(path, "a", encoding="utf-8") as f:
        if existing is None:
            f.write("# Benchmark results\n")
        elif not existing.endswith("\n"):
            f.write("\n")
        f.write("\n" + section)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--min-tokens", type=int, default=400, help="keep pydoc topics of at least this many tokens")
    ap.add_argument("--max-docs", type=int, default=None, help="keep at most this many (the longest)")
    ap.add_argument("--queries-per-doc", type=int, default=8,
                    help="at most this many, and at most a third of the document's eligible sentences")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--variants", default="heldout", help="comma list of heldout, verbatim")
    ap.add_argument("--settings", default="sentences:3,tokens:128",
                    help="chunker settings, comma list of sentences:N / tokens:N")
    ap.add_argument("--window-overlap", type=int, default=None, help="late chunking macro-window overlap "
                    "(default: the library default, min(256, window // 4))")
    ap.add_argument("--mv-max-length", type=int, default=None, help="model.max_length of the colbert build")
    ap.add_argument("--no-multivector", action="store_true")
    ap.add_argument("--workdir", default=None, help="default: a temporary directory, removed at the end")
    ap.add_argument("--results", default=str(REPO / "benchmarks" / "RESULTS.md"))
    ap.add_argument("--no-results", action="store_true", help="print only, do not append to RESULTS.md")
    args = ap.parse_args(argv)

    import ray
    import ray.data
    from transformers import AutoTokenizer

    from embindex.checkpoints import resolve_model_path

    t_start = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(resolve_model_path(MINILM))
    tok.model_max_length = 10**9  # counting only
    window = 256  # all-MiniLM-L6-v2 sentence_bert_config max_seq_length (the library's default max_length)
    docs = load_corpus(args.min_tokens, args.max_docs, tok)
    pick_queries(docs, args.queries_per_doc, args.seed)
    n_tok = [d.n_tokens for d in docs]
    print(f"corpus: {len(docs)} pydoc_data topics (Python {platform.python_version()}) with >= {args.min_tokens} "
          f"tokens; tokens/doc min {min(n_tok)} median {int(np.median(n_tok))} max {max(n_tok)}, total {sum(n_tok)}; "
          f"{sum(len(d.picked) for d in docs)} queries from {sum(1 for d in docs if d.picked)} documents "
          f"({sum(len(d.candidates) for d in docs)} eligible sentences)", flush=True)

    settings = []
    for item in args.settings.split(","):
        kind, n = item.split(":")
        settings.append({"chunker": "sentences", "n_sentences": int(n)} if kind == "sentences"
                        else {"chunker": "tokens", "chunk_size": int(n)})

    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="embindex-latebench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    results: list[dict] = []
    mv = None
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))  # so `finally` stops Ray
    try:
        ray.init(num_cpus=3, include_dashboard=False, log_to_driver=False, configure_logging=False)
        ray.data.DataContext.get_current().enable_progress_bars = False
        for variant in args.variants.split(","):
            rows, queries = make_task(docs, variant == "heldout", tok)
            corpus = workdir / f"corpus-{variant}.jsonl"
            corpus.write_text("".join(json.dumps(r) + "\n" for r in rows))
            systems = [("none", "-", {"single": True})]
            for s in settings:
                label = f"sentences n={s['n_sentences']}" if s["chunker"] == "sentences" else f"tokens {s['chunk_size']}"
                late = dict(s)
                if args.window_overlap is not None:
                    late["window_overlap"] = args.window_overlap
                systems += [("naive", label, {"chunking": s}), ("late", label, {"late_chunking": late})]
            for system, label, outputs in systems:
                name = f"{variant}-{system}-{label.replace(' ', '').replace('=', '')}"
                r = run_system(name, outputs, str(corpus), workdir, queries, window)
                r.update(variant=variant, system=system, chunker=label)
                results.append(r)
                print(f"  {name}: MRR@10 {r['mrr']:.3f} nDCG@10 {r['ndcg']:.3f} rows {r['rows']} "
                      f"embed+write {r['pipeline_s']:.1f}s total {r['total_s']:.1f}s "
                      f"(exhaustive-rank mismatches: {r['exact_mismatch']})", flush=True)
        if not args.no_multivector:
            mv = run_multivector(str(workdir / f"corpus-{args.variants.split(',')[0]}.jsonl"), workdir,
                                 args.mv_max_length)
    finally:
        ray.shutdown()
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    elapsed = time.perf_counter() - t_start

    late_cfg = next((r["late"] for r in results if r["late"]), None)
    md = [table(results, window)]
    n_q = len(queries)
    md.append(f"Corpus: {len(docs)} `pydoc_data.topics` documents (Python {platform.python_version()}, topics "
              f">= {args.min_tokens} MiniLM tokens; {min(n_tok)}-{max(n_tok)} tokens, median "
              f"{int(np.median(n_tok))}, {sum(n_tok)} in all), {n_q} queries (<= {args.queries_per_doc} sentences "
              f"per document unique to it, seed {args.seed}). Model: bundled all-MiniLM-L6-v2, fp32, window "
              f"{window}; `none` truncates each document to {window} tokens.")
    if late_cfg:
        md.append(f"Late chunking: long late chunking, macro window {late_cfg['window']} tokens, overlap "
                  f"{late_cfg['window_overlap']}. Search: `open_index(uri).search(q, k=10)` on one exact Flat tier; "
                  f"queries whose rank differs from an exhaustive max-over-chunks ranking (exact ties aside): "
                  f"{sum(r['exact_mismatch'] for r in results)} in all runs.")
    if mv:
        md.append(f"Multi-vector storage (tiny random jina-colbert-v2 fixture, quality meaningless, {mv['dim']}-d "
                  f"{mv['codec']}, max_length {mv['max_length']}): {mv['tokens']} stored tokens for {mv['docs']} "
                  f"documents = {mv['tokens_per_doc']:.0f} tokens/doc x {mv['bytes_per_token']} B/token = "
                  f"{mv['bytes_per_doc'] / 1024:.1f} KiB/doc of token vectors; Parquet shard bytes "
                  f"{mv['parquet_bytes_per_doc'] / 1024:.1f} KiB/doc; token index "
                  f"{mv['token_index_vectors']} vectors. At the real model's 128-d float16 that is "
                  f"{mv['tokens_per_doc'] * 256 / 1024:.1f} KiB/doc (256 B/token; the fixture tokenizer's "
                  f"token count, an estimate).")
    md.append(f"Run time {elapsed / 60:.1f} min on {os.cpu_count()} CPU cores shared with other jobs "
              f"(throughput numbers are noisy; compare within this run only).")
    text = "\n\n".join(md)
    print()
    print(text)

    if not args.no_results:
        cmd = ("RAY_AUTH_MODE=disabled HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false .venv/bin/python "
               "benchmarks/late_chunking.py" + ("" if argv is None and len(sys.argv) == 1 else
                                                 " " + " ".join(sys.argv[1:] if argv is None else argv)))
        stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        section = (f"## Late chunking vs naive chunking vs no chunking (known-item retrieval, {stamp})\n\n"
                   f"Command (repository root):\n\n    {cmd}\n\n"
                   "Task: each query is a prose sentence drawn from one long pydoc topic (unique to it); the "
                   "relevant answer is that document. `heldout`: the query sentences are removed from the "
                   "indexed text (inverse-cloze); `verbatim`: they are left in. Details in the script's "
                   "docstring.\n\n" + text + "\n")
        append_results(Path(args.results), section)
        print(f"\nappended to {args.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
