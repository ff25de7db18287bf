"""Reranker throughput: jina-reranker-v2 / v3 / m0 on the tiny fixtures and on random real-size checkpoints.

Run from the repository root:

    .venv/bin/python benchmarks/rerank.py --sizes tiny real                   # CPU: a few minutes on 2 cores
    .venv/bin/python benchmarks/rerank.py --sizes real --families v3          # one family
    .venv/bin/python benchmarks/rerank.py --sizes real --device cuda --docs 64 --repeats 10 --json rerank.json

What it does:

1. Checkpoints. `tiny`: the test fixtures tests/fixtures/jina-reranker-{v2,v3,m0}-tiny as they are.
   `real`: random weights (matrices N(0, 0.02^2), norm weights 1, biases 0) with the REAL architectures
   written into a temporary directory (or `--workdir`, reused when its generation parameters match):
   config.json is the fixture's with the sizes changed, the tokenizer / preprocessor files are copied from
   the fixture, and model.safetensors has the family's real key layout. The key sets come from the
   family's own modules built on the meta device (v2: transformers' XLMRobertaForSequenceClassification with
   q/k/v fused back into `mixer.Wqkv` and the names turned back into the checkpoint's; v3: Qwen3Model under
   `model.` + `projector.{0,2}`; m0: the family's `_M0Module` in the legacy Qwen2-VL layout + `lm_head`);
   they are first generated at the fixture's sizes and must reproduce the fixture's keys and shapes.
   Real sizes: v2 = XLM-R base (768 hidden, 12 layers, 12 heads, 3072 intermediate, 1026 positions);
   v3 = Qwen3-0.6B (1024 hidden, 28 layers, 16 / 8 KV heads, head_dim 128, 3072 intermediate) +
   projector 1024 -> 512 -> 512; m0 = Qwen2-VL-2B (1536 hidden, 28 layers, 12 / 2 KV heads, 8960
   intermediate, M-RoPE [16, 24, 24]; vision 32 blocks x 1280, 16 heads, mlp_ratio 4). Only the
   vocabulary is NOT real: it is the fixture tokenizer's (v2 1,501 instead of 250,002; v3 1,040 and
   m0 1,024 instead of 151,936). The embedding table is a lookup, so this changes no per-token compute
   (m0's unused, tied `lm_head` is never run either). Weights are stored bfloat16 (`--ckpt-dtype`) and cast
   to the run dtype at load.
2. Inputs: synthetic English-word texts cut to exactly `--doc-tokens` / `--query-tokens` tokens of each
   family's own tokenizer; m0 also gets `--images` synthetic RGB images of `--image-size` px as documents
   (a text query). Default workload per size: tiny = 4 queries x 32 documents, real = 1 query x 16
   documents (2 CPU cores), 200-token documents, 2 images of 336 px. All documents have the same length,
   so batches carry no padding; real corpora add some.
3. Throughput: each family is loaded with `load_reranker` (its default batching options unless `--set`)
   and called through the public interface, `Reranker.score_many([(query, docs), ...])`: one untimed
   warm-up call (the first query with 2 documents), then `--repeats` timed calls; the rate is from the
   median call. v2 and m0 are pairwise: pairs/s; v3 is listwise: documents/s (the same count). The
   batching policy, forwards per call and model tokens per call (real / padded) are printed beside it.
4. v3 listwise vs pairwise: the first query's N documents in ONE listwise forward
   (`forward_block(query, docs)`) against N forwards of a one-passage prompt (`forward_block(query,
   [doc])`, the same backbone and projector), timed the same way; speedup = listwise docs/s / pairwise
   docs/s. The v2 (pairwise cross-encoder) documents/s of the same size is printed next to it.

Scores of random weights mean nothing; only the shapes, hence the compute, are real. Default dtype:
bfloat16 on CUDA and on a CPU with bf16 instructions (AVX512-BF16 / AMX), else float32 (`--dtype`).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import re
import resource
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np
import torch
from machine_info import cpu_name, loadavg, log

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"
COPIED_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                "preprocessor_config.json")
NAMES = {"v2": "jina-reranker-v2", "v3": "jina-reranker-v3", "m0": "jina-reranker-m0"}
REAL_VOCAB = {"v2": 250002, "v3": 151936, "m0": 151936}

# config.json fields of the real architectures (the fixture's config.json with these values set)
REAL_SIZES: dict[str, dict[str, Any]] = {
    "v2": {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072,
           "max_position_embeddings": 1026},
    "v3": {"hidden_size": 1024, "num_hidden_layers": 28, "num_attention_heads": 16, "num_key_value_heads": 8,
           "head_dim": 128, "intermediate_size": 3072, "max_window_layers": 28},
    "m0": {"hidden_size": 1536, "num_hidden_layers": 28, "num_attention_heads": 12, "num_key_value_heads": 2,
           "intermediate_size": 8960, "max_window_layers": 28,
           "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
           "vision_config": {"depth": 32, "embed_dim": 1280, "num_heads": 16, "hidden_size": 1536, "mlp_ratio": 4}},
}
NORM_KEYS = ("norm", "LayerNorm", "emb_ln", "ln_q")

WORDS = ("search relevance model query passage document ranking vector index token batch score language "
         "retrieval embedding network layer attention window listwise pairwise encoder decoder image text "
         "quality latency throughput memory compute device kernel matrix cosine sigmoid logit training data "
         "corpus shard manifest tier cluster storage reader writer parquet format schema version release "
         "benchmark measure result table machine core thread python library function module package").split()


@dataclass
class Workload:
    """What one timed call scores."""

    queries: int
    docs: int
    doc_tokens: int
    query_tokens: int
    images: int
    image_size: int
    repeats: int


# ------------------------------------------------------------------------------ checkpoint layouts


def header_shapes(file: Path) -> dict[str, tuple[int, ...]]:
    from safetensors import safe_open

    with safe_open(str(file), "pt") as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118


def v2_checkpoint_key(native: str) -> str:
    """Native XLMRobertaForSequenceClassification key (q/k/v fused as `qkv`) -> the checkpoint's key."""
    from embindex.models.jina_reranker_v2 import _LAYER_RENAME

    if native.startswith("roberta.embeddings.LayerNorm."):
        return "roberta.emb_ln." + native[len("roberta.embeddings.LayerNorm."):]
    m = re.match(r"^roberta\.encoder\.layer\.(\d+)\.(.+)$", native)
    if m:
        for old, new in _LAYER_RENAME.items():
            if m.group(2).startswith(new):
                return f"roberta.encoder.layers.{m.group(1)}.{old}{m.group(2)[len(new):]}"
    return native


def v2_shapes(folder: Path) -> dict[str, tuple[int, ...]]:
    """Checkpoint key -> shape, from the family's native module (meta device)."""
    from transformers import XLMRobertaForSequenceClassification

    from embindex.models.checkpoint_files import read_config
    from embindex.models.jina_reranker_v2 import _fused_expected, checkpoint_name, xlmr_config

    with torch.device("meta"):
        model = XLMRobertaForSequenceClassification(xlmr_config(read_config(str(folder)), str(folder)))
    out = {}
    for native, t in _fused_expected(model).items():
        key = v2_checkpoint_key(native)
        if checkpoint_name(key) != native:  # the loader must map it back
            raise SystemExit(f"v2: {native} -> {key} does not round-trip through the loader's renaming")
        out[key] = tuple(t.shape)
    return out


def v3_shapes(folder: Path) -> dict[str, tuple[int, ...]]:
    """`model.*` of Qwen3Model + the bias-free projector h -> h/2 -> 512."""
    from transformers import Qwen3Config, Qwen3Model

    from embindex.models.jina_reranker_v3 import PROJECTOR_DIM

    config = Qwen3Config.from_pretrained(str(folder), local_files_only=True)
    with torch.device("meta"):
        model = Qwen3Model(config)
    out = {f"model.{k}": tuple(v.shape) for k, v in model.state_dict().items()}
    h = int(config.hidden_size)
    out.update({"projector.0.weight": (h // 2, h), "projector.2.weight": (PROJECTOR_DIM, h // 2)})
    return out


def m0_shapes(folder: Path) -> dict[str, tuple[int, ...]]:
    """The family's `_M0Module` in the legacy Qwen2-VL layout (`visual.*`, `model.*`, `score.*`) + `lm_head`."""
    from embindex.models.jina_reranker_m0 import _M0Module, _qwen2vl_config

    config = _qwen2vl_config(str(folder))
    with torch.device("meta"):
        module = _M0Module(config)
    out: dict[str, tuple[int, ...]] = {}
    for k, v in module.state_dict().items():
        if k.startswith("model.language_model."):
            k = "model." + k[len("model.language_model."):]
        elif k.startswith("model.visual."):
            k = k[len("model."):]
        out[k] = tuple(v.shape)
    tc = config.text_config
    out["lm_head.weight"] = (int(tc.vocab_size), int(tc.hidden_size))  # tied to the embeddings, ignored on load
    return out


SHAPES: dict[str, Callable[[Path], dict[str, tuple[int, ...]]]] = {"v2": v2_shapes, "v3": v3_shapes, "m0": m0_shapes}


def check_layout(fam: str) -> None:
    """The generator at the fixture's sizes must give exactly the fixture's keys and shapes."""
    fixture = FIXTURES / f"{NAMES[fam]}-tiny"
    want, have = SHAPES[fam](fixture), header_shapes(fixture / "model.safetensors")
    if want != have:
        missing, extra = sorted(set(have) - set(want)), sorted(set(want) - set(have))
        wrong = sorted(k for k in set(want) & set(have) if want[k] != have[k])
        raise SystemExit(f"{fam}: generated layout differs from the fixture: missing {missing[:5]}, "
                         f"extra {extra[:5]}, wrong shapes {wrong[:5]}")


# ------------------------------------------------------------------------------ real-size checkpoints


def real_config(fam: str) -> dict[str, Any]:
    """The fixture's config.json with the real sizes (vocabulary kept: it must match the tokenizer)."""
    cfg = copy.deepcopy(json.loads((FIXTURES / f"{NAMES[fam]}-tiny" / "config.json").read_text()))
    for key, value in REAL_SIZES[fam].items():
        if isinstance(value, dict) and isinstance(cfg.get(key), dict):
            cfg[key].update(value)
        else:
            cfg[key] = value
    return cfg


def random_tensor(key: str, shape: tuple[int, ...], gen: torch.Generator, dtype: torch.dtype) -> torch.Tensor:
    """Norm weights 1, biases 0, everything else N(0, 0.02^2)."""
    if key.endswith(".weight") and any(n in key for n in NORM_KEYS):
        return torch.ones(shape, dtype=dtype)
    if key.endswith(".bias"):
        return torch.zeros(shape, dtype=dtype)
    return torch.empty(shape, dtype=dtype).normal_(0.0, 0.02, generator=gen)


def write_real(fam: str, folder: Path, ckpt_dtype: str, seed: int) -> dict[str, Any]:
    """config.json, copied tokenizer files and random real-size weights in the real key layout."""
    from safetensors.torch import save_file

    fixture = FIXTURES / f"{NAMES[fam]}-tiny"
    cfg = real_config(fam)
    manifest = {"family": fam, "config": cfg, "ckpt_dtype": ckpt_dtype, "seed": seed}
    mfile = folder / "bench_manifest.json"
    if mfile.exists() and json.loads(mfile.read_text()) == manifest:
        return {"reused": True, "bytes": (folder / "model.safetensors").stat().st_size}
    t0 = time.perf_counter()
    folder.mkdir(parents=True, exist_ok=True)
    for name in COPIED_FILES:
        if (fixture / name).exists():
            shutil.copyfile(fixture / name, folder / name)
    (folder / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    gen = torch.Generator().manual_seed(seed)
    dtype = getattr(torch, ckpt_dtype)
    tensors = {k: random_tensor(k, s, gen, dtype) for k, s in SHAPES[fam](folder).items()}
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    params = sum(t.numel() for t in tensors.values())
    del tensors
    mfile.write_text(json.dumps(manifest) + "\n")
    os.sync()  # flush the new file now, not during the timed calls
    return {"reused": False, "write_s": time.perf_counter() - t0, "params_in_file": params,
            "bytes": (folder / "model.safetensors").stat().st_size}


# ------------------------------------------------------------------------------ inputs


def text_of_tokens(tok: Any, n: int, rng: np.random.Generator) -> str:
    """Random English words cut at exactly `n` tokens of `tok` (no special tokens)."""
    words = max(n, 8)
    while True:
        text = " ".join(rng.choice(WORDS, size=words))
        enc = tok.encode(text, add_special_tokens=False)
        if len(enc.ids) >= n:
            return text[: enc.offsets[n - 1][1]]
        words *= 2


def synthetic_image(size: int, rng: np.random.Generator) -> Any:
    """A smooth random colour field with noise, RGB PIL image of size x size."""
    from PIL import Image

    coarse = rng.integers(0, 256, size=(4, 4, 3), dtype=np.uint8)
    img = Image.fromarray(coarse).resize((size, size), Image.BICUBIC)
    arr = np.asarray(img, dtype=np.int16) + rng.integers(-12, 13, size=(size, size, 3))
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def make_requests(folder: Path, w: Workload, seed: int) -> list[tuple[str, list[str]]]:
    """`w.queries` (query, documents) requests in the tokenizer of the checkpoint at `folder`."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    tok.no_truncation()
    rng = np.random.default_rng(seed)
    return [(text_of_tokens(tok, w.query_tokens, rng), [text_of_tokens(tok, w.doc_tokens, rng) for _ in range(w.docs)])
            for _ in range(w.queries)]


# ------------------------------------------------------------------------------ batching policy and token counts


def padded(lengths: list[int], budget: int, rows: int) -> tuple[int, int]:
    """(forwards, padded tokens) of `token_budget_batches` over `lengths`."""
    from embindex.text.batching import token_budget_batches

    batches = list(token_budget_batches(lengths, budget, rows))
    return len(batches), sum(len(b) * max(lengths[i] for i in b) for b in batches)


def plan_v2(r: Any, requests: list[tuple[Any, list[Any]]]) -> dict[str, Any]:
    """v2's windows of all requests run in shared token-budget batches (`score_many`)."""
    o = r.options
    lengths = [len(x) for q, docs in requests for x in r.windows(q, docs, **r._window_args())[1]]
    forwards, pad = padded(lengths, o["batch_tokens"], o["batch_size"])
    return {"policy": f"pairwise; <= {o['batch_size']} rows and <= {o['batch_tokens']} padded tokens per forward, "
                      f"length-sorted across queries, right padding; windows of max_length {o['max_length']}",
            "batching": f"{o['batch_size']} rows / {o['batch_tokens']} tok",
            "forwards": forwards, "tokens": sum(lengths), "padded_tokens": pad}


def plan_v3(r: Any, requests: list[tuple[Any, list[Any]]]) -> dict[str, Any]:
    """v3: one forward per block of documents per query, no padding (blocks as `rerank_details` cuts them)."""
    from embindex.models.jina_reranker_v3 import split_blocks

    forwards = tokens = 0
    for q, docs in requests:
        query, q_len = r.truncate(q, r.max_query_length)
        cut = [r.truncate(d, r.max_doc_length) for d in docs]
        for idx in split_blocks([c[1] for c in cut], q_len, r.max_doc_length, r.max_length, r.block_size):
            forwards += 1
            tokens += prompt_tokens(r, query, [cut[i][0] for i in idx])
    return {"policy": f"listwise; one forward per block of <= {r.block_size} documents per query (budget max_length "
                      f"{r.max_length}, max_doc_length {r.max_doc_length}), no padding",
            "batching": f"block {r.block_size} docs", "forwards": forwards, "tokens": tokens, "padded_tokens": tokens}


def prompt_tokens(r: Any, query: str, docs: list[str]) -> int:
    """Tokens of v3's listwise prompt for `docs`."""
    from embindex.models.jina_reranker_v3 import format_prompt

    return len(r.tok.encode(format_prompt(query, docs), add_special_tokens=True).ids)


def plan_m0(r: Any, requests: list[tuple[Any, list[Any]]]) -> dict[str, Any]:
    """m0: per query, its pairs in token-budget batches (image tokens count), left padding."""
    forwards = tokens = pad = 0
    for q, docs in requests:
        pairs = [(("text", q), ("image", d) if not isinstance(d, str) else ("text", d)) for d in docs]
        rows, _ = r.build_inputs(pairs)
        lengths = [len(x.ids) for x in rows]
        f, p = padded(lengths, r.batch_tokens, r.batch_size)
        forwards, tokens, pad = forwards + f, tokens + sum(lengths), pad + p
    return {"policy": f"pairwise; <= {r.batch_size} pairs and <= {r.batch_tokens} padded tokens per forward "
                      f"(image tokens included), per query, left padding",
            "batching": f"{r.batch_size} pairs / {r.batch_tokens} tok",
            "forwards": forwards, "tokens": tokens, "padded_tokens": pad}


PLANS = {"v2": plan_v2, "v3": plan_v3, "m0": plan_m0}


# ------------------------------------------------------------------------------ timing


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_calls(fn: Callable[[], Any], repeats: int, device: torch.device) -> tuple[list[float], list[float]]:
    """(wall seconds, process CPU seconds) of `repeats` calls of `fn`; CPU-s / wall-s below the thread count
    means other processes took cores."""
    wall, cpu = [], []
    for _ in range(repeats):
        sync(device)
        c0, t0 = time.process_time(), time.perf_counter()
        fn()
        sync(device)
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return wall, cpu


def model_params(r: Any) -> int:
    mods = {"jina-reranker-v2": ("model",), "jina-reranker-v3": ("model", "projector"),
            "jina-reranker-m0": ("module",)}[r.name]
    return sum(p.numel() for m in mods for p in getattr(r, m).parameters())


def bench_requests(fam: str, label: str, r: Any, requests: list[tuple[Any, list[Any]]], repeats: int,
                   device: torch.device) -> dict[str, Any]:
    """One untimed warm-up call, then `repeats` timed `score_many` calls; rate from the median call."""
    n = sum(len(d) for _, d in requests)
    plan = PLANS[fam](r, requests)
    r.score_many([(requests[0][0], requests[0][1][:2])])  # warm-up
    t0 = loadavg()
    times, cpu = timed_calls(lambda: r.score_many(requests), repeats, device)
    med = statistics.median(times)
    res = {"family": fam, "workload": label, "items": n, "times_s": times, "median_s": med, "per_s": n / med,
           "cpu_share": statistics.median(c / t for c, t in zip(cpu, times)),
           "tokens_per_s": plan["tokens"] / med, "load_before": t0, "load_after": loadavg(), **plan}
    log(f"  {fam} {label}: {', '.join(f'{t:.2f}' for t in times)} s -> {res['per_s']:.2f} /s")
    return res


def v3_listwise_vs_pairwise(r: Any, query: str, docs: list[str], repeats: int, device: torch.device
                            ) -> dict[str, Any]:
    """The same N documents in one listwise forward vs N one-passage forwards."""
    r.forward_block(query, docs[:2])  # warm-up
    lw, lw_cpu = timed_calls(lambda: r.forward_block(query, docs), repeats, device)
    pw, pw_cpu = timed_calls(lambda: [r.forward_block(query, [d]) for d in docs], repeats, device)
    lw_tokens = prompt_tokens(r, query, docs)
    pw_tokens = sum(prompt_tokens(r, query, [d]) for d in docs)
    n = len(docs)
    out = {"docs": n, "listwise_times_s": lw, "pairwise_times_s": pw,
           "listwise_docs_per_s": n / statistics.median(lw), "pairwise_docs_per_s": n / statistics.median(pw),
           "listwise_tokens": lw_tokens, "pairwise_tokens": pw_tokens,
           "cpu_share": statistics.median(c / t for c, t in zip(lw_cpu + pw_cpu, lw + pw))}
    out["speedup"] = out["listwise_docs_per_s"] / out["pairwise_docs_per_s"]
    log(f"  v3 listwise {out['listwise_docs_per_s']:.2f} docs/s vs pairwise {out['pairwise_docs_per_s']:.2f} "
        f"docs/s: {out['speedup']:.2f}x")
    return out


# ------------------------------------------------------------------------------ one family at one size


def run_family(fam: str, size: str, folder: Path, w: Workload, args: argparse.Namespace, device: torch.device
               ) -> dict[str, Any]:
    from embindex.models.registry import load_reranker

    options = {k.split(".", 1)[1]: v for k, v in args.set if k.startswith(fam + ".")}
    t0 = time.perf_counter()
    r = load_reranker(NAMES[fam], str(folder), device=str(device), dtype=args.dtype, **options)
    sync(device)
    load_s = time.perf_counter() - t0
    cfg = json.loads((folder / "config.json").read_text())
    out: dict[str, Any] = {"family": fam, "size": size, "load_s": load_s, "params": model_params(r),
                           "vocab": cfg["vocab_size"], "real_vocab": REAL_VOCAB[fam], "options": options, "rows": []}
    log(f"[{size} {fam}] loaded in {load_s:.1f}s ({out['params'] / 1e6:.1f}M parameters)")
    requests = make_requests(folder, w, args.seed)
    label = f"{w.queries} q x {w.docs} docs x {w.doc_tokens} tok"
    out["rows"].append(bench_requests(fam, label, r, requests, w.repeats, device))
    if fam == "m0" and w.images:
        rng = np.random.default_rng(args.seed + 1)
        images = [synthetic_image(w.image_size, rng) for _ in range(w.images)]
        h, wd = r.prepare_image(images[0]).shape[:2]
        label = f"1 q x {w.images} images {wd}x{h}px ({h * wd // 14 ** 2} ViT patches each)"
        out["rows"].append(bench_requests(fam, label, r, [(requests[0][0], images)], w.repeats, device))
    if fam == "v3":
        out["listwise_vs_pairwise"] = v3_listwise_vs_pairwise(r, requests[0][0], requests[0][1], w.repeats, device)
    del r
    if device.type == "cuda":
        out["max_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    return out


def checkpoint_dir(fam: str, size: str, root: Path, args: argparse.Namespace) -> tuple[Path, dict[str, Any]]:
    """The fixture (tiny) or a freshly written / reused random real-size checkpoint."""
    if size == "tiny":
        return FIXTURES / f"{NAMES[fam]}-tiny", {"fixture": True}
    folder = root / f"{NAMES[fam]}-real"
    info = write_real(fam, folder, args.ckpt_dtype, args.seed)
    log(f"[real {fam}] random {args.ckpt_dtype} checkpoint in {folder}: {info}")
    return folder, info


# ------------------------------------------------------------------------------ report


def machine(device: torch.device, dtype: str) -> str:
    import transformers

    from embindex.models.device import cpu_supports_bf16

    if device.type == "cuda":
        dev = torch.cuda.get_device_name(device)
    else:
        isa = "bf16 ISA" if cpu_supports_bf16() else "no bf16 ISA"
        dev = f"{cpu_name()} ({os.cpu_count()} cores, {isa}), torch threads {torch.get_num_threads()}"
    return f"{dev}; {dtype}; torch {torch.__version__}, transformers {transformers.__version__}, " \
           f"Python {platform.python_version()}"


def print_report(res: dict[str, Any]) -> None:
    print(f"command: {res['command']}")
    print(f"machine: {res['machine']}")
    print()
    print("| size | family | params (vocab) | workload | batching | forwards/call | tokens/call (padded) "
          "| s/call (each) | CPU-s / wall-s | rate | model tok/s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for f in res["families"]:
        for r in f["rows"]:
            print("| " + " | ".join(table_row(f, r)) + " |")
    print()
    print("batching policy (family defaults unless --set):")
    for f in res["families"]:
        print(f"  {f['size']} {NAMES[f['family']]}: {f['rows'][0]['policy']}"
              + (f"; options {f['options']}" if f["options"] else ""))
    print()
    for line in ratio_lines(res):
        print(line)


def rate(x: float) -> str:
    """Two decimals below 10/s, one above."""
    return f"{x:.2f}" if x < 10 else f"{x:,.1f}"


def table_row(f: dict[str, Any], r: dict[str, Any]) -> list[str]:
    vocab = f"{f['vocab']:,}" + ("" if f["size"] == "tiny" else f" of {f['real_vocab']:,}")
    unit = "docs/s" if f["family"] == "v3" else "pairs/s"
    each = ", ".join(f"{t:.2f}" for t in r["times_s"])
    return [f["size"], NAMES[f["family"]], f"{f['params'] / 1e6:,.1f}M ({vocab})", r["workload"], r["batching"],
            str(r["forwards"]), f"{r['tokens']:,} ({r['padded_tokens']:,})", f"{r['median_s']:.2f} ({each})",
            f"{r['cpu_share']:.2f}", f"**{rate(r['per_s'])} {unit}**", f"{r['tokens_per_s']:,.0f}"]


def ratio_lines(res: dict[str, Any]) -> list[str]:
    """Per size: v3 listwise vs pairwise speedup, with v2's documents/s beside it."""
    lines = []
    for f in res["families"]:
        lp = f.get("listwise_vs_pairwise")
        if not lp:
            continue
        v2 = next((g for g in res["families"] if g["family"] == "v2" and g["size"] == f["size"]), None)
        v2_txt = f"; v2 pairwise {rate(v2['rows'][0]['per_s'])} docs/s ({v2['rows'][0]['workload']})" if v2 else ""
        lines.append(
            f"[{f['size']}] v3 listwise / pairwise, {lp['docs']} docs: {rate(lp['listwise_docs_per_s'])} / "
            f"{rate(lp['pairwise_docs_per_s'])} docs/s = **{lp['speedup']:.2f}x** (tokens {lp['listwise_tokens']:,} "
            f"in 1 forward vs {lp['pairwise_tokens']:,} in {lp['docs']}; CPU-s / wall-s {lp['cpu_share']:.2f})"
            f"{v2_txt}")
    return lines


# ------------------------------------------------------------------------------ main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", nargs="+", default=["tiny", "real"], choices=["tiny", "real"])
    p.add_argument("--families", nargs="+", default=["v2", "v3", "m0"], choices=["v2", "v3", "m0"])
    p.add_argument("--device", default="auto", help="cpu | cuda | auto (cuda when available)")
    p.add_argument("--dtype", default=None, help="float32 | bfloat16 (default: bfloat16 on CUDA or a bf16 CPU)")
    p.add_argument("--queries", type=int, default=None, help="queries per call (default: tiny 4, real 1)")
    p.add_argument("--docs", type=int, default=None, help="documents per query (default: tiny 32, real 16)")
    p.add_argument("--doc-tokens", type=int, default=200)
    p.add_argument("--query-tokens", type=int, default=16)
    p.add_argument("--images", type=int, default=2, help="m0: image documents (one text query)")
    p.add_argument("--image-size", type=int, default=336)
    p.add_argument("--repeats", type=int, default=None, help="timed calls (default: tiny 5, real 3 on CPU)")
    p.add_argument("--set", action="append", default=[], type=lambda s: tuple(s.split("=", 1)),
                   help="reranker option, e.g. --set v2.batch_size=16 --set m0.batch_tokens=8192")
    p.add_argument("--ckpt-dtype", default="bfloat16", choices=["float32", "bfloat16"])
    p.add_argument("--workdir", default=None, help="keep real-size checkpoints here (reused when they match)")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def workload(size: str, args: argparse.Namespace, cuda: bool) -> Workload:
    tiny = size == "tiny"
    return Workload(queries=args.queries or (4 if tiny else 1), docs=args.docs or (32 if tiny else 16),
                    doc_tokens=args.doc_tokens, query_tokens=args.query_tokens, images=args.images,
                    image_size=args.image_size, repeats=args.repeats or (5 if tiny or cuda else 3))


def main(argv: list[str] | None = None) -> int:
    from embindex.models.device import cpu_supports_bf16

    args = parse_args(argv)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    args.dtype = args.dtype or ("bfloat16" if device.type == "cuda" or cpu_supports_bf16() else "float32")
    for fam in args.families:
        check_layout(fam)
    tmp = None if args.workdir else tempfile.mkdtemp(prefix="embindex-rerank-")
    root = Path(args.workdir or tmp)
    res: dict[str, Any] = {"command": " ".join(["benchmarks/rerank.py", *(argv if argv is not None else sys.argv[1:])]),
                           "machine": machine(device, args.dtype), "device": str(device), "dtype": args.dtype,
                           "workloads": {}, "checkpoints": {}, "families": []}
    try:
        for size in args.sizes:
            w = workload(size, args, device.type == "cuda")
            res["workloads"][size] = asdict(w)
            for fam in args.families:
                folder, info = checkpoint_dir(fam, size, root, args)
                res["checkpoints"][f"{size}/{fam}"] = info
                res["families"].append(run_family(fam, size, folder, w, args, device))
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    res["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print_report(res)
    print(f"\npeak RSS {res['peak_rss_gib']:.1f} GiB; workloads {json.dumps(res['workloads'])}")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
