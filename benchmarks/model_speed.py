"""Model-speed benchmark: tokens/s of a jina-embeddings-v3-sized random checkpoint (24 x 1024).

Run from the repository root:

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/model_speed.py              # CPU: fp32 + bf16
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/model_speed.py --device cuda # GPU: bf16 + MFU

What it does:

1. Writes a random-weight checkpoint in the ORIGINAL jina-embeddings-v3 layout (the key names and
   stacked LoRA shapes of `jinaai/jina-embeddings-v3`: per Linear/Embedding a `parametrizations.weight`
   LoRA with one A/B slice per task, see tests/fixtures/jina-embeddings-v3-tiny/README.md) at full v3 size: hidden 1024, 24 layers,
   16 heads, intermediate 4096, 5 LoRA tasks of rank 4 on every Linear and Embedding (pooler
   included). config.json is the tiny fixture's with the sizes changed; the tokenizer files are the
   fixture's. Only the vocabulary is NOT full size: the fixture's tokenizer has 1,501 pieces, so the
   embedding table is [1501, 1024] instead of [250002, 1024] (1.2 GB fp32 instead of 2.3 GB). The
   embedding table is a lookup, so this changes nothing in the per-token compute except the
   (negligible) gather. The key set and shapes are checked against the fixture's own checkpoint by
   generating the same layout at the fixture's sizes first.
2. Loads it through the real path (`load_family(ModelSpec(name="jina-embeddings-v3", ...))`, then
   `Embedder`, which builds the tokenizer and the encoder: safetensors read, key conversion, Wqkv
   split, LoRA hooks) and reports the load times.
3. For each dtype and sequence length, feeds synthetic token ids of EXACTLY that length (`<s>`,
   random ids of the vocabulary, `</s>`; no padding) in batches of `--batch-tokens // length` rows
   to `Embedder.embed_ids` (pad + encoder forward with the task's LoRA + fp32 mean pooling + L2
   norm), one batch per call: one warm-up batch (reported as "first batch"), then `--repeats`
   timed batches; tokens/s is from the median batch time. "CPU-s / wall-s" is the process CPU time
   over the wall time of a batch (ideally = torch threads): below that, other processes took the cores.
4. FLOPs per token (forward): 2 x (Linear weight parameters of the encoder) + the LoRA deltas'
   2 x r x (in + out) per Linear + attention 4 x L x d per layer (QK^T and AV, bidirectional, full
   length L). LayerNorm, GELU, softmax, RoPE, pooling are not counted. Achieved GFLOP/s =
   FLOPs/token x tokens/s. On CUDA it also reports MFU against the GPU's dense bf16 peak
   (`--peak-tflops`, or a small table of known GPUs).

The checkpoint goes into a temporary directory deleted at the end, or into `--workdir` (kept, and
reused when its config matches). Timings on a shared machine are noisy: medians are reported, and
the load average before/after each setting is printed.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import resource
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np
from machine_info import cpu_name, loadavg, log
import torch

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "fixtures" / "jina-embeddings-v3-tiny"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
FAMILY = "jina-embeddings-v3"

# jina-embeddings-v3 sizes (MODELS.md section 1.1); the vocabulary stays the fixture's
V3_SIZES = {"hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16, "intermediate_size": 4096}

# dense (no sparsity) bf16 tensor-core peak, TFLOP/s, from NVIDIA's data sheets; matched in order
# against torch.cuda.get_device_name() (lower-cased). --peak-tflops overrides.
GPU_BF16_PEAK_TFLOPS: list[tuple[str, float]] = [
    ("h200 nvl", 835.5),
    ("h200", 989.4),  # H200 SXM
    ("h100 nvl", 835.5),
    ("h100 pcie", 756.5),
    ("h100", 989.4),  # H100 SXM5 ("NVIDIA H100 80GB HBM3")
    ("a100", 312.0),
    ("l40s", 362.1),
    ("l4", 121.0),
]


# ------------------------------------------------------------------------------ the checkpoint


def v3_tensor_shapes(cfg: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Key -> shape of an original jina-embeddings-v3 state dict (`XLMRobertaLoRA.state_dict()`)."""
    h, n_layers, inter = cfg["hidden_size"], cfg["num_hidden_layers"], cfg["intermediate_size"]
    vocab, types = cfg["vocab_size"], cfg.get("type_vocab_size", 1)
    t, r = len(cfg["lora_adaptations"]), int(cfg["lora_rank"])
    out: dict[str, tuple[int, ...]] = {}

    def embedding(name: str, num: int) -> None:  # embedding LoRA: A [T, num, r], B [T, r, dim]
        p = f"{name}.parametrizations.weight"
        out[f"{p}.original"] = (num, h)
        out[f"{p}.0.lora_A"] = (t, num, r)
        out[f"{p}.0.lora_B"] = (t, r, h)

    def linear(name: str, fan_in: int, fan_out: int) -> None:  # linear LoRA: A [T, r, in], B [T, out, r]
        p = f"{name}.parametrizations.weight"
        out[f"{p}.original"] = (fan_out, fan_in)
        out[f"{p}.0.lora_A"] = (t, r, fan_in)
        out[f"{p}.0.lora_B"] = (t, fan_out, r)
        out[f"{name}.bias"] = (fan_out,)

    embedding("roberta.embeddings.word_embeddings", vocab)
    embedding("roberta.embeddings.token_type_embeddings", types)
    out["roberta.emb_ln.weight"] = out["roberta.emb_ln.bias"] = (h,)
    for i in range(n_layers):
        p = f"roberta.encoder.layers.{i}"
        linear(f"{p}.mixer.Wqkv", h, 3 * h)  # rows [q | k | v]
        linear(f"{p}.mixer.out_proj", h, h)
        linear(f"{p}.mlp.fc1", h, inter)
        linear(f"{p}.mlp.fc2", inter, h)
        for norm in ("norm1", "norm2"):
            out[f"{p}.{norm}.weight"] = out[f"{p}.{norm}.bias"] = (h,)
    linear("roberta.pooler.dense", h, h)  # in the real checkpoints, unused for embeddings
    return out


def check_layout_against_fixture() -> None:
    """The generator's keys and shapes at the fixture's sizes must be exactly the fixture's."""
    from safetensors import safe_open

    cfg = json.loads((FIXTURE / "config.json").read_text())
    want = v3_tensor_shapes(cfg)
    with safe_open(str(FIXTURE / "model.safetensors"), "pt") as f:
        have = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118
    if want != have:
        missing, extra = sorted(set(have) - set(want)), sorted(set(want) - set(have))
        wrong = sorted(k for k in set(want) & set(have) if want[k] != have[k])
        raise SystemExit(f"generated layout differs from the fixture: missing {missing[:5]}, extra {extra[:5]}, "
                         f"wrong shapes {wrong[:5]}")


def bench_config(sizes: dict[str, int], ckpt_dtype: str) -> dict[str, Any]:
    """The fixture's config.json with the model sizes changed (vocabulary kept)."""
    cfg = json.loads((FIXTURE / "config.json").read_text())
    cfg = copy.deepcopy(cfg)
    cfg.update(sizes)
    h = cfg["hidden_size"]
    cfg["matryoshka_dimensions"] = [d for d in (32, 64, 128, 256, 512, 768, 1024) if d <= h] or [h]
    cfg["torch_dtype"] = ckpt_dtype
    return cfg


def write_checkpoint(folder: Path, cfg: dict[str, Any], ckpt_dtype: str, seed: int = 0) -> dict[str, Any]:
    """Random weights in the original v3 layout + config.json + the fixture's tokenizer files."""
    from safetensors.torch import save_file

    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[ckpt_dtype]
    gen = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    tensors: dict[str, torch.Tensor] = {}
    for key, shape in v3_tensor_shapes(cfg).items():
        if key.endswith(("emb_ln.weight", "norm1.weight", "norm2.weight")):
            x = torch.ones(shape)
        elif key.endswith(("emb_ln.bias", "norm1.bias", "norm2.bias")):
            x = torch.zeros(shape)
        else:  # weights, biases and LoRA A/B: N(0, 0.02^2), non-zero so every LoRA delta is real work
            x = torch.randn(shape, generator=gen) * 0.02
        tensors[key] = x.to(dtype).contiguous()
    gen_s = time.perf_counter() - t0
    folder.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    for name in TOKENIZER_FILES:
        shutil.copyfile(FIXTURE / name, folder / name)
    write_s = time.perf_counter() - t0
    n_params = sum(t.numel() for t in tensors.values())
    size = (folder / "model.safetensors").stat().st_size
    return {"gen_s": gen_s, "write_s": write_s, "params_in_file": n_params, "bytes": size}


def reuse_ok(folder: Path, cfg: dict[str, Any]) -> bool:
    f = folder / "config.json"
    return (folder / "model.safetensors").exists() and f.exists() and json.loads(f.read_text()) == cfg


# ------------------------------------------------------------------------------ FLOPs


def flops_per_token(encoder, seq_len: int) -> dict[str, float]:
    """Forward FLOPs per token of the loaded encoder at sequence length `seq_len` (see module doc)."""
    from torch import nn

    model = encoder.backbone.model
    linear_params = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))
    lora = 0
    for mod in encoder.backbone.lora.values():  # one task's A[t] and B[t] per hooked module
        if mod.kind == "linear":
            lora += 2 * (mod.A[0].numel() + mod.B[0].numel())
        else:  # embedding: gather from A, then [r] x [r, d]
            lora += 2 * mod.B[0].numel()
    cfg = model.config
    attn = 4 * seq_len * cfg.hidden_size * cfg.num_hidden_layers
    return {"linear": 2.0 * linear_params, "lora": float(lora), "attention": float(attn),
            "total": 2.0 * linear_params + lora + attn, "linear_params": float(linear_params)}


def gpu_peak_tflops(device: torch.device, override: float | None) -> tuple[float | None, str]:
    if override:
        return override, "--peak-tflops"
    if device.type != "cuda":
        return None, "none (CPU: pass --peak-tflops for an MFU figure)"
    name = torch.cuda.get_device_name(device).lower()
    for key, peak in GPU_BF16_PEAK_TFLOPS:
        if key in name:
            return peak, f"table ({key}, dense bf16)"
    return None, f"unknown GPU {name!r}: pass --peak-tflops"


# ------------------------------------------------------------------------------ measuring


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def synthetic_ids(rows: int, length: int, vocab: int, rng: np.random.Generator) -> list[np.ndarray]:
    """`rows` id arrays of exactly `length` tokens: <s>, random non-special ids, </s>."""
    out = []
    for _ in range(rows):
        x = rng.integers(4, vocab - 1, size=length, dtype=np.int64)  # skip <s> <pad> </s> <unk> and <mask>
        x[0], x[-1] = 0, 2
        out.append(x.astype(np.int32))
    return out


def measure(embedder, device: torch.device, length: int, batch_tokens: int, repeats: int, task: str,
            vocab: int, seed: int, warmup: bool) -> dict[str, Any]:
    """`repeats` timed batches of rows x length tokens (after one untimed warm-up batch when `warmup`)."""
    rows = max(1, batch_tokens // length)
    rng = np.random.default_rng(seed)
    times: list[float] = []
    cpu: list[float] = []
    load_before = loadavg()
    first = None
    for i in range(repeats + int(warmup)):
        is_warm = warmup and i == 0
        dt = run_batch(embedder, device, synthetic_ids(rows, length, vocab, rng), task, None if is_warm else cpu)
        if is_warm:
            first = dt
        else:
            times.append(dt)
        log(f"    L={length} rows={rows} batch {i}{' (warm-up)' if is_warm else ''}: {dt:.2f}s "
            f"({rows * length / dt:,.0f} tok/s)")
    med = statistics.median(times)
    return {"length": length, "rows": rows, "tokens_per_batch": rows * length, "first_s": first,
            "times_s": times, "median_s": med, "tokens_per_s": rows * length / med,
            "best_tokens_per_s": rows * length / min(times), "cpu_s": cpu,
            "cpu_share": statistics.median(c / t for c, t in zip(cpu, times)),
            "load_before": load_before, "load_after": loadavg()}


def run_batch(embedder, device: torch.device, ids: list[np.ndarray], task: str,
              cpu_times: list[float] | None = None) -> float:
    """Wall seconds for one `Embedder.embed_ids` call (one batch); appends its process CPU seconds
    (all threads) to `cpu_times`: on a shared CPU, cpu_s / wall_s < threads shows the contention."""
    sync(device)
    c0, t0 = time.process_time(), time.perf_counter()
    vecs = embedder.embed_ids(ids, task)  # ends with .cpu(): a sync point on CUDA too
    sync(device)
    dt = time.perf_counter() - t0
    if cpu_times is not None:
        cpu_times.append(time.process_time() - c0)
    if not np.isfinite(vecs).all():
        raise SystemExit("non-finite embeddings")
    return dt




def machine(device: torch.device) -> str:
    import transformers

    from embindex.models.device import cpu_supports_bf16

    if device.type == "cuda":
        dev = torch.cuda.get_device_name(device)
    else:
        isa = "bf16 ISA (avx512_bf16/amx_bf16)" if cpu_supports_bf16() else "no bf16 ISA"
        dev = f"{cpu_name()} ({os.cpu_count()} cores, {isa}), torch threads {torch.get_num_threads()}"
    return (f"{dev}; torch {torch.__version__}, transformers {transformers.__version__}, "
            f"Python {platform.python_version()}")


# ------------------------------------------------------------------------------ main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="auto", help="cpu | cuda | auto (cuda when available)")
    p.add_argument("--dtypes", default=None,
                   help="comma list of float32,bfloat16 (default: float32,bfloat16 on CPU, bfloat16 on CUDA)")
    p.add_argument("--lengths", default="128,512,2048", help="sequence lengths in tokens (comma list)")
    p.add_argument("--batch-tokens", type=int, default=None,
                   help="tokens per batch: rows = batch_tokens // length (default 2048 CPU, 65536 CUDA)")
    p.add_argument("--repeats", type=int, default=None, help="timed batches per setting after one warm-up "
                   "(default 2 CPU, 10 CUDA)")
    p.add_argument("--warmup", default=None, choices=["per-setting", "per-dtype"],
                   help="one untimed batch before each (dtype, length) setting, or one short batch "
                   "(1 row of the first length) per dtype (default: per-setting on CUDA, per-dtype on CPU, "
                   "where a 24x1024 batch takes a minute)")
    p.add_argument("--task", default="retrieval.passage", help="LoRA task (or 'none' for the base weights)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: all cores)")
    p.add_argument("--ckpt-dtype", default="float32", choices=["float32", "bfloat16"],
                   help="dtype the checkpoint is written in (bfloat16 halves disk and read time)")
    p.add_argument("--workdir", default=None, help="keep the checkpoint here (reused if its config matches)")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="peak TFLOP/s for MFU (default on CUDA: the GPU's dense bf16 peak from a table)")
    p.add_argument("--layers", type=int, default=V3_SIZES["num_hidden_layers"])
    p.add_argument("--hidden", type=int, default=V3_SIZES["hidden_size"])
    p.add_argument("--heads", type=int, default=V3_SIZES["num_attention_heads"])
    p.add_argument("--intermediate", type=int, default=V3_SIZES["intermediate_size"])
    p.add_argument("--json", default=None, help="also write all results to this JSON file")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from embindex.models import ModelSpec, load_family
    from embindex.models.embedder import Embedder

    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    if args.threads:
        torch.set_num_threads(args.threads)
    cuda = device.type == "cuda"
    dtypes = (args.dtypes or ("bfloat16" if cuda else "float32,bfloat16")).split(",")
    lengths = [int(x) for x in args.lengths.split(",")]
    batch_tokens = args.batch_tokens or (65536 if cuda else 2048)
    repeats = args.repeats or (10 if cuda else 2)
    warmup = args.warmup or ("per-setting" if cuda else "per-dtype")
    sizes = {"hidden_size": args.hidden, "num_hidden_layers": args.layers,
             "num_attention_heads": args.heads, "intermediate_size": args.intermediate}
    peak, peak_src = gpu_peak_tflops(device, args.peak_tflops)

    check_layout_against_fixture()
    cfg = bench_config(sizes, args.ckpt_dtype)
    t0 = time.perf_counter()
    from transformers import JinaEmbeddingsV3Model  # noqa: F401  (import once, outside the load timing)

    import_s = time.perf_counter() - t0
    tmp = None
    if args.workdir:
        folder = Path(args.workdir)
    else:
        tmp = tempfile.mkdtemp(prefix="embindex-model-speed-")
        folder = Path(tmp)
    results: dict[str, Any] = {"machine": machine(device), "device": str(device), "sizes": sizes,
                               "vocab_size": cfg["vocab_size"], "batch_tokens": batch_tokens,
                               "repeats": repeats, "task": args.task, "settings": [], "loads": [],
                               "import_s": import_s, "warmup": warmup}
    try:
        if args.workdir and reuse_ok(folder, cfg):
            log(f"reusing checkpoint in {folder}")
            results["checkpoint"] = {"reused": True, "bytes": (folder / "model.safetensors").stat().st_size}
        else:
            log(f"writing random {args.ckpt_dtype} checkpoint ({sizes}, vocab {cfg['vocab_size']}) to {folder}")
            results["checkpoint"] = write_checkpoint(folder, cfg, args.ckpt_dtype, args.seed)
            log(f"  {results['checkpoint']}")
        for dtype in dtypes:
            spec = ModelSpec(name=FAMILY, path=str(folder), dtype=dtype, task=args.task)
            t0 = time.perf_counter()
            family = load_family(spec)  # config + safetensors header validation
            t1 = time.perf_counter()
            embedder = Embedder(family, device=device, batch_tokens=batch_tokens)  # tokenizer + weights
            sync(device)
            t2 = time.perf_counter()
            load = {"dtype": dtype, "validate_s": t1 - t0, "load_s": t2 - t1, "total_s": t2 - t0}
            results["loads"].append(load)
            log(f"[{dtype}] load: validate {load['validate_s']:.2f}s + tokenizer/encoder {load['load_s']:.2f}s")
            if warmup == "per-dtype":
                rng = np.random.default_rng(args.seed)
                load["warmup_batch"] = f"1 x {lengths[0]}"
                load["warmup_s"] = run_batch(embedder, device, synthetic_ids(1, lengths[0], cfg["vocab_size"], rng),
                                             args.task)
                log(f"  warm-up batch 1 x {lengths[0]}: {load['warmup_s']:.2f}s")
            for length in lengths:
                if length > embedder.info.max_length:
                    log(f"  skip L={length}: above max_length {embedder.info.max_length}")
                    continue
                r = measure(embedder, device, length, batch_tokens, repeats, args.task, cfg["vocab_size"],
                            args.seed + length, warmup == "per-setting")
                fl = flops_per_token(embedder.encoder, length)
                r.update(dtype=dtype, flops_per_token=fl["total"], flops_breakdown=fl,
                         gflops_s=fl["total"] * r["tokens_per_s"] / 1e9)
                if peak and dtype in ("bfloat16", "float16"):
                    r["mfu"] = r["gflops_s"] / (peak * 1e3)
                if cuda:
                    r["max_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
                results["settings"].append(r)
                log(f"  [{dtype}] L={length}: median {r['median_s']:.2f}s/batch, {r['tokens_per_s']:,.0f} tok/s, "
                    f"{r['gflops_s']:,.0f} GFLOP/s" + (f", MFU {r['mfu']:.1%}" if "mfu" in r else ""))
            del embedder, family
            if cuda:
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    results["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    results["peak_tflops"], results["peak_source"] = peak, peak_src
    print_report(results, argv)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


def print_report(res: dict[str, Any], argv: list[str] | None) -> None:
    cmd = " ".join(["benchmarks/model_speed.py", *(argv if argv is not None else sys.argv[1:])])
    s = res["sizes"]
    ck = res["checkpoint"]
    warm = ("1 untimed warm-up batch per setting" if res["warmup"] == "per-setting"
            else "1 untimed warm-up batch per dtype")
    print(f"command: {cmd}")
    print(f"machine: {res['machine']}")
    print(f"model: {s['num_hidden_layers']} layers x {s['hidden_size']} (heads {s['num_attention_heads']}, "
          f"intermediate {s['intermediate_size']}), vocab {res['vocab_size']}, task {res['task']}; "
          f"checkpoint {ck.get('bytes', 0) / 1e9:.2f} GB" + ("" if ck.get("reused") else
          f" (generated in {ck['gen_s']:.1f}s, written in {ck['write_s']:.1f}s)"))
    print(f"batch: {res['batch_tokens']} tokens (rows = budget // length); {warm}, then {res['repeats']} timed "
          f"batches per setting; peak RSS {res['peak_rss_gib']:.2f} GiB; MFU peak: {res['peak_source']}"
          + (f" = {res['peak_tflops']} TFLOP/s" if res["peak_tflops"] else ""))
    print()
    print(f"(transformers import, done once before the loads: {res['import_s']:.1f} s)")
    print()
    print("| dtype | load: validate + tokenizer/weights | warm-up batch |")
    print("|---|---|---|")
    for ld in res["loads"]:
        wu = f"{ld['warmup_batch']}: {ld['warmup_s']:.1f} s" if "warmup_s" in ld else "per setting"
        print(f"| {ld['dtype']} | {ld['total_s']:.2f} s ({ld['validate_s']:.2f} + {ld['load_s']:.2f}) | {wu} |")
    print()
    mfu = res["peak_tflops"] is not None
    cols = ["dtype", "length", "rows x length", "batch s (each)", "median batch s", "tokens/s (median)",
            "tokens/s (best)", "CPU-s / wall-s", "GFLOP/token", "GFLOP/s (median)"] + (["MFU"] if mfu else []) + [
            "load avg before → after"]
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in res["settings"]:
        each = ", ".join(f"{t:.2f}" for t in r["times_s"])
        if r["first_s"] is not None:
            each = f"({r['first_s']:.2f}) " + each
        row = [r["dtype"], str(r["length"]), f"{r['rows']} x {r['length']}", each, f"{r['median_s']:.2f}",
               f"{r['tokens_per_s']:,.0f}", f"{r['best_tokens_per_s']:,.0f}", f"{r['cpu_share']:.2f}",
               f"{r['flops_per_token'] / 1e9:.3f}",
               f"{r['gflops_s']:,.0f}"]
        if mfu:
            row.append(f"{r['mfu']:.1%}" if "mfu" in r else "n/a")
        row.append(f"{r['load_before']} → {r['load_after']}")
        print("| " + " | ".join(row) + " |")
    by = {(r["dtype"], r["length"]): r["tokens_per_s"] for r in res["settings"]}
    ratios = [f"L={L}: {by[('bfloat16', L)] / by[('float32', L)]:.2f}x"
              for (d, L) in by if d == "float32" and ("bfloat16", L) in by]
    if ratios:
        print()
        print("bf16 / fp32 tokens/s (medians): " + ", ".join(ratios))


if __name__ == "__main__":
    sys.exit(main())
