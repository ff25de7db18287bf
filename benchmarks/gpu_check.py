"""One-shot GPU check: what only a CUDA device can show, in one run of a few minutes, as one report.

Run from the repository root on a machine with one CUDA GPU (no network needed):

    bash benchmarks/gpu_check.sh ARTIFACT_DIR                      # the wrapper (nvidia-smi, global timeout)
    .venv/bin/python benchmarks/gpu_check.py --out ARTIFACT_DIR    # the same, without the wrapper
    .venv/bin/python benchmarks/gpu_check.py --out /tmp/dry --device cpu --quick   # dry run, no GPU

Sections (each timed; its result or its error is recorded; a failing section never stops the others):

1. goldens     the tiny fixtures of tests/fixtures/ on the device in float32 and bfloat16: embedding families
               (min cosine to the reference goldens; float32 must reach 0.9999), rerankers (max |score - golden|,
               order), generators (generated ids equal to the golden ids in float32).
2. oom         real out-of-memory recovery: the memory is capped with `set_per_process_memory_fraction` so a
               large batch of long documents does not fit; `Embedder` halves batches and rejects only the row
               that does not fit alone; the cap is lifted again.
3. build       `embindex.build` end to end on the bundled corpus and MiniLM with `gpus_per_actor` 1 and 0.5 (two
               actors), and a ReaderLM-v2 `html_to_markdown` stage (0.75 GPU) beside the embed stage (0.25).
4. throughput  MiniLM and a random model of jina-embeddings-v3's real size: tokens/s, MFU, padding share, and
               MiniLM against sentence-transformers on the same device.
5. faiss       IVF training on faiss-gpu against the CPU (when faiss-gpu is installed).
6. stages      the generative stages' tokens/s from benchmarks/stages.py, when that module exists.

`--device cpu --quick` runs every section at tiny sizes on the CPU (a dry run proving the script end to end);
what needs CUDA (the memory cap, faiss-gpu) is recorded as skipped there. `--sections a,b` runs a subset;
`--budget-s` is the time the run may take (optional parts skip themselves when little is left). The report
(report.json and report.md in --out) is rewritten after every section, so a run cut short still leaves what
it measured; SIGTERM (the wrapper's deadline) marks the running section as stopped. Exit code: 0 when no
section failed, 1 when one did (or the run was stopped), 2 when the device asked for is missing.
docs/sizing.md ("One-shot GPU check") explains every number of the report.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import gc
import importlib
import importlib.util
import json
import logging
import math
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
FIXTURES = ROOT / "tests" / "fixtures"
if str(BENCH) not in sys.path:  # the sibling benchmark modules (model_speed, throughput, stages)
    sys.path.insert(0, str(BENCH))

import numpy as np  # noqa: E402
import torch  # noqa: E402

MINILM = "builtin:all-MiniLM-L6-v2"
V3_FAMILY = "jina-embeddings-v3"
V3_TASK = "retrieval.passage"
V3_FULL_VOCAB = 250002  # jina-embeddings-v3's XLM-RoBERTa vocabulary
FP32_MIN_COSINE = 0.9999  # float32 on the device against the goldens
FP32_MAX_SCORE_DIFF = 1e-4  # rerankers in float32: |score - golden|
SECTION_NAMES = ("goldens", "oom", "build", "throughput", "faiss", "stages")


def log(msg: str) -> None:
    print(f"[gpu_check] {msg}", file=sys.stderr, flush=True)


class Skipped(Exception):
    """A section (or part) that cannot run here; the message says why."""


class Terminated(BaseException):
    """SIGTERM (the wrapper's timeout): stop, but write the report first."""


@dataclass
class Context:
    """What every section gets: the device, the size regime and a scratch folder."""

    device: str  # "cuda" | "cpu"
    quick: bool
    out: Path
    work: Path
    deadline: float = math.inf  # time.monotonic() by which the run should be done (--budget-s)
    shared: dict[str, Any] = field(default_factory=dict)  # artifacts several sections use (the v3 checkpoint)

    @property
    def cuda(self) -> bool:
        return self.device == "cuda"

    @property
    def dtype(self) -> str:
        """The pipeline's `auto` dtype on this device: bf16 on CUDA, fp32 on the CPU."""
        return "bfloat16" if self.cuda else "float32"

    def remaining(self) -> float:
        """Seconds left of the run's budget (optional parts skip themselves below what they need)."""
        return self.deadline - time.monotonic()

    def size(self, full: Any, quick: Any) -> Any:
        return quick if self.quick else full

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()


# ================================================================================================ helpers


def read_json(path: Path) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def row_cosines(got: Any, want: Any) -> np.ndarray:
    """Cosine of each row of `got` with the same row of `want` (float64; shapes must match)."""
    a = np.atleast_2d(np.asarray(got, dtype=np.float64))
    b = np.atleast_2d(np.asarray(want, dtype=np.float64))
    if a.shape != b.shape:
        raise ValueError(f"shape {a.shape} differs from the golden {b.shape}")
    return (a * b).sum(-1) / np.maximum(np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1), 1e-30)


def to_numpy(x: torch.Tensor) -> np.ndarray:
    return x.detach().float().cpu().numpy()


def timed(fn: Callable[[], Any], sync: Callable[[], None]) -> tuple[Any, float]:
    """(fn(), wall seconds), synchronised with the device on both ends."""
    sync()
    t0 = time.perf_counter()
    out = fn()
    sync()
    return out, time.perf_counter() - t0


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def sample_texts(n: int) -> list[str]:
    """n texts of the bundled sample corpus (repeated when n is larger), as benchmarks/throughput.py builds it."""
    from throughput import make_corpus

    return [d["text"] for d in make_corpus(n)]


def peak_bf16_tflops(ctx: Context) -> tuple[float | None, str]:
    """The GPU's dense bf16 peak from benchmarks/model_speed.py's table (None on the CPU or an unknown GPU)."""
    from model_speed import gpu_peak_tflops

    return gpu_peak_tflops(torch.device(ctx.device), None)


# ======================================================================================= 1. fixture goldens


def load_text_model(name: str, fix: Path, dtype: str, device: str, **spec: Any) -> tuple[Any, Any, Any]:
    """(family, tokenizer, encoder) of a fixture checkpoint through the registry, as the pipeline loads it."""
    from embindex.models import ModelSpec, load_family

    family = load_family(ModelSpec(name=name, path=str(fix), dtype=dtype, **spec))
    return family, family.load_tokenizer(), family.load_encoder(device)


def pooled(tokenizer: Any, encoder: Any, ids: list[np.ndarray], task: Any = None) -> np.ndarray:
    """`forward_pooled` of token ids padded as one batch (the tokenizer's padding side) -> [B, D] numpy."""
    from embindex.text.batching import pad_batch

    input_ids, mask = pad_batch(ids, tokenizer.pad_token_id, getattr(tokenizer, "padding_side", "right"))
    return to_numpy(encoder.forward_pooled(torch.from_numpy(input_ids), torch.from_numpy(mask), task))


def golden_jina_v3(device: str, dtype: str, quick: bool) -> dict[str, Any]:
    """Every task's (and the no-task base weights') mean-pooled vectors."""
    from embindex.models.jina_embeddings_v3 import NO_TASK

    fix = FIXTURES / "jina-embeddings-v3-tiny"
    gold, texts = read_json(fix / "golden.json"), read_json(fix / "inputs.json")["texts"]
    _, tok, enc = load_text_model(V3_FAMILY, fix, dtype, device)
    cos = []
    for key, g in gold["tasks"].items():
        task = NO_TASK if key == "__no_task__" else key
        role = "query" if key == "retrieval.query" else "document"
        cos.append(row_cosines(pooled(tok, enc, tok(texts, role, task), task), g["mean_pooled_unnormalized"]["values"]))
    return {"min_cos": float(np.concatenate(cos).min())}


def golden_jina_v2(device: str, dtype: str, quick: bool) -> dict[str, Any]:
    """Mean-pooled vectors of the fixture's texts (JinaBERT, ALiBi attention)."""
    fix = FIXTURES / "jina-embeddings-v2-tiny"
    if not (fix / "golden.json").exists():
        raise Skipped("no tests/fixtures/jina-embeddings-v2-tiny")
    gold, texts = read_json(fix / "golden.json"), read_json(fix / "inputs.json")["texts"]
    _, tok, enc = load_text_model("jina-embeddings-v2", fix, dtype, device)
    return {"min_cos": float(row_cosines(pooled(tok, enc, tok(texts, "document")), gold["mean_pooled"]["values"]).min())}


def golden_jina_code(device: str, dtype: str, quick: bool) -> dict[str, Any]:
    """Last-token vectors of every task and role."""
    fix = FIXTURES / "jina-code-embeddings-tiny"
    gold, texts = read_json(fix / "golden.json"), read_json(fix / "inputs.json")["texts"]
    _, tok, enc = load_text_model("jina-code-embeddings", fix, dtype, device, task="nl2code")
    cos = []
    for key, g in gold["tasks"].items():
        task, role = key.rsplit(".", 1)
        ids = tok(texts, "query" if role == "query" else "document", task)
        cos.append(row_cosines(pooled(tok, enc, ids), g["last_token_unnormalized"]["values"]))
    return {"min_cos": float(np.concatenate(cos).min())}


def golden_jina_colbert(device: str, dtype: str, quick: bool) -> dict[str, Any]:
    """Kept token vectors of queries and documents (kept positions must be the golden ones)."""
    from embindex.text.batching import pad_batch

    fix = FIXTURES / "jina-colbert-v2-tiny"
    gold, inputs = read_json(fix / "golden.json"), read_json(fix / "inputs.json")
    _, tok, enc = load_text_model("jina-colbert-v2", fix, dtype, device)
    cos = []
    for role, key in (("query", "queries"), ("document", "documents")):
        input_ids, mask = pad_batch(tok(inputs[key], role), tok.pad_token_id)
        vecs, keep = enc.forward_tokens(torch.from_numpy(input_ids), torch.from_numpy(mask))
        for i, g in enumerate(gold[key]):
            kept = keep[i].nonzero().squeeze(1).tolist()
            if kept != g["kept_positions"]:
                raise ValueError(f"{key}[{i}]: kept positions {kept} != golden {g['kept_positions']}")
            cos.append(row_cosines(to_numpy(vecs[i][keep[i]]), g["embeddings"]))
    return {"min_cos": float(np.concatenate(cos).min())}


def golden_jina_clip(device: str, dtype: str, quick: bool) -> dict[str, Any]:
    """Text vectors (with and without the query instruction) and image vectors."""
    from PIL import Image

    fix = FIXTURES / "jina-clip-v2-tiny"
    gold, inputs = read_json(fix / "golden.json"), read_json(fix / "inputs.json")
    family, tok, enc = load_text_model("jina-clip-v2", fix, dtype, device)
    text = []
    for key, role in (("no_instruction", "document"), ("retrieval.query", "query")):
        g = gold["text"][key]
        text.append(row_cosines(pooled(tok, enc, tok(inputs["texts"], role), g["task_arg"]), g["unnormalized"]["values"]))
    processor = family.load_image_processor()
    pixels = [processor(Image.open(fix / f)) for f in inputs["images"]]
    image = row_cosines(to_numpy(enc.forward_images(pixels)[0]), gold["image"]["unnormalized"]["values"])
    text_min = float(np.concatenate(text).min())
    return {"min_cos": min(text_min, float(image.min())), "text": text_min, "image": float(image.min())}


def golden_jina_v4(device: str, dtype: str, quick: bool) -> dict[str, Any]:
    """Single and multi-vector outputs of texts (every task and role) and images (every task)."""
    from PIL import Image

    from embindex.text.batching import pad_batch

    fix = FIXTURES / "jina-embeddings-v4-tiny"
    gold = read_json(fix / "golden.json")
    family, tok, enc = load_text_model("jina-embeddings-v4", fix, dtype, device)
    single, tokens = [], []
    for key, g in gold["tasks"].items():
        task, role = key.rsplit(".", 1)
        ids = tok(g["texts"], "query" if role == "query" else "document", task)
        input_ids, mask = pad_batch(ids, tok.pad_token_id, tok.padding_side)
        vec, vecs, keep = enc.forward_multi(torch.from_numpy(input_ids), torch.from_numpy(mask), task)
        if vec is None:
            vec = enc.forward_pooled(torch.from_numpy(input_ids), torch.from_numpy(mask), task)
        single.append(row_cosines(to_numpy(vec), g["mean_pooled_unnormalized"]))
        tokens += [row_cosines(to_numpy(vecs[i][keep[i]]), want) for i, want in enumerate(g["multi_vector"])]
    processor = family.load_image_processor()
    pixels = [processor(Image.open(fix / f)) for f in gold["images"]["files"]]
    image = []
    for task, g in gold["images"]["tasks"].items():
        vec, toks = enc.forward_images(pixels, task, tokens=True)
        image.append(row_cosines(to_numpy(vec), g["mean_pooled_unnormalized"]))
        tokens += [row_cosines(to_numpy(t), want) for t, want in zip(toks, g["multi_vector"])]
    parts = {"text": float(np.concatenate(single).min()), "image": float(np.concatenate(image).min()),
             "tokens": float(np.concatenate(tokens).min())}
    return {"min_cos": min(parts.values()), **parts}


def score_result(scores: list[np.ndarray], golden: list[Any], orders_equal: list[bool],
                 cos: list[np.ndarray] | None = None) -> dict[str, Any]:
    """A reranker's row: the largest |score - golden|, whether every ranking is the golden one (and cosines)."""
    diff = max(float(np.abs(np.asarray(s, np.float64) - np.asarray(g, np.float64)).max()) for s, g in zip(scores, golden))
    out: dict[str, Any] = {"max_abs_score_diff": diff, "order_equal": all(orders_equal)}
    if cos:
        out["min_cos"] = float(np.concatenate(cos).min())
    return out


def golden_reranker_v2(device: str, dtype: str, quick: bool) -> dict[str, Any]:
    """compute_score of every (query, document) pair, untruncated and truncated."""
    from embindex.models import load_reranker

    fix = FIXTURES / "jina-reranker-v2-tiny"
    gold, inputs = read_json(fix / "golden.json"), read_json(fix / "inputs.json")
    queries, docs = inputs["queries"], inputs["documents"]
    pairs = [(q, d) for q in queries for d in docs]
    rr = load_reranker("jina-reranker-v2", str(fix), device=device, dtype=dtype)
    scores, golden, orders = [], [], []
    for key in ("compute_score", "compute_score_truncated"):
        _, got = rr.compute_score(pairs, max_length=inputs[key]["max_length"])
        want = np.asarray(gold[key]["scores"], np.float64)
        scores.append(got)
        golden.append(want)
        shape = (len(queries), len(docs))
        orders.append(bool((np.argsort(-got.reshape(shape), 1) == np.argsort(-want.reshape(shape), 1)).all()))
    return score_result(scores, golden, orders)


def golden_reranker_v3(device: str, dtype: str, quick: bool) -> dict[str, Any]:
    """Listwise scores, order and projected document embeddings of every golden call."""
    from embindex.models import load_reranker

    fix = FIXTURES / "jina-reranker-v3-tiny"
    gold = read_json(fix / "golden.json")
    rr = load_reranker("jina-reranker-v3", str(fix), device=device, dtype=dtype)
    scores, golden, orders, cos = [], [], [], []
    for call in gold["calls"] + [gold["truncation_call"]]:
        res = rr.rerank_details(call["query"], call["documents"], **call.get("rerank_kwargs", {}))
        scores.append(res.scores)
        golden.append(call["relevance_score_by_doc_index"])
        orders.append(res.order().tolist() == call["order"])
        cos.append(row_cosines(res.doc_embeds, call["doc_embeds_by_doc_index"]))
    return score_result(scores, golden, orders, cos)


def golden_reranker_m0(device: str, dtype: str, quick: bool) -> dict[str, Any]:
    """compute_score of every golden case (text and image queries and documents)."""
    from embindex.models import load_reranker

    fix = FIXTURES / "jina-reranker-m0-tiny"
    gold = read_json(fix / "golden.json")
    rr = load_reranker("jina-reranker-m0", str(fix), device=device, dtype=dtype)
    scores, golden, orders = [], [], []
    for case in gold["cases"].values():
        kw = dict(case["compute_score_kwargs"])
        qt, dt_ = kw.pop("query_type", "text"), kw.pop("doc_type", "text")
        pairs = [(str(fix / q) if qt == "image" else q, str(fix / d) if dt_ == "image" else d) for q, d in case["pairs"]]
        _, got = rr.compute_score(pairs, query_type=qt, doc_type=dt_, **kw)
        scores.append(got)
        golden.append(case["scores"])
        orders.append(np.argsort(-got).tolist() == np.argsort(-np.asarray(case["scores"])).tolist())
    return score_result(scores, golden, orders)


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def generation_result(pairs: list[tuple[Any, list[int]]]) -> dict[str, Any]:
    """(Generation, golden ids) pairs -> how many are equal and the shortest common prefix."""
    rejects = [g.reject for g, _ in pairs if g.reject]
    if rejects:
        raise ValueError(f"rejected: {rejects[:3]}")
    equal = sum(g.ids == want for g, want in pairs)
    return {"ids_equal": f"{equal}/{len(pairs)}", "all_ids_equal": equal == len(pairs),
            "min_common_prefix": min(common_prefix(g.ids, want) for g, want in pairs),
            "golden_tokens": sum(len(want) for _, want in pairs)}


def golden_readerlm(device: str, dtype: str, quick: bool) -> dict[str, Any]:
    """ReaderLM-v2: greedy Markdown / JSON of each golden page, with the case's cleaning options."""
    from embindex.models.generator import GenerationInput
    from embindex.models.registry import load_generator

    fix = FIXTURES / "readerlm-v2-tiny"
    gold, inputs = read_json(fix / "golden.json"), read_json(fix / "inputs.json")
    cases = gold["cases"][:2] if quick else gold["cases"]
    loaded: dict[str, Any] = {}
    pairs = []
    for case in cases:
        opts = {"clean_svg": case["clean_svg"], "clean_base64": case["clean_base64"], "schema": case["schema"],
                "instruction": case["instruction_arg"]}
        key = json.dumps(opts, sort_keys=True)
        if key not in loaded:
            loaded[key] = load_generator("readerlm-v2", str(fix), device=device, dtype=dtype, **opts)
        with open(fix / case["doc"], encoding="utf-8", newline="") as f:  # LF kept as the goldens read it
            html = f.read()
        out = loaded[key].generate([GenerationInput(text=html)], inputs["max_new_tokens"])[0]
        pairs.append((out, case["generated_ids"]))
    return generation_result(pairs)


def golden_jina_vlm(device: str, dtype: str, quick: bool) -> dict[str, Any]:
    """jina-vlm: greedy captions / answers of each golden case (24 new tokens, as the goldens)."""
    from embindex.models.generator import GenerationInput
    from embindex.models.registry import load_generator

    fix = FIXTURES / "jina-vlm-tiny"
    gold = read_json(fix / "golden.json")
    vlm = load_generator("jina-vlm", str(fix), device=device, dtype=dtype)
    pairs = []
    for case in gold["cases"][:2] if quick else gold["cases"]:
        text = next(p["text"] for p in case["conversation_content"] if p["type"] == "text")
        inp = GenerationInput(image=str(fix / case["images"][0]), text=text) if case["images"] else GenerationInput(text=text)
        pairs.append((vlm.generate([inp], 24)[0], case["generated_ids"]))
    return generation_result(pairs)


# (model, kind, check): kind decides what float32 must reach (see fp32_problem)
GOLDEN_CHECKS: list[tuple[str, str, Callable[[str, str, bool], dict[str, Any]]]] = [
    ("jina-embeddings-v3", "embedding", golden_jina_v3),
    ("jina-embeddings-v2", "embedding", golden_jina_v2),
    ("jina-code-embeddings", "embedding", golden_jina_code),
    ("jina-colbert-v2", "embedding", golden_jina_colbert),
    ("jina-clip-v2", "embedding", golden_jina_clip),
    ("jina-embeddings-v4", "embedding", golden_jina_v4),
    ("jina-reranker-v2", "reranker", golden_reranker_v2),
    ("jina-reranker-v3", "reranker", golden_reranker_v3),
    ("jina-reranker-m0", "reranker", golden_reranker_m0),
    ("readerlm-v2", "generator", golden_readerlm),
    ("jina-vlm", "generator", golden_jina_vlm),
]


def fp32_problem(kind: str, r: dict[str, Any]) -> str | None:
    """Why a float32 row misses the goldens (None: it matches; NaN never does)."""
    if kind == "embedding" and not r["min_cos"] >= FP32_MIN_COSINE:
        return f"min cosine {r['min_cos']:.6f} < {FP32_MIN_COSINE}"
    if kind == "reranker" and not (r["max_abs_score_diff"] <= FP32_MAX_SCORE_DIFF and r["order_equal"]):
        return f"max |score diff| {r['max_abs_score_diff']:.2e} (limit {FP32_MAX_SCORE_DIFF}), order equal {r['order_equal']}"
    if kind == "generator" and not r["all_ids_equal"]:
        return f"generated ids equal {r['ids_equal']}"
    return None


def section_goldens(ctx: Context) -> dict[str, Any]:
    """Each fixture model on the device in float32 and bfloat16 against its reference goldens."""
    rows, problems = [], []
    for model, kind, check in GOLDEN_CHECKS:
        for dtype in ("float32", "bfloat16"):
            row: dict[str, Any] = {"model": model, "kind": kind, "dtype": dtype}
            t0 = time.perf_counter()
            try:
                row.update(check(ctx.device, dtype, ctx.quick))
                why = fp32_problem(kind, row) if dtype == "float32" else None
                row["pass"] = why is None if dtype == "float32" else None  # bf16: recorded, not judged
                if why:
                    problems.append(f"{model} float32: {why}")
            except Skipped as e:
                row.update({"pass": None, "skipped": str(e)})
            except Exception as e:  # noqa: BLE001 - one model's failure is a row, not the section's end
                row.update({"pass": False, "error": f"{type(e).__name__}: {e}"[:500]})
                problems.append(f"{model} {dtype}: {row['error']}")
            row["seconds"] = round(time.perf_counter() - t0, 2)
            rows.append(row)
            log(f"goldens {model} {dtype}: {row}")
            free_memory()
    passed = sum(r["pass"] is True for r in rows)
    judged = sum(r["dtype"] == "float32" and "skipped" not in r for r in rows)
    bf16 = [r["min_cos"] for r in rows if r["dtype"] == "bfloat16" and "min_cos" in r]
    bf16_text = f"bfloat16 min cosine {min(bf16):.4f}" if bf16 else "no bfloat16 cosine"
    return {"headline": f"float32 matches the goldens for {passed}/{judged} models; {bf16_text}",
            "rows": rows, "problems": problems,
            "criteria": {"embedding float32": f"min cosine >= {FP32_MIN_COSINE}",
                         "reranker float32": f"max |score - golden| <= {FP32_MAX_SCORE_DIFF} and golden order",
                         "generator float32": "generated ids == golden ids", "bfloat16": "recorded only"},
            "not_covered": "hf-encoder (MiniLM) has no goldens; the throughput section compares it with "
                           "sentence-transformers on the device",
            "tf32": {"matmul": torch.backends.cuda.matmul.allow_tf32, "cudnn": torch.backends.cudnn.allow_tf32}}


# ============================================================================= the v3-sized random checkpoint


def v3_checkpoint(ctx: Context) -> tuple[Path, dict[str, Any]]:
    """A random checkpoint in jina-embeddings-v3's original layout (benchmarks/model_speed.py writes it): the
    real sizes and vocabulary on a full run, tiny sizes with --quick. Written once per run."""
    if "v3" in ctx.shared:
        return ctx.shared["v3"]
    from model_speed import V3_SIZES, bench_config, check_layout_against_fixture, write_checkpoint

    check_layout_against_fixture()
    sizes = ctx.size(V3_SIZES, {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                                "intermediate_size": 128})
    cfg = bench_config(sizes, "bfloat16" if ctx.cuda else "float32")
    if not ctx.quick:
        cfg["vocab_size"] = V3_FULL_VOCAB  # ids beyond the fixture tokenizer's only occur in synthetic inputs
    folder = ctx.work / "v3-random"
    written = write_checkpoint(folder, cfg, cfg["torch_dtype"])
    log(f"v3 checkpoint {sizes}, vocab {cfg['vocab_size']}: {written}")
    ctx.shared["v3"] = (folder, {"sizes": sizes, "vocab_size": cfg["vocab_size"], **written})
    return ctx.shared["v3"]


def v3_embedder(ctx: Context, batch_tokens: int, dtype: str | None = None, **spec: Any) -> Any:
    from embindex.models import ModelSpec, load_family
    from embindex.models.embedder import Embedder

    folder, _ = v3_checkpoint(ctx)
    family = load_family(ModelSpec(name=V3_FAMILY, path=str(folder), dtype=dtype or ctx.dtype, task=V3_TASK, **spec))
    return Embedder(family, device=ctx.device, batch_tokens=batch_tokens)


# ================================================================================================= 2. OOM


@dataclass
class OomPlan:
    """The rows of the OOM check: many normal rows that fit in small batches, and one giant row."""

    normal_len: int
    giant_len: int
    n_normal: int

    def ids(self, vocab: int, seed: int = 0) -> list[np.ndarray]:
        from model_speed import synthetic_ids

        rng = np.random.default_rng(seed)
        return synthetic_ids(self.n_normal, self.normal_len, vocab, rng) + synthetic_ids(1, self.giant_len, vocab, rng)


def peak_bytes(emb: Any, ids: list[np.ndarray]) -> int:
    """Device bytes a forward of `ids` allocates above what is allocated before it."""
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    emb.embed_ids(ids, V3_TASK)
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


@contextlib.contextmanager
def memory_cap(headroom: int) -> Iterator[dict[str, Any]]:
    """Cap this process's CUDA memory at what it holds now + `headroom` bytes; the cap is lifted on exit."""
    torch.cuda.empty_cache()
    total = torch.cuda.get_device_properties(0).total_memory
    reserved = torch.cuda.memory_reserved()
    fraction = (reserved + headroom) / total
    torch.cuda.set_per_process_memory_fraction(fraction)
    try:
        yield {"fraction": fraction, "cap_gib": (reserved + headroom) / 2**30, "reserved_gib": reserved / 2**30,
               "headroom_mib": headroom / 2**20}
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
        torch.cuda.empty_cache()


@contextlib.contextmanager
def wrapped_forward(encoder: Any, wrap: Callable[[Callable[..., torch.Tensor]], Callable[..., torch.Tensor]]
                    ) -> Iterator[None]:
    """`encoder.forward_pooled` replaced by `wrap(forward_pooled)` inside the block, restored after it."""
    had_own = "forward_pooled" in vars(encoder)
    before = encoder.forward_pooled
    encoder.forward_pooled = wrap(before)
    try:
        yield
    finally:
        if had_own:
            encoder.forward_pooled = before
        else:
            del encoder.forward_pooled  # the class's method again


@contextlib.contextmanager
def simulated_cap(encoder: Any, cap_tokens: int) -> Iterator[dict[str, Any]]:
    """Without CUDA: a forward over more than `cap_tokens` padded tokens raises an out-of-memory RuntimeError."""

    def wrap(inner: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        def capped(input_ids: torch.Tensor, mask: torch.Tensor, *rest: Any) -> torch.Tensor:  # task, role
            if input_ids.numel() > cap_tokens:
                raise RuntimeError(f"CUDA out of memory (simulated: {input_ids.numel()} padded tokens > {cap_tokens})")
            return inner(input_ids, mask, *rest)
        return capped

    with wrapped_forward(encoder, wrap):
        yield {"cap_tokens": cap_tokens}


@contextlib.contextmanager
def recorded_forwards(encoder: Any) -> Iterator[list[dict[str, Any]]]:
    """Every `forward_pooled` call: rows, padded tokens and whether it ran out of memory."""
    from embindex.models.embedder import is_device_oom

    attempts: list[dict[str, Any]] = []

    def wrap(inner: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        def forward(input_ids: torch.Tensor, mask: torch.Tensor, *rest: Any) -> torch.Tensor:  # task, role
            entry = {"rows": int(input_ids.shape[0]), "tokens": int(input_ids.numel()), "oom": False}
            attempts.append(entry)
            try:
                return inner(input_ids, mask, *rest)
            except Exception as e:
                entry["oom"] = is_device_oom(e)
                raise
        return forward

    with wrapped_forward(encoder, wrap):
        yield attempts


def section_oom(ctx: Context) -> dict[str, Any]:
    """A batch that does not fit: Embedder halves it on OOM and rejects only the row that never fits."""
    plan = ctx.size(OomPlan(normal_len=512, giant_len=8192, n_normal=64), OomPlan(16, 256, 32))
    _, meta = v3_checkpoint(ctx)
    emb = v3_embedder(ctx, batch_tokens=4 * plan.normal_len)
    ids = plan.ids(meta["vocab_size"])
    normal = ids[: plan.n_normal]
    reference = emb.embed_ids(normal, V3_TASK)  # 4 rows a batch, no cap
    out: dict[str, Any] = {"inputs": f"{plan.n_normal} x {plan.normal_len} tokens + 1 x {plan.giant_len} tokens",
                           "model": f"v3-sized random {meta['sizes']}", "dtype": ctx.dtype}
    if ctx.cuda:
        one, giant = peak_bytes(emb, normal[:1]), peak_bytes(emb, ids[-1:])
        out.update(row_peak_mib=one / 2**20, giant_peak_mib=giant / 2**20)
        # neither the giant row nor the full batch (~n_normal x one) fits; a normal row does when one <= giant / 8
        cap = memory_cap(headroom=min(giant // 2, plan.n_normal * one // 4))
        precondition = one * 8 <= giant
    else:
        cap = simulated_cap(emb.encoder, cap_tokens=plan.giant_len // 2)
        precondition = True
    emb.batch_tokens = plan.n_normal * plan.normal_len  # every normal row in one forward: far over the cap
    rejects: dict[int, tuple[str, str]] = {}
    with cap as cap_info, recorded_forwards(emb.encoder) as attempts:  # the recorder sees the capped forward
        vecs = emb.embed_ids(ids, V3_TASK, rejects=rejects)
    out["cap"] = cap_info
    after, after_s = timed(lambda: emb.embed_ids(normal, V3_TASK), ctx.sync)  # the cap is gone: one big batch again
    return oom_result(out, plan, attempts, rejects, vecs, reference, after, after_s, precondition, ctx)


def oom_result(out: dict[str, Any], plan: OomPlan, attempts: list[dict[str, Any]], rejects: dict[int, Any],
               vecs: np.ndarray, reference: np.ndarray, after: np.ndarray, after_s: float, precondition: bool,
               ctx: Context) -> dict[str, Any]:
    """Judge the capped run: it hit OOM, halved, embedded every normal row and rejected only the giant one."""
    giant = plan.n_normal
    ooms = [a for a in attempts if a["oom"]]
    embedded_normal = [i for i in range(plan.n_normal) if i not in rejects]
    cos = float(row_cosines(vecs[embedded_normal], reference[embedded_normal]).min()) if embedded_normal else float("nan")
    problems = []
    if not precondition:
        problems.append(f"one normal row needs {out['row_peak_mib']:.0f} MiB, over 1/8 of the giant row's "
                        f"{out['giant_peak_mib']:.0f} MiB: the test cannot separate them")
    if not ooms:
        problems.append("no forward ran out of memory under the cap")
    if sorted(rejects) != [giant]:
        problems.append(f"rejected rows {sorted(rejects)}, expected only the giant row {giant}")
    if rejects.get(giant, ("",))[0] != "too_large_for_device":
        problems.append(f"giant row reject {rejects.get(giant)}")
    if not cos >= 0.99:
        problems.append(f"capped vectors differ from the uncapped ones: min cosine {cos}")
    if not np.isfinite(after).all():
        problems.append("after lifting the cap the batch gave non-finite vectors")
    mode = "real CUDA OOM under set_per_process_memory_fraction" if ctx.cuda else "simulated OOM (no CUDA)"
    out.update({
        "mode": mode, "forwards": len(attempts), "ooms": len(ooms),
        "attempts": " ".join(f"{a['rows']}{'x' if a['oom'] else 'ok'}" for a in attempts),
        "largest_batch_that_ran": max((a["rows"] for a in attempts if not a["oom"]), default=0),
        "normal_rows_embedded": f"{len(embedded_normal)}/{plan.n_normal}",
        "rejects": {str(k): list(v) for k, v in rejects.items()},
        "min_cos_vs_uncapped": cos, "uncapped_again_s": round(after_s, 3), "problems": problems,
        "headline": f"{mode}: {len(ooms)} OOM(s) in {len(attempts)} forwards, {len(embedded_normal)}/{plan.n_normal} "
                    f"normal rows embedded, rejected {sorted(rejects)} (giant = {giant}); cap lifted afterwards",
    })
    if not ctx.cuda:
        out["status"] = "skipped"
        out["reason"] = ("no CUDA: the memory fraction cannot be capped here; the recovery path ran against a "
                         "simulated OOM instead")
    return out


# =============================================================================================== 3. build


def start_ray(ctx: Context) -> None:
    """A private local Ray: the machine's GPUs on CUDA; on the CPU one logical GPU, so that fractional
    `gpus_per_actor` are scheduled as on a GPU node (the actors then compute on the CPU)."""
    import ray
    import ray.data

    os.environ.setdefault("RAY_worker_niceness", "0")
    kwargs: dict[str, Any] = {"num_cpus": 3, "num_gpus": 1} if not ctx.cuda else {}
    ray.init(address="local", include_dashboard=False, log_to_driver=False, configure_logging=False, **kwargs)
    on_sigterm_stop()  # ray.init replaced our SIGTERM handler
    ray.data.DataContext.get_current().enable_progress_bars = False


def build_source(ctx: Context) -> str:
    """The bundled sample corpus as plain JSONL files: 10 copies (16,500 documents, distinct ids) in 16 files on a
    full run, its first 120 documents in 2 files with --quick. Not `builtin:sample-corpus` itself: that is one
    gzipped file, hence one fragment, which would leave the second actor of the 0.5-GPU build idle."""
    from throughput import make_corpus, write_corpus

    docs, files = ctx.size((16500, 16), (120, 2))
    return str(write_corpus(make_corpus(docs), ctx.work, files))


def build_config(ctx: Context, source: Any, index: Path, gpus: float, actors: int, **sections: Any) -> dict[str, Any]:
    """A small MiniLM build (tests/conftest.py's job_config, dtype auto) on `actors` actors of `gpus` GPU each."""
    cfg: dict[str, Any] = {
        "source": source if isinstance(source, dict) else {"uri": source},
        "model": {"name": "hf-encoder", "path": MINILM, "dtype": "auto", "max_length": ctx.size(256, 128)},
        "index": {"uri": str(index), "tiers": [32, 64, 128, "full"], "quality_sample": ctx.size(200, 20)},
        "resources": {"actors": actors, "gpus_per_actor": gpus, "cpus_per_actor": 1,
                      "batch_tokens": ctx.size(65536, 8192)},
        "run": {"progress": False},
    }
    cfg.update(sections)
    return cfg


def run_build(ctx: Context, name: str, cfg: dict[str, Any]) -> dict[str, Any]:
    """`embindex.build(cfg)`: docs/s, the manifest's dtype, counts, timings and the actor lines of its log."""
    import embindex

    lines: list[str] = []
    t0 = time.perf_counter()
    res = embindex.build(cfg, log=lines.append)
    wall = time.perf_counter() - t0
    c, t = res.counts, res.timings
    stages = [s if isinstance(s, dict) else s.model_dump() for s in getattr(res.manifest, "stages", None) or []
              if not isinstance(s, str)]  # generative stages are entries with counts; built-in ones are names
    return {"build": name, "wall_s": round(wall, 2), "docs_per_s": round(c["documents"] / wall, 1),
            "embed_write_docs_per_s": round(c["documents"] / max(t.get("pipeline_s", 0.0), 1e-9), 1),
            "first_batch_s": t.get("first_batch_s"), "tiers_s": t.get("tiers_s"),
            "manifest_dtype": res.manifest.model.dtype, "rows_in": c["rows_in"], "documents": c["documents"],
            "rejected": c["rejected"], "vectors": c["vectors"],
            "actors": [ln.split("] ", 1)[-1] for ln in lines if "actors:" in ln],
            "generated": [s for s in stages if isinstance(s, dict) and s.get("counts")]}


def build_problems(ctx: Context, r: dict[str, Any]) -> list[str]:
    """A build must index every row on the device asked for."""
    problems = []
    if f"({ctx.device})" not in str(r["manifest_dtype"]):
        problems.append(f"{r['build']}: manifest model.dtype {r['manifest_dtype']!r} does not say {ctx.device}")
    if r["rejected"] or r["documents"] != r["rows_in"]:
        problems.append(f"{r['build']}: rows in {r['rows_in']}, indexed {r['documents']}, rejected {r['rejected']}")
    return problems


def readerlm_pages(ctx: Context) -> Path:
    """The ReaderLM-v2 fixture's HTML pages in a folder of their own (a `format: html` source)."""
    pages = ctx.work / "html"
    pages.mkdir(parents=True, exist_ok=True)
    for page in sorted((FIXTURES / "readerlm-v2-tiny").glob("*.html")):
        shutil.copyfile(page, pages / page.name)
    return pages


def checked_build(ctx: Context, name: str, cfg: dict[str, Any], problems: list[str]) -> dict[str, Any]:
    """`run_build` and its checks; a build that raises is a row with its error (the next build still runs)."""
    try:
        row = run_build(ctx, name, cfg)
    except Exception as e:  # noqa: BLE001 - recorded; the other builds of the section go on
        row = {"build": name, "error": f"{type(e).__name__}: {e}"[:1000]}
        problems.append(f"{name}: {row['error']}")
        return row
    problems += build_problems(ctx, row)
    if "generate" in name:
        generated = sum(s["counts"].get("documents", 0) for s in row["generated"])
        if generated != row["rows_in"]:
            problems.append(f"{name}: the stage generated {generated} of {row['rows_in']} pages")
    log(f"build {row}")
    return row


def section_build(ctx: Context) -> dict[str, Any]:
    """`embindex.build` end to end: 1 GPU per actor, 0.5 (two actors), and ReaderLM (0.75) + embed (0.25)."""
    import ray

    start_ray(ctx)
    rows: list[dict[str, Any]] = []
    problems: list[str] = []
    try:
        source = build_source(ctx)
        for name, gpus, actors in (("embed, gpus_per_actor 1", 1.0, 1), ("embed, gpus_per_actor 0.5 x 2", 0.5, 2)):
            rows.append(checked_build(ctx, name, build_config(ctx, source, ctx.work / f"index-{actors}", gpus, actors),
                                      problems))
        generate = {"stage": "html_to_markdown", "model": {"path": str(FIXTURES / "readerlm-v2-tiny")},
                    "max_new_tokens": ctx.size(64, 8), "resources": {"gpus_per_actor": 0.75, "cpus_per_actor": 1}}
        cfg = build_config(ctx, {"uri": str(readerlm_pages(ctx)), "format": "html"}, ctx.work / "index-web", 0.25, 1,
                           stages=["read", "normalize", generate, "tokenize", "embed", "write"])
        cfg["index"].update(tiers=["full"], quality_sample=5)
        rows.append(checked_build(ctx, "generate 0.75 + embed 0.25", cfg, problems))
    finally:
        ray.shutdown()
    rate = [r.get("docs_per_s") for r in rows]
    ratio = f" (x{rate[1] / rate[0]:.2f})" if rate[0] and rate[1] else ""
    return {"headline": f"MiniLM {rows[0].get('rows_in', '?')} docs: {rate[0]} docs/s at 1 GPU/actor, {rate[1]} docs/s "
                        f"with 2 actors at 0.5{ratio}; dtype {rows[0].get('manifest_dtype')}; ReaderLM + embed "
                        f"{rate[2]} pages/s",
            "rows": rows, "problems": problems}


# ========================================================================================== 4. throughput


def padded_flops(lengths: list[int], batch_tokens: int, linear_per_token: float, attn_per_token_per_len: float
                 ) -> dict[str, float]:
    """Real and padded tokens and forward FLOPs of the token-budget batches the Embedder cuts: a batch of
    `rows` rows padded to `L` costs rows * L * (linear_per_token + attn_per_token_per_len * L)."""
    from embindex.text.batching import token_budget_batches

    arr = np.asarray(lengths)
    real = float(arr.sum())
    padded = flops = 0.0
    for idx in token_budget_batches(lengths, batch_tokens):
        longest = float(arr[idx].max())
        padded += len(idx) * longest
        flops += len(idx) * longest * (linear_per_token + attn_per_token_per_len * longest)
    return {"real_tokens": real, "padded_tokens": padded, "padding_share": 1 - real / padded if padded else 0.0,
            "flops": flops}


def linear_params(module: torch.nn.Module, skip: tuple[str, ...] = ("pooler",)) -> int:
    """Weights of the module's Linear layers (what a token multiplies through), the pooler left out."""
    return sum(m.weight.numel() for name, m in module.named_modules()
               if isinstance(m, torch.nn.Linear) and not name.startswith(skip))


def throughput_row(name: str, emb: Any, ids: list[np.ndarray], seconds: float, linear_per_token: float,
                   attn_coeff: float, peak: float | None) -> dict[str, Any]:
    """tokens/s (real tokens), padding share and MFU (padded FLOPs / seconds / peak) of one timed embed_ids."""
    fl = padded_flops([len(x) for x in ids], emb.batch_tokens, linear_per_token, attn_coeff)
    achieved = fl["flops"] / seconds
    return {"model": name, "dtype": emb.dtype_name, "docs": len(ids), "seconds": round(seconds, 3),
            "docs_per_s": round(len(ids) / seconds, 1), "tokens_per_s": round(fl["real_tokens"] / seconds),
            "padded_tokens_per_s": round(fl["padded_tokens"] / seconds), "padding_share": round(fl["padding_share"], 4),
            "gflop_per_token_at_mean_len": round(fl["flops"] / fl["padded_tokens"] / 1e9, 4),
            "tflops": round(achieved / 1e12, 2), "mfu": round(achieved / (peak * 1e12), 4) if peak else None}


def sentence_transformers_run(ctx: Context, path: str, texts: list[str], dtype: torch.dtype, batch: int
                              ) -> tuple[np.ndarray, float]:
    """(unit vectors, seconds) of `SentenceTransformer(path, device).encode(texts)` after a warm-up call."""
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(path, device=ctx.device).to(dtype)
    st.encode(texts[:256], batch_size=batch)  # warm-up
    ref, seconds = timed(lambda: st.encode(texts, batch_size=batch, normalize_embeddings=True, convert_to_tensor=True),
                         ctx.sync)
    return to_numpy(ref), seconds


def minilm_throughput(ctx: Context, texts: list[str], peak: float | None) -> list[dict[str, Any]]:
    """MiniLM through Embedder (the pipeline's dtype) against sentence-transformers on the same device."""
    from embindex.checkpoints import resolve_model_path
    from embindex.models import ModelSpec, load_family
    from embindex.models.embedder import Embedder

    path = resolve_model_path(MINILM)
    emb = Embedder(load_family(ModelSpec(name="hf-encoder", path=path, dtype=ctx.dtype)), device=ctx.device,
                   batch_tokens=ctx.size(65536, 4096))
    emb.encode(texts[:256])  # warm-up
    ids, tok_s = timed(lambda: emb.tokenize(texts, "document"), ctx.sync)
    vecs, fwd_s = timed(lambda: emb.embed_ids(ids), ctx.sync)
    cfg = emb.encoder.model.config
    row = throughput_row("all-MiniLM-L6-v2 (Embedder)", emb, ids, fwd_s, 2.0 * linear_params(emb.encoder.model),
                         4.0 * cfg.hidden_size * cfg.num_hidden_layers, peak)
    row["end_to_end_docs_per_s"] = round(len(texts) / (tok_s + fwd_s), 1)
    rows = [row]
    if importlib.util.find_spec("sentence_transformers") is None:
        return rows + [{"model": "sentence-transformers", "error": "not installed (pip install sentence-transformers)"}]
    for label, dtype, batch in (("fp32, batch 32 (defaults)", torch.float32, 32), ("bf16, batch 128", torch.bfloat16, 128)):
        if dtype == torch.bfloat16 and not ctx.cuda:
            continue  # sentence-transformers in bf16: on CUDA only (on a CPU it says nothing about GPUs)
        ref, st_s = sentence_transformers_run(ctx, path, texts, dtype, batch)
        ratio = row["end_to_end_docs_per_s"] / (len(texts) / st_s)
        rows.append({"model": f"sentence-transformers {label}", "dtype": str(dtype).replace("torch.", ""),
                     "docs": len(texts), "seconds": round(st_s, 3), "docs_per_s": round(len(texts) / st_s, 1),
                     "embindex_over_st": round(ratio, 3), "min_cos_vs_embindex": float(row_cosines(vecs, ref).min())})
        log(f"throughput {rows[-1]}")
        free_memory()
    return rows


def v3_throughput(ctx: Context, texts: list[str], peak: float | None) -> list[dict[str, Any]]:
    """The v3-sized model: fixed-length synthetic batches (no padding) and the sample corpus' real lengths."""
    from model_speed import flops_per_token, measure

    from embindex.models.embedder import Embedder

    _, meta = v3_checkpoint(ctx)
    batch_tokens = ctx.size(65536, 2048)
    emb = v3_embedder(ctx, batch_tokens)
    rows = []
    for length in ctx.size((512, 2048), (64,)):
        r = measure(emb, torch.device(ctx.device), length, batch_tokens, ctx.size(5, 1), V3_TASK, meta["vocab_size"],
                    seed=length, warmup=True)
        fl = flops_per_token(emb.encoder, length)
        achieved = fl["total"] * r["tokens_per_s"]
        rows.append({"model": f"v3-sized random, synthetic L={length}", "dtype": emb.dtype_name,
                     "docs": r["rows"], "seconds": round(r["median_s"], 3), "tokens_per_s": round(r["tokens_per_s"]),
                     "padding_share": 0.0, "gflop_per_token_at_mean_len": round(fl["total"] / 1e9, 4),
                     "tflops": round(achieved / 1e12, 2), "mfu": round(achieved / (peak * 1e12), 4) if peak else None})
        log(f"throughput {rows[-1]}")
    # real lengths: the sample corpus through the fixture's tokenizer (not XLM-R's 250k pieces), up to 512 tokens
    from embindex.models import ModelSpec, load_family

    family = load_family(ModelSpec(name=V3_FAMILY, path=str(v3_checkpoint(ctx)[0]), dtype=ctx.dtype, task=V3_TASK,
                                   max_length=512))
    corpus = Embedder(family, tokenizer=family.load_tokenizer(), encoder=emb.encoder, batch_tokens=batch_tokens)
    ids = corpus.tokenize(texts, "document", V3_TASK)
    corpus.embed_ids(ids[:64], V3_TASK)  # warm-up of these shapes
    _, seconds = timed(lambda: corpus.embed_ids(ids, V3_TASK), ctx.sync)
    fl = flops_per_token(emb.encoder, 1)
    rows.append(throughput_row("v3-sized random, sample corpus <= 512 tok", corpus, ids, seconds,
                               fl["linear"] + fl["lora"], fl["attention"], peak))
    log(f"throughput {rows[-1]}")
    return rows


def throughput_headline(rows: list[dict[str, Any]]) -> str:
    parts = [f"{r['model']} {r['tokens_per_s']:,} tok/s ({r['dtype']})" for r in rows[:1] if "tokens_per_s" in r]
    parts += [f"{r['embindex_over_st']}x ST {r['dtype']}" for r in rows if "embindex_over_st" in r]
    mfu = [r["mfu"] for r in rows if r["model"].startswith("v3") and r.get("mfu") is not None]
    parts.append(f"v3-sized MFU up to {max(mfu):.1%}" if mfu else "MFU n/a (no bf16 peak for this device)")
    return "; ".join(parts)


def section_throughput(ctx: Context) -> dict[str, Any]:
    """tokens/s, MFU and padding share of MiniLM and the v3-sized model; MiniLM against sentence-transformers."""
    peak, peak_source = peak_bf16_tflops(ctx)
    rows: list[dict[str, Any]] = []
    problems: list[str] = []
    for part, measure_part, docs in (("MiniLM", minilm_throughput, ctx.size(20000, 32)),
                                     ("v3-sized", v3_throughput, ctx.size(5000, 16))):
        try:
            rows += measure_part(ctx, sample_texts(docs), peak)
        except Exception as e:  # noqa: BLE001 - one model's failure does not hide the other's numbers
            problems.append(f"{part}: {type(e).__name__}: {e}"[:1000])
            log(traceback.format_exc())
        free_memory()
    return {"headline": throughput_headline(rows), "rows": rows, "problems": problems,
            "peak_bf16_tflops": peak, "peak_source": peak_source,
            "flops_formula": "per token at padded length L: 2 x (Linear weight parameters, pooler excluded; v3: + "
                             "its LoRA's 2 x r x (in + out)) + 4 x L x hidden x layers (QK^T and AV); embeddings, "
                             "norms, softmax and pooling not counted. MFU = FLOPs of the padded batches / seconds / "
                             "dense bf16 peak; padding_share = 1 - real tokens / padded tokens",
            "v3_checkpoint": ctx.shared.get("v3", (None, None))[1]}


# ============================================================================================== 5. faiss


@contextlib.contextmanager
def captured_warnings(logger_name: str) -> Iterator[list[str]]:
    """WARNING records of a logger (embindex's GPU training falls back to the CPU with one)."""
    records: list[str] = []

    class Grab(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record.getMessage())

    logger, handler = logging.getLogger(logger_name), Grab(logging.WARNING)
    logger.addHandler(handler)
    try:
        yield records
    finally:
        logger.removeHandler(handler)


def section_faiss(ctx: Context) -> dict[str, Any]:
    """IVF-PQ training through embindex's `train_index` on the GPU(s) and on the CPU, same sample."""
    from embindex.index.training import gpu_count, train_index

    gpus = gpu_count()
    dim, nlist, m, bits = ctx.size((1024, 4096, 64, 8), (64, 16, 8, 4))
    factory = f"IVF{nlist},PQ{m}" + ("" if bits == 8 else f"x{bits}")
    n = 40 * max(nlist, 2**bits)  # 40 training rows per centroid: IVF lists and each PQ sub-quantizer
    if ctx.cuda and gpus == 0:
        raise Skipped("faiss-gpu not installed (faiss.get_num_gpus() == 0)")
    x = np.random.default_rng(0).standard_normal((n, dim), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    out: dict[str, Any] = {"factory": factory, "dim": dim, "train_rows": n, "faiss_gpus": gpus}
    _, out["cpu_s"] = timed(lambda: train_index(factory, dim, x, use_gpu=False), lambda: None)
    if gpus == 0:
        out.update(status="skipped", reason="no CUDA: faiss-gpu cannot run here; the CPU training ran at tiny size",
                   headline=f"CPU {factory} on {n} x {dim}: {out['cpu_s']:.2f}s; GPU skipped (no CUDA)")
        return out
    with captured_warnings("embindex.index.training") as warnings:
        index, out["gpu_s"] = timed(lambda: train_index(factory, dim, x, use_gpu=True), lambda: None)
    out["speedup"] = round(out["cpu_s"] / out["gpu_s"], 2)
    out["problems"] = [f"GPU training fell back to the CPU: {w}" for w in warnings]
    if not index.is_trained:
        out["problems"].append("the GPU-trained index is not trained")
    out["headline"] = (f"{factory} on {n} x {dim}: GPU {out['gpu_s']:.1f}s, CPU {out['cpu_s']:.1f}s "
                       f"(x{out['speedup']})" + (" -- FELL BACK TO CPU" if warnings else ""))
    return out


# ============================================================================================= 6. stages


@contextlib.contextmanager
def generators_on(device: str) -> Iterator[None]:
    """benchmarks/stages.py loads its generators with `device="cpu"`: inside the block the registry's
    `load_generator` (which it imports at call time) puts them on `device` instead."""
    from embindex.models import registry

    real = registry.load_generator

    def load(name: str, path: str, device_: Any = None, *args: Any, **kwargs: Any) -> Any:
        kwargs.pop("device", None)
        return real(name, path, device, *args, **kwargs)

    registry.load_generator = load
    try:
        yield
    finally:
        registry.load_generator = real


def stage_row(r: dict[str, Any]) -> dict[str, Any]:
    """One `stages.bench_generator` result as a report row: generated tokens/s unbatched and batched."""
    un, ba = r["unbatched"], r["batched"]
    return {"model": f"{r['family']} ({r['label']})", "dtype": r["dtype"], "params_m": round(r["params"] / 1e6, 1),
            "inputs": r["inputs"], "max_new_tokens": r["max_new_tokens"], "load_s": round(r["load_s"], 1),
            "unbatched_tok_s": round(un["generated"] / un["seconds"], 1),
            "batched_tok_s": round(ba["generated"] / ba["seconds"], 1), "batched_over_unbatched": round(r["ratio"], 2),
            "batches": ba["batches"], "prefill_s": ba.get("prefill_s"), "decode_s": ba.get("decode_s"),
            "same_ids": f"{r['same_ids']}/{r['inputs']}"}


def section_stages(ctx: Context) -> dict[str, Any]:
    """Generated tokens/s of the generative stages' models with benchmarks/stages.py's `bench_generator`, on the
    device: the tiny fixtures, then (on CUDA without --quick, time permitting) random models of the real sizes."""
    if not (BENCH / "stages.py").exists():
        raise Skipped("benchmarks/stages.py not present")
    sb = importlib.import_module("stages")
    dtype, batch_tokens = ctx.dtype, 16384
    max_new, repeats = ctx.size(24, 4), ctx.size(2, 1)
    texts = [sb._text_input(t) for t in sb.page_texts(ctx.size(10, 2))]
    images = [sb._image_input(im) for im in sb.vlm_images(ctx.size(8, 2), sb.TINY_IMAGE_SIZES, 0)]
    rows, notes = [], []
    threads = torch.get_num_threads()  # bench_generator sets its own; later sections get this back
    with generators_on(ctx.device), contextlib.ExitStack() as stack:
        stack.callback(torch.set_num_threads, threads)
        for family, path, inputs in (("readerlm-v2", sb.READERLM, texts), ("jina-vlm", sb.VLM, images)):
            rows.append(stage_row(sb.bench_generator("tiny", family, path, inputs, max_new, batch_tokens, repeats,
                                                     dtype, 1, {})))
            log(f"stages {rows[-1]}")
        if ctx.cuda and not ctx.quick:
            models = sb.real_models()
            real_inputs = {"readerlm-v2": ([sb._text_input(t) for t in sb.page_texts(4)], {"max_input_tokens": 256}),
                           "jina-vlm": ([sb._image_input(im) for im in sb.vlm_images(2, [(240, 320)], 0)], {})}
            for name, (inputs, options) in real_inputs.items():
                if ctx.remaining() < 150:
                    notes.append(f"{name} at real size skipped: {ctx.remaining():.0f}s of the budget left")
                    continue
                torch.set_num_threads(threads)  # writing the random weights uses every core
                written = sb.write_real(models[name], ctx.work / f"{name}-real", "bfloat16", 0)
                row = stage_row(sb.bench_generator("real", name, ctx.work / f"{name}-real", inputs, 32,
                                                   batch_tokens, 1, dtype, 1, options))
                rows.append({**row, "checkpoint_write_s": written.get("write_s")})
                log(f"stages {rows[-1]}")
                shutil.rmtree(ctx.work / f"{name}-real", ignore_errors=True)
    return {"headline": "; ".join(f"{r['model']} {r['batched_tok_s']} tok/s batched (x{r['batched_over_unbatched']})"
                                  for r in rows),
            "rows": rows, "notes": notes,
            "how": "benchmarks/stages.py bench_generator (one generator = one stage actor), its generator loads "
                   f"redirected to {ctx.device}; tokens/s = generated ids / wall seconds of the median call"}


SECTIONS: dict[str, Callable[[Context], dict[str, Any]]] = {
    "goldens": section_goldens, "oom": section_oom, "build": section_build,
    "throughput": section_throughput, "faiss": section_faiss, "stages": section_stages,
}


# ============================================================================================== the report


def jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if isinstance(x, (np.floating, float)):
        v = float(x)
        return v if math.isfinite(v) else str(v)
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, (np.bool_,)):
        return bool(x)
    if isinstance(x, (str, int, bool)) or x is None:
        return x
    return str(x)


def fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.6g}"
    if isinstance(v, (dict, list)):
        return json.dumps(v, ensure_ascii=False)
    return "" if v is None else str(v)


def markdown_table(rows: list[dict[str, Any]]) -> list[str]:
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    out = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    out += ["| " + " | ".join(fmt(r.get(k)).replace("|", "\\|") for k in keys) + " |" for r in rows]
    return out


def render_markdown(report: dict[str, Any]) -> str:
    env = report["environment"]
    lines = [f"# GPU check: {env.get('gpu') or 'no GPU'} ({report['device']}{', quick' if report['quick'] else ''})", "",
             f"Started {report['started']}, {report.get('seconds', '?')} s; result: **{report.get('result', 'running')}**.", "",
             "Environment: " + ", ".join(f"{k} {v}" for k, v in env.items() if v is not None), "",
             "| section | status | seconds | headline |", "|---|---|---|---|"]
    for name, s in report["sections"].items():
        head = s.get("result", {}).get("headline") or s.get("reason") or s.get("error") or ""
        lines.append(f"| {name} | {s['status']} | {s.get('seconds', '')} | {fmt(head).replace('|', '/')} |")
    for name, s in report["sections"].items():
        lines += ["", f"## {name}: {s['status']}", ""]
        for key in ("reason", "error"):
            if s.get(key):
                lines += [f"{key}: {s[key]}", ""]
        res = dict(s.get("result") or {})
        for p in res.pop("problems", None) or []:
            lines.append(f"- PROBLEM: {p}")
        res.pop("headline", None)
        rows = res.pop("rows", None) if isinstance(res.get("rows"), list) else None
        if rows and all(isinstance(r, dict) for r in rows):
            lines += [""] + markdown_table(rows) + [""]
        lines += [f"- {k}: {fmt(v)}" for k, v in res.items()]
        if s.get("traceback"):
            lines += ["", "```", s["traceback"].rstrip(), "```"]
    return "\n".join(lines) + "\n"


def write_report(report: dict[str, Any], out: Path) -> None:
    """report.json, and report.md rendered from it (a rendering error leaves a note instead of the tables)."""
    data = jsonable(report)
    (out / "report.json").write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
    try:
        text = render_markdown(data)
    except Exception as e:  # noqa: BLE001 - the JSON report is the record; never lose it to the Markdown
        text = f"# GPU check\n\nreport.md could not be rendered ({type(e).__name__}: {e}); see report.json.\n"
    (out / "report.md").write_text(text)


def environment(ctx: Context) -> dict[str, Any]:
    """Versions and the device, for the report's head."""
    env: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
                           "gpu": torch.cuda.get_device_name(0) if ctx.cuda else None,
                           "gpu_memory_gib": round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
                           if ctx.cuda else None, "cpus": os.cpu_count()}
    for mod in ("transformers", "ray", "faiss", "sentence_transformers"):
        try:
            env[mod] = importlib.import_module(mod).__version__
        except Exception as e:  # noqa: BLE001 - the report says what is missing
            env[mod] = f"unavailable ({type(e).__name__})"
    try:
        env["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                       text=True, timeout=10).stdout.strip() or None
    except Exception:  # noqa: BLE001
        env["commit"] = None
    return env


def run_section(name: str, ctx: Context, report: dict[str, Any]) -> None:
    """Run one section, timed; record its result, its skip reason or its error, and rewrite the report."""
    entry: dict[str, Any] = {"status": "running"}
    report["sections"][name] = entry
    write_report(report, ctx.out)
    log(f"=== {name}")
    t0 = time.perf_counter()
    try:
        result = SECTIONS[name](ctx)
        asked = result.pop("status", None)  # "skipped" for a part that cannot run here; problems always fail
        status = "failed" if result.get("problems") else asked or "ok"
        reason = result.pop("reason", None)
        entry.update(status=status, result=result, **({"reason": reason} if reason else {}))
        if status == "failed":
            entry["error"] = "; ".join(result["problems"])[:2000]
    except Skipped as e:
        entry.update(status="skipped", reason=str(e))
    except BaseException as e:  # noqa: BLE001 - a failing section never stops the others; a signal stops the run
        stop = is_stop(e)
        entry.update(status="failed", error=("stopped by a signal (the timeout?) while running: " if stop else "")
                     + f"{type(e).__name__}: {e}"[:2000], traceback=traceback.format_exc()[-6000:])
        if stop:
            raise Terminated(str(e)) from e
    finally:
        entry["seconds"] = round(time.perf_counter() - t0, 2)
        write_report(report, ctx.out)
        free_memory()
    log(f"=== {name}: {entry['status']} in {entry['seconds']}s {entry.get('reason') or entry.get('error') or ''}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, type=Path, help="folder for report.json and report.md")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                   help="cuda (default; fails at once without a CUDA device) or cpu (a dry run)")
    p.add_argument("--quick", action="store_true", help="tiny sizes (the dry run's; seconds per section)")
    p.add_argument("--budget-s", type=float, default=450.0,
                   help="seconds the whole run may take; optional parts are skipped when too little is left "
                        "(the wrapper passes its timeout minus a margin)")
    p.add_argument("--sections", default=",".join(SECTION_NAMES),
                   help=f"comma list of sections to run, of {','.join(SECTION_NAMES)} (default: all)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    names = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = sorted(set(names) - set(SECTION_NAMES))
    if unknown:
        raise SystemExit(f"unknown sections {unknown}; choose from {list(SECTION_NAMES)}")
    args.out.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"started": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                              "argv": sys.argv[1:] if argv is None else argv, "device": args.device,
                              "quick": args.quick, "sections": {}}
    if args.device == "cuda" and not torch.cuda.is_available():
        msg = (f"no CUDA device (torch {torch.__version__}, built for CUDA {torch.version.cuda}); "
               "for a dry run without a GPU pass --device cpu --quick (wrapper: GPU_CHECK_ARGS=\"--device cpu --quick\")")
        report.update(environment={"torch": torch.__version__, "cuda": torch.version.cuda}, result="FAILED: " + msg)
        write_report(report, args.out)
        print(f"error: {msg}", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="embindex-gpu-check-"))
    ctx = Context(device=args.device, quick=args.quick, out=args.out, work=work,
                  deadline=time.monotonic() + args.budget_s)
    report["environment"] = environment(ctx)
    on_sigterm_stop()
    t0 = time.perf_counter()
    try:
        for name in names:
            run_section(name, ctx, report)
    except Terminated:
        report["result"] = "FAILED: stopped by a signal (the timeout?)"
    finally:
        shutdown_ray()
        failed = [n for n, s in report["sections"].items() if s["status"] != "ok" and s["status"] != "skipped"]
        report.setdefault("result", f"FAILED: {', '.join(failed)}" if failed else "OK")
        report["seconds"] = round(time.perf_counter() - t0, 1)
        write_report(report, args.out)
        shutil.rmtree(work, ignore_errors=True)
    log(f"{report['result']} in {report['seconds']}s; report: {args.out / 'report.md'}")
    return 0 if report["result"] == "OK" else 1


def _terminate(signum: int, frame: Any) -> None:
    raise Terminated(f"signal {signum}")


def on_sigterm_stop() -> None:
    """SIGTERM (the wrapper's deadline) raises Terminated; called again after ray.init, which installs its own."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _terminate)


def is_stop(e: BaseException) -> bool:
    """A signal asking the run to end: ours, Ray's SIGTERM handler (SystemExit 15) or Ctrl-C."""
    return isinstance(e, (Terminated, KeyboardInterrupt)) or (isinstance(e, SystemExit) and e.code in (15, 143))


def shutdown_ray() -> None:
    """Ray down, if a section left it up (sections shut down what they start; this covers an interrupted one)."""
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        ray.shutdown()


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    # the report is written and Ray is down: exit now, not after threads an interrupted Ray Data run left behind
    os._exit(code)
