"""Image-speed benchmark: images/s of jina-clip-v2 and jina-embeddings-v4 beside the CPU preprocessing rate.

Run from the repository root:

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/image_speed.py                      # CPU: fp32 + bf16
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/image_speed.py --device cuda --v4-full  # GPU: bf16

The question it answers (the issue): how many images/s does one encoder (one embed actor on this CPU, or
one GPU) take, how many images/s does ONE CPU core prepare, and so how many CPU cores per actor the
preprocessing needs so that it is not what limits the encoder: `cores_needed = encoder img/s / prep img/s
per core`. Below 1 the encoder is the bottleneck (always the case on a CPU); on a GPU it is the number of
preprocessing cores to provision per GPU.

What it does:

1. Writes random-weight checkpoints (N(0, 0.02^2) weights and LoRA A/B, unit norm weights, zero
   biases; bfloat16 on disk by default, `--ckpt-dtype`) in the ORIGINAL key layouts of the two
   families -- the layouts of tests/fixtures/jina-clip-v2-tiny and tests/fixtures/jina-embeddings-v4-tiny
   (their README.md files describe the key layouts): config.json, preprocessor_config.json
   and the tokenizer files are the fixtures' with the sizes changed. The key generators are first run at
   the fixtures' own sizes and must reproduce the fixtures' key sets and shapes exactly.
   * jina-clip-v2: the vision tower at REAL size, EVA02-L/14 (width 1024, 24 blocks, head_width 64 ->
     16 heads, mlp_ratio 2.6667 -> SwiGLU hidden 2730, patch 14, pt_hw_seq_len 16) at image size 512
     (preprocessor `size` 512; the stride-14 convolution makes 36 x 36 = 1296 patches + CLS of the 512
     crop and ignores the last 8 pixel rows/columns, as the reference does). The text tower is
     NOT real size -- it is never run for images -- but the family needs text hidden == projection_dim ==
     vision width, so it is 1024 wide with `--clip-text-layers` (default 1) layers, 16 heads, 4096
     intermediate and the fixture's 1,501-piece vocabulary (one retrieval.query LoRA of rank 4).
   * jina-embeddings-v4: REAL widths -- text hidden 2048, 16 q-heads / 2 kv-heads, intermediate 11008,
     M-RoPE sections [16, 24, 24]; vision 1280 wide, 16 heads, intermediate 3420, patch 14, temporal patch 2,
     merge 2, window 112 px, out_hidden 2048; multi-vector projector 128; adapters retrieval / text-matching /
     code with r = 32, lora_alpha = 32 in the fixture's peft layout (q/k/v/o/gate/up/down of every text
     layer + the projector) -- but REDUCED DEPTH by default, because the 3.8B model takes more than a
     minute per image on 2 cores: `--v4-text-layers` (default 2 of 36) and `--v4-vision-layers` (default 4
     of 32); `--v4-full` gives 36 / 32 (for a GPU). Full-attention vision blocks: every 8th block as in
     the real model (7, 15, 23, 31); at a reduced depth with no 8th block, the last block is a
     full-attention one so both block kinds are measured. The vocabulary is the fixture tokenizer's
     (1,024 rows instead of 151,936: a lookup, no per-token compute). Preprocessor: min_pixels 3136,
     max_pixels 602112 (768 x 28 x 28, MODELS.md 2.4), OpenAI-CLIP mean/std.
   Every checkpoint is loaded through the real path: `load_family(ModelSpec(...))` (config + header
   validation), then `embindex.models.embedder.Embedder` (tokenizer + encoder: safetensors read, key
   conversion, LoRA / peft adapters).
2. Inputs: `--images` synthetic photo-like JPEGs (smooth random colour fields + gradients + per-pixel
   noise, quality 90, 4:2:0), sizes cycled from `--sizes` (default mostly 1280x960, plus 16:9, portrait,
   square and a 12 MP phone-camera size); encoded once up front. The noise makes them somewhat harder to
   decode than typical photos of the same size (more entropy-coded data).
3. Preprocessing (CPU, this one thread; Pillow, no torch): for each model, every JPEG through
   `embindex.models.images.decode_image` (open + full decode), then the family's `ImageProcessor`
   (`family.load_image_processor()`: clip = shortest-side bicubic resize to 512 + centre crop + RGB;
   v4 = RGB + Qwen2-VL smart_resize bicubic to multiples of 28 within max_pixels), then the `tobytes()` the
   pipeline does to ship the uint8 pixels -- exactly what the pipeline's CPU tasks do per image row
   (`prepare_image_rows`). `--prep-passes` passes; the best pass is reported (the least disturbed by other
   processes). Per-core images/s uses the thread's CPU time (what a dedicated core would give); the wall
   rate is printed beside it (on a busy machine it is lower).
   The in-encoder part of preprocessing (uint8 -> float, /255, mean/std normalisation, patch layout:
   clip `encoder.pixel_values(pixels)`, v4 `encoder.image_batch(pixels)`, on the encoder's device) is
   timed separately on one batch; it is part of the encoder time below.
4. Encoder: `Embedder.embed_images(prepared_pixels, task)` (v4 task "retrieval"; single vectors) on the
   prepared images, one call per timed batch: `--batch-tokens` // (tokens per image) images per batch
   (the embedder's own token-budget batching; clip = 1297 tokens per image, v4 = image tokens + the chat
   template), one untimed warm-up batch, then `--repeats` timed batches; images/s from the median batch
   time. "CPU-s / wall-s" is the process CPU time over wall time (ideally = torch threads). Forward hooks
   split the time: clip per EVA02 block; v4 per vision block (windowed vs full attention), the patch
   merger, the LLM layers, and the rest (patchify, M-RoPE index, embeddings, pooling). For a reduced-depth
   v4 it also prints the FULL-depth estimate: rest + merger + 28 windowed + 4 full-attention vision
   blocks + 36 LLM layers at the measured per-block times (images/s is not linear in one "layers" number
   because the ViT runs ~4x as many tokens as the LLM).
5. The ratio table per model and dtype: prep images/s per core, encoder images/s, cores_needed.

On CPU the dtypes are float32 and bfloat16 (bfloat16 is skipped with a note if it fails); on CUDA
bfloat16. The checkpoints go into a temporary directory deleted at the end, or into `--workdir` (kept,
and reused when their generation parameters match). Medians are reported and the load average is
printed before/after each setting: the timings on a shared machine are noisy.
"""

from __future__ import annotations

import argparse
import copy
import io
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
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np
from machine_info import cpu_name, loadavg, log
import torch

ROOT = Path(__file__).resolve().parents[1]
CLIP_FIXTURE = ROOT / "tests" / "fixtures" / "jina-clip-v2-tiny"
V4_FIXTURE = ROOT / "tests" / "fixtures" / "jina-embeddings-v4-tiny"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
CLIP, V4 = "jina-clip-v2", "jina-embeddings-v4"
MAX_IMAGE_PIXELS = 64_000_000  # the pipeline's default source.max_image_pixels

# jina-clip-v2 vision tower (MODELS.md section 4: EVA02-L/14 at 512)
CLIP_VISION = {"width": 1024, "embed_dim": 1024, "layers": 24, "head_width": 64, "mlp_ratio": 2.6667,
               "patch_size": 14, "image_size": 512, "pt_hw_seq_len": 16}
CLIP_TEXT = {"hidden_size": 1024, "intermediate_size": 4096, "num_attention_heads": 16, "vocab_size": 1501}
# jina-embeddings-v4 = Qwen2.5-VL-3B widths (MODELS.md section 2.1)
V4_TEXT = {"hidden_size": 2048, "num_attention_heads": 16, "num_key_value_heads": 2, "intermediate_size": 11008}
V4_VISION = {"hidden_size": 1280, "num_heads": 16, "intermediate_size": 3420, "out_hidden_size": 2048,
             "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2, "window_size": 112,
             "tokens_per_second": 2}
V4_FULL_TEXT_LAYERS, V4_FULL_VISION_LAYERS = 36, 32
V4_FULLATT_EVERY = 8  # real fullatt_block_indexes [7, 15, 23, 31]
V4_LORA = {"r": 32, "lora_alpha": 32}
V4_MAX_PIXELS, V4_MIN_PIXELS = 768 * 28 * 28, 3136

DEFAULT_SIZES = "1280x960,1280x960,1280x960,1280x960,1920x1080,960x1280,1024x1024,4032x3024"


def header_shapes(file: Path) -> dict[str, tuple[int, ...]]:
    from safetensors import safe_open

    with safe_open(str(file), "pt") as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118


def compare_layouts(what: str, want: dict[str, tuple[int, ...]], have: dict[str, tuple[int, ...]]) -> None:
    if want != have:
        missing, extra = sorted(set(have) - set(want)), sorted(set(want) - set(have))
        wrong = sorted(k for k in set(want) & set(have) if want[k] != have[k])
        raise SystemExit(f"{what}: generated layout differs from the fixture: missing {missing[:5]}, extra "
                         f"{extra[:5]}, wrong shapes {wrong[:5]}")


def fill(key: str, shape: tuple[int, ...], gen: torch.Generator, dtype: torch.dtype, norm_keys: tuple[str, ...]
         ) -> torch.Tensor:
    """Norm weights 1, norm biases and other biases 0, everything else N(0, 0.02^2)."""
    if key.endswith(".weight") and any(n in key for n in norm_keys):
        return torch.ones(shape, dtype=dtype)
    if key.endswith(("bias", "_bias")) and "lora" not in key:
        return torch.zeros(shape, dtype=dtype)
    if key == "logit_scale":
        return torch.tensor(2.6592, dtype=dtype)
    return (torch.randn(shape, generator=gen) * 0.02).to(dtype)


def save_tensors(file: Path, shapes: dict[str, tuple[int, ...]], dtype: torch.dtype, seed: int,
                 norm_keys: tuple[str, ...]) -> int:
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(seed)
    tensors = {k: fill(k, s, gen, dtype, norm_keys).contiguous() for k, s in shapes.items()}
    file.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(file), metadata={"format": "pt"})
    return sum(t.numel() for t in tensors.values())


def reuse_ok(folder: Path, manifest: dict[str, Any]) -> bool:
    f = folder / "bench_manifest.json"
    return f.exists() and json.loads(f.read_text()) == manifest


# ------------------------------------------------------------------------------ jina-clip-v2 checkpoint


def clip_text_shapes(kw: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """The CLIP text tower (`text_model.transformer.roberta.*`, no pooler) with its LoRA parametrizations."""
    h, inter, vocab = int(kw["hidden_size"]), int(kw["intermediate_size"]), int(kw["vocab_size"])
    t, r = len(kw["lora_adaptations"]), int(kw["lora_rank"])
    out: dict[str, tuple[int, ...]] = {}
    pre = "text_model.transformer.roberta."

    def embedding(name: str, num: int) -> None:
        p = f"{pre}{name}.parametrizations.weight"
        out[f"{p}.original"], out[f"{p}.0.lora_A"], out[f"{p}.0.lora_B"] = (num, h), (t, num, r), (t, r, h)

    def linear(name: str, fan_in: int, fan_out: int) -> None:
        p = f"{pre}{name}.parametrizations.weight"
        out[f"{p}.original"], out[f"{p}.0.lora_A"], out[f"{p}.0.lora_B"] = (fan_out, fan_in), (t, r, fan_in), (
            t, fan_out, r)
        out[f"{pre}{name}.bias"] = (fan_out,)

    embedding("embeddings.word_embeddings", vocab)
    embedding("embeddings.token_type_embeddings", 1)
    out[f"{pre}emb_ln.weight"] = out[f"{pre}emb_ln.bias"] = (h,)
    for i in range(int(kw["num_hidden_layers"])):
        p = f"encoder.layers.{i}"
        linear(f"{p}.mixer.Wqkv", h, 3 * h)
        linear(f"{p}.mixer.out_proj", h, h)
        linear(f"{p}.mlp.fc1", h, inter)
        linear(f"{p}.mlp.fc2", inter, h)
        for norm in ("norm1", "norm2"):
            out[f"{pre}{p}.{norm}.weight"] = out[f"{pre}{p}.{norm}.bias"] = (h,)
    return out


def clip_shapes(cfg: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    from embindex.models.eva02 import EVA02Config, EVA02VisionTransformer

    out = clip_text_shapes(cfg["text_config"]["hf_model_config_kwargs"])
    with torch.device("meta"):
        vision = EVA02VisionTransformer(EVA02Config.from_dict(cfg["vision_config"]))
    out.update({f"vision_model.{k}": tuple(v.shape) for k, v in vision.state_dict().items()})
    out["logit_scale"] = ()
    return out


def clip_config(text_layers: int, image_size: int) -> dict[str, Any]:
    cfg = copy.deepcopy(json.loads((CLIP_FIXTURE / "config.json").read_text()))
    dim = CLIP_VISION["width"]
    cfg["projection_dim"] = dim
    cfg["matryoshka_dimensions"] = [32, 64, 128, 256, 512, 768, 1024]
    cfg["text_config"]["embed_dim"] = dim
    cfg["text_config"]["hf_model_config_kwargs"].update(CLIP_TEXT, num_hidden_layers=text_layers)
    cfg["vision_config"].update(CLIP_VISION, image_size=image_size)
    return cfg


def write_clip(folder: Path, text_layers: int, ckpt_dtype: str, seed: int) -> dict[str, Any]:
    compare_layouts(CLIP, clip_shapes(json.loads((CLIP_FIXTURE / "config.json").read_text())),
                    header_shapes(CLIP_FIXTURE / "model.safetensors"))
    size, note = CLIP_VISION["image_size"], ""
    cfg = clip_config(text_layers, size)
    manifest = {"family": CLIP, "config": cfg, "ckpt_dtype": ckpt_dtype, "seed": seed, "image_size": size}
    info: dict[str, Any] = {"note": note, "image_size": size, "config": cfg}
    if reuse_ok(folder, manifest):
        info.update(reused=True, bytes=(folder / "model.safetensors").stat().st_size)
        return info
    t0 = time.perf_counter()
    n = save_tensors(folder / "model.safetensors", clip_shapes(cfg), getattr(torch, ckpt_dtype), seed,
                     ("norm", "_ln"))
    (folder / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    pp = json.loads((CLIP_FIXTURE / "preprocessor_config.json").read_text())
    pp["size"] = size
    (folder / "preprocessor_config.json").write_text(json.dumps(pp, indent=2) + "\n")
    for name in TOKENIZER_FILES:
        shutil.copyfile(CLIP_FIXTURE / name, folder / name)
    (folder / "bench_manifest.json").write_text(json.dumps(manifest) + "\n")
    info.update(reused=False, write_s=time.perf_counter() - t0, params=n,
                bytes=(folder / "model.safetensors").stat().st_size)
    return info


# ------------------------------------------------------------------------------ jina-embeddings-v4 checkpoint


def fullatt_blocks(depth: int) -> list[int]:
    idx = [i for i in range(depth) if i % V4_FULLATT_EVERY == V4_FULLATT_EVERY - 1]
    return idx or [depth - 1]


def v4_config(text_layers: int, vision_layers: int) -> dict[str, Any]:
    cfg = copy.deepcopy(json.loads((V4_FIXTURE / "config.json").read_text()))
    text = dict(V4_TEXT, num_hidden_layers=text_layers, max_window_layers=text_layers)
    for c in (cfg, cfg["text_config"]):
        c.update(text)
        c["rope_scaling"]["mrope_section"] = [16, 24, 24]
        c["matryoshka_dims"] = [128, 256, 512, 1024, 2048]
    cfg["multi_vector_projector_dim"] = 128
    cfg["vision_config"].update(V4_VISION, depth=vision_layers, fullatt_block_indexes=fullatt_blocks(vision_layers))
    return cfg


def legacy_key(name: str) -> str:
    """`_V4Module` key -> the legacy (pre-4.52) checkpoint key the fixture uses."""
    if name.startswith("model.language_model."):
        return "model." + name[len("model.language_model."):]
    if name.startswith("model.visual."):
        return name[len("model."):]
    return name


def v4_shapes(path: Path) -> tuple[dict[str, tuple[int, ...]], dict[str, tuple[int, ...]]]:
    """(base checkpoint key -> shape, adapter key -> shape) for the config.json / adapter_config.json in `path`,
    from the family's own module tree (on the meta device)."""
    from torch import nn

    from embindex.models.jina_embeddings_v4 import _meta_module, _qwen_config

    raw = json.loads((path / "config.json").read_text())
    acfg = json.loads((path / "adapters" / "adapter_config.json").read_text())
    module = _meta_module(_qwen_config(str(path)), int(raw["multi_vector_projector_dim"]))
    base = {legacy_key(k): tuple(v.shape) for k, v in module.state_dict().items()}
    pattern, r = re.compile(acfg["target_modules"]), int(acfg["r"])
    lora: dict[str, tuple[int, ...]] = {}
    for name, mod in module.named_modules():
        if isinstance(mod, nn.Linear) and pattern.fullmatch(name):
            for task in raw["task_names"]:
                lora[f"base_model.model.{name}.lora_A.{task}.weight"] = (r, mod.in_features)
                lora[f"base_model.model.{name}.lora_B.{task}.weight"] = (mod.out_features, r)
    return base, lora


def write_v4(folder: Path, text_layers: int, vision_layers: int, ckpt_dtype: str, seed: int) -> dict[str, Any]:
    base, lora = v4_shapes(V4_FIXTURE)
    compare_layouts(V4, base, header_shapes(V4_FIXTURE / "model.safetensors"))
    compare_layouts(f"{V4} adapters", lora, header_shapes(V4_FIXTURE / "adapters" / "adapter_model.safetensors"))
    cfg = v4_config(text_layers, vision_layers)
    acfg = json.loads((V4_FIXTURE / "adapters" / "adapter_config.json").read_text())
    acfg.update(V4_LORA)
    pp = json.loads((V4_FIXTURE / "preprocessor_config.json").read_text())
    pp.update(min_pixels=V4_MIN_PIXELS, max_pixels=V4_MAX_PIXELS)
    manifest = {"family": V4, "config": cfg, "adapter": acfg, "pp": pp, "ckpt_dtype": ckpt_dtype, "seed": seed}
    info: dict[str, Any] = {"config": cfg}
    if reuse_ok(folder, manifest):
        info.update(reused=True, bytes=(folder / "model.safetensors").stat().st_size)
        return info
    t0 = time.perf_counter()
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "adapters").mkdir(exist_ok=True)
    (folder / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    (folder / "adapters" / "adapter_config.json").write_text(json.dumps(acfg, indent=2) + "\n")
    (folder / "preprocessor_config.json").write_text(json.dumps(pp, indent=2) + "\n")
    for name in TOKENIZER_FILES:
        shutil.copyfile(V4_FIXTURE / name, folder / name)
    base, lora = v4_shapes(folder)
    dtype = getattr(torch, ckpt_dtype)
    n = save_tensors(folder / "model.safetensors", base, dtype, seed, ("norm", "ln_q"))
    n += save_tensors(folder / "adapters" / "adapter_model.safetensors", lora, dtype, seed + 1, ())
    (folder / "bench_manifest.json").write_text(json.dumps(manifest) + "\n")
    info.update(reused=False, write_s=time.perf_counter() - t0, params=n,
                bytes=(folder / "model.safetensors").stat().st_size)
    return info


# ------------------------------------------------------------------------------ inputs


def synthetic_photo(width: int, height: int, rng: np.random.Generator) -> np.ndarray:
    """Photo-like uint8 RGB: a smooth random colour field (bicubic-upsampled 8x6 grid) + linear gradients
    + per-pixel Gaussian noise (sigma 10)."""
    from PIL import Image

    coarse = rng.integers(0, 256, size=(6, 8, 3), dtype=np.uint8)
    field = np.asarray(Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC), np.float32)
    y = np.linspace(0.0, 1.0, height, dtype=np.float32)[:, None, None]
    x = np.linspace(0.0, 1.0, width, dtype=np.float32)[None, :, None]
    grad = (rng.uniform(-60, 60, 3).astype(np.float32) * x + rng.uniform(-60, 60, 3).astype(np.float32) * y)
    noise = rng.normal(0.0, 10.0, size=(height, width, 3)).astype(np.float32)
    return np.clip(0.7 * field + grad + noise + 30, 0, 255).astype(np.uint8)


def make_jpegs(n: int, sizes: list[tuple[int, int]], seed: int) -> list[dict[str, Any]]:
    from PIL import Image

    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        w, h = sizes[i % len(sizes)]
        buf = io.BytesIO()
        Image.fromarray(synthetic_photo(w, h, rng)).save(buf, format="JPEG", quality=90)
        out.append({"size": f"{w}x{h}", "data": buf.getvalue()})
    return out


# ------------------------------------------------------------------------------ preprocessing


def measure_prep(processor: Any, jpegs: list[dict[str, Any]], passes: int) -> dict[str, Any]:
    """Per image: decode_image (CPU s), processor (CPU s), tobytes (CPU s); best pass by total CPU time."""
    from embindex.models.images import decode_image

    best: dict[str, Any] | None = None
    prepared: list[np.ndarray] = []
    for _ in range(passes):
        rows, prepared = [], []
        w0 = time.perf_counter()
        for item in jpegs:
            c0 = time.thread_time()
            im = decode_image(item["data"], MAX_IMAGE_PIXELS)
            c1 = time.thread_time()
            arr = processor(im)
            c2 = time.thread_time()
            np.ascontiguousarray(arr, np.uint8).tobytes()
            c3 = time.thread_time()
            rows.append((item["size"], c1 - c0, c2 - c1, c3 - c2))
            prepared.append(arr)
        wall = time.perf_counter() - w0
        cpu = sum(r[1] + r[2] + r[3] for r in rows)
        if best is None or cpu < best["cpu_s"]:
            best = {"rows": rows, "cpu_s": cpu, "wall_s": wall}
    assert best is not None
    n = len(jpegs)
    by_size: dict[str, list[tuple[float, float, float]]] = {}
    for size, d, p, b in best["rows"]:
        by_size.setdefault(size, []).append((d, p, b))
    best.update(images=n, img_s_core=n / best["cpu_s"], img_s_wall=n / best["wall_s"],
                decode_s=sum(r[1] for r in best["rows"]), process_s=sum(r[2] for r in best["rows"]),
                pack_s=sum(r[3] for r in best["rows"]), by_size=by_size,
                out_shapes=sorted({f"{a.shape[1]}x{a.shape[0]}" for a in prepared}))
    return {"result": best, "prepared": prepared}


# ------------------------------------------------------------------------------ encoder


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Timer:
    """Forward pre/post hooks recording each call's time per named module (CUDA events on a GPU)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.marks: dict[str, list[Any]] = {}
        self.handles: list[Any] = []
        self.open: dict[str, Any] = {}

    def _now(self) -> Any:
        if self.cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            return e
        return time.perf_counter()

    def add(self, name: str, module: torch.nn.Module) -> None:
        def pre(*_: Any) -> None:
            self.open[name] = self._now()

        def post(*_: Any) -> None:
            self.marks.setdefault(name, []).append((self.open.pop(name), self._now()))

        self.handles.append(module.register_forward_pre_hook(pre))
        self.handles.append(module.register_forward_hook(post))

    def reset(self) -> None:
        self.marks = {}

    def seconds(self) -> dict[str, float]:
        """Total seconds per name since the last reset (after a device sync)."""
        out = {}
        for name, pairs in self.marks.items():
            if self.cuda:
                out[name] = sum(a.elapsed_time(b) for a, b in pairs) / 1e3
            else:
                out[name] = sum(b - a for a, b in pairs)
        return out

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def install_timer(model: str, encoder: Any, device: torch.device) -> tuple[Timer, dict[str, Any]]:
    timer = Timer(device)
    meta: dict[str, Any] = {}
    if model == CLIP:
        for i, blk in enumerate(encoder.vision.blocks):
            timer.add(f"vblock{i}", blk)
        meta["vision_layers"] = len(encoder.vision.blocks)
    else:
        qwen = encoder.module.model
        full = set(qwen.visual.fullatt_block_indexes)
        for i, blk in enumerate(qwen.visual.blocks):
            timer.add(f"vblock{i}", blk)
        timer.add("merger", qwen.visual.merger)
        for i, layer in enumerate(qwen.language_model.layers):
            timer.add(f"llm{i}", layer)
        meta.update(vision_layers=len(qwen.visual.blocks), full_blocks=sorted(full),
                    text_layers=len(qwen.language_model.layers))
    return timer, meta


def split_batch(model: str, secs: dict[str, float], total: float, meta: dict[str, Any]) -> dict[str, float]:
    vb = [secs.get(f"vblock{i}", 0.0) for i in range(meta["vision_layers"])]
    if model == CLIP:
        return {"vision_blocks": sum(vb), "rest": total - sum(vb), "per_block": sum(vb) / len(vb)}
    full = set(meta["full_blocks"])
    win = [t for i, t in enumerate(vb) if i not in full]
    fu = [t for i, t in enumerate(vb) if i in full]
    llm = [secs.get(f"llm{i}", 0.0) for i in range(meta["text_layers"])]
    merger = secs.get("merger", 0.0)
    return {"vision_blocks": sum(vb), "window_block": statistics.mean(win) if win else float("nan"),
            "full_block": statistics.mean(fu) if fu else float("nan"), "merger": merger, "llm_layers": sum(llm),
            "llm_layer": statistics.mean(llm), "rest": total - sum(vb) - merger - sum(llm)}


def measure_encoder(model: str, embedder: Any, pixels: list[np.ndarray], task: str | None, device: torch.device,
                    repeats: int) -> dict[str, Any]:
    """One warm-up + `repeats` timed `embed_images` calls of one token-budget batch each."""
    proc = embedder.image_processor
    seq = [proc.sequence_length(p.shape[0], p.shape[1]) for p in pixels]
    per_batch = max(1, embedder.batch_tokens // max(seq))
    timer, meta = install_timer(model, embedder.encoder, device)
    times, cpu, splits = [], [], []
    first = None
    batch: list[np.ndarray] = []
    load_before = loadavg()
    cursor = 0
    try:
        for i in range(repeats + 1):
            idx = [(cursor + j) % len(pixels) for j in range(per_batch)]
            cursor += per_batch
            batch = [pixels[j] for j in idx]
            timer.reset()
            sync(device)
            c0, t0 = time.process_time(), time.perf_counter()
            vecs, _ = embedder.embed_images(batch, task)
            sync(device)
            dt = time.perf_counter() - t0
            if not np.isfinite(vecs).all():
                raise SystemExit(f"{model}: non-finite image embeddings")
            log(f"    batch {i}{' (warm-up)' if i == 0 else ''}: {per_batch} images, {dt:.2f}s "
                f"({per_batch / dt:.2f} img/s)")
            if i == 0:
                first = dt
                continue
            times.append(dt)
            cpu.append(time.process_time() - c0)
            splits.append(split_batch(model, timer.seconds(), dt, meta))
    finally:
        timer.remove()
    med = statistics.median(times)
    k = times.index(sorted(times)[(len(times) - 1) // 2])  # the split of the (lower) median batch
    split = {key: v / per_batch for key, v in splits[k].items()}  # seconds per image
    # the in-encoder preprocessing (normalise + patchify) of the last batch, alone
    enc = embedder.encoder
    pre_times = []
    with torch.inference_mode():
        for _ in range(3):
            sync(device)
            t0 = time.perf_counter()
            if model == CLIP:
                enc.pixel_values(batch)
            else:
                enc.image_batch(batch)
            sync(device)
            pre_times.append(time.perf_counter() - t0)
    return {"per_batch": per_batch, "tokens_per_image": statistics.median(seq), "first_s": first, "times_s": times,
            "median_s": med, "img_s": per_batch / med, "best_img_s": per_batch / min(times),
            "cpu_share": statistics.median(c / t for c, t in zip(cpu, times)), "split": split, "meta": meta,
            "in_encoder_prep_s_per_image": statistics.median(pre_times) / per_batch,
            "load_before": load_before, "load_after": loadavg()}


def v4_full_estimate(r: dict[str, Any]) -> float | None:
    """Seconds per image at the real depth (32 vision blocks, 4 of them full attention; 36 LLM layers)."""
    s = r["split"]
    full_blocks = len(fullatt_blocks(V4_FULL_VISION_LAYERS))
    w, f = s["window_block"], s["full_block"]
    if not (np.isfinite(w) and np.isfinite(f)):
        return None
    return (s["rest"] + s["merger"] + (V4_FULL_VISION_LAYERS - full_blocks) * w + full_blocks * f
            + V4_FULL_TEXT_LAYERS * s["llm_layer"])


# ------------------------------------------------------------------------------ environment




def machine(device: torch.device) -> str:
    import PIL
    import transformers

    from embindex.models.device import cpu_supports_bf16

    isa = "bf16 ISA (avx512_bf16/amx_bf16)" if cpu_supports_bf16() else "no bf16 ISA"
    cpu = f"{cpu_name()} ({os.cpu_count()} cores, {isa})"
    dev = f"{torch.cuda.get_device_name(device)}; CPU {cpu}" if device.type == "cuda" else cpu
    return (f"{dev}; torch threads {torch.get_num_threads()}; torch {torch.__version__}, transformers "
            f"{transformers.__version__}, Pillow {PIL.__version__}, Python {platform.python_version()}")


# ------------------------------------------------------------------------------ main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu", help="cpu | cuda")
    p.add_argument("--only", default="clip,v4", help="comma list of clip, v4")
    p.add_argument("--dtypes", default=None, help="comma list (default: float32,bfloat16 on CPU, bfloat16 on CUDA)")
    p.add_argument("--images", type=int, default=16, help="synthetic JPEGs (sizes cycled from --sizes)")
    p.add_argument("--sizes", default=DEFAULT_SIZES, help="comma list of WxH, cycled over the images")
    p.add_argument("--prep-passes", type=int, default=2, help="preprocessing passes over all images (best kept)")
    p.add_argument("--repeats", type=int, default=None, help="timed encoder batches after one warm-up "
                   "(default 3 CPU, 10 CUDA)")
    p.add_argument("--batch-tokens", type=int, default=None,
                   help="the embedder's token budget per batch (default 2048 CPU: 1 clip / 2 v4 images; "
                   "65536 CUDA)")
    p.add_argument("--clip-text-layers", type=int, default=1, help="text layers of the clip checkpoint (unused)")
    p.add_argument("--v4-text-layers", type=int, default=2)
    p.add_argument("--v4-vision-layers", type=int, default=4)
    p.add_argument("--v4-full", action="store_true", help=f"v4 at its real depth ({V4_FULL_TEXT_LAYERS} text "
                   f"layers, {V4_FULL_VISION_LAYERS} vision blocks): for a GPU")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: all cores)")
    p.add_argument("--ckpt-dtype", default="bfloat16", choices=["float32", "bfloat16"])
    p.add_argument("--workdir", default=None, help="keep the checkpoints here (reused if their parameters match)")
    p.add_argument("--json", default=None, help="also write all results to this JSON file")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from embindex.models import ModelSpec, load_family
    from embindex.models.embedder import Embedder

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if args.threads:
        torch.set_num_threads(args.threads)
    dtypes = (args.dtypes or ("bfloat16" if cuda else "float32,bfloat16")).split(",")
    repeats = args.repeats or (10 if cuda else 3)
    batch_tokens = args.batch_tokens or (65536 if cuda else 2048)
    only = {"clip": CLIP, "v4": V4}
    models = [only[m.strip()] for m in args.only.split(",") if m.strip()]
    if args.v4_full:
        args.v4_text_layers, args.v4_vision_layers = V4_FULL_TEXT_LAYERS, V4_FULL_VISION_LAYERS
    sizes = []
    for s in args.sizes.split(","):
        w, h = s.lower().split("x")
        sizes.append((int(w), int(h)))

    res: dict[str, Any] = {"machine": machine(device), "device": str(device), "dtypes": dtypes, "repeats": repeats,
                           "batch_tokens": batch_tokens, "models": {}, "load_start": loadavg()}
    t0 = time.perf_counter()
    jpegs = make_jpegs(args.images, sizes, args.seed)
    res["inputs"] = {"images": len(jpegs), "gen_s": time.perf_counter() - t0,
                     "mean_kb": statistics.mean(len(j["data"]) for j in jpegs) / 1e3,
                     "sizes": {s: sum(j["size"] == s for j in jpegs) for s in dict.fromkeys(j["size"] for j in jpegs)}}
    log(f"{len(jpegs)} JPEGs, {res['inputs']['mean_kb']:.0f} kB mean")

    tmp = None
    if args.workdir:
        root = Path(args.workdir)
    else:
        tmp = tempfile.mkdtemp(prefix="embindex-image-speed-")
        root = Path(tmp)
    try:
        for model in models:
            folder = root / model
            t0 = time.perf_counter()
            if model == CLIP:
                ck = write_clip(folder, args.clip_text_layers, args.ckpt_dtype, args.seed)
                task = None
            else:
                ck = write_v4(folder, args.v4_text_layers, args.v4_vision_layers, args.ckpt_dtype, args.seed)
                task = "retrieval"
            log(f"[{model}] checkpoint in {folder}: {'reused' if ck['reused'] else 'written'} "
                f"({ck['bytes'] / 1e9:.2f} GB, {time.perf_counter() - t0:.1f}s)" + (f"; NOTE {ck['note']}"
                                                                                     if ck.get("note") else ""))
            mres: dict[str, Any] = {"checkpoint": {k: v for k, v in ck.items() if k != "config"}, "runs": []}
            res["models"][model] = mres
            cfg = ck["config"]
            if model == CLIP:
                vc = cfg["vision_config"]
                mres["desc"] = (f"vision EVA02 {vc['layers']} blocks x {vc['width']} (head {vc['head_width']}, "
                                f"SwiGLU {int(vc['width'] * vc['mlp_ratio'])}), {vc['image_size']}px / patch "
                                f"{vc['patch_size']}; text tower reduced ({args.clip_text_layers} layer, not run)")
            else:
                vc = cfg["vision_config"]
                depth = "FULL depth" if args.v4_full else "REDUCED depth"
                mres["desc"] = (f"{depth}: LLM {cfg['num_hidden_layers']}/{V4_FULL_TEXT_LAYERS} layers x "
                                f"{cfg['hidden_size']} (heads {cfg['num_attention_heads']}/"
                                f"{cfg['num_key_value_heads']}, inter {cfg['intermediate_size']}), ViT "
                                f"{vc['depth']}/{V4_FULL_VISION_LAYERS} blocks x {vc['hidden_size']} (inter "
                                f"{vc['intermediate_size']}, window {vc['window_size']}px, full-attention blocks "
                                f"{vc['fullatt_block_indexes']}), LoRA r {V4_LORA['r']} task retrieval, "
                                f"max_pixels {V4_MAX_PIXELS}")
            prepared: list[np.ndarray] | None = None
            for dtype in dtypes:
                spec = ModelSpec(name=model, path=str(folder), dtype=dtype, task=task)
                t0 = time.perf_counter()
                family = load_family(spec)
                validate_s = time.perf_counter() - t0
                if prepared is None:  # preprocessing does not depend on the dtype: once per model
                    log(f"[{model}] preprocessing {len(jpegs)} images x {args.prep_passes} passes")
                    pr = measure_prep(family.load_image_processor(), jpegs, args.prep_passes)
                    mres["prep"], prepared = pr["result"], pr["prepared"]
                    log(f"  {mres['prep']['img_s_core']:.1f} img/s/core (decode {mres['prep']['decode_s']:.2f}s, "
                        f"process {mres['prep']['process_s']:.2f}s, pack {mres['prep']['pack_s']:.2f}s)")
                try:
                    t1 = time.perf_counter()
                    embedder = Embedder(family, device=device, batch_tokens=batch_tokens)
                    sync(device)
                    load_s = time.perf_counter() - t1
                    log(f"[{model}] {dtype}: loaded in {load_s:.1f}s")
                    r = measure_encoder(model, embedder, prepared, task, device, repeats)
                except Exception as e:  # e.g. a dtype this CPU cannot run: report, go on
                    if dtype == "float32":
                        raise
                    log(f"[{model}] {dtype} failed: {type(e).__name__}: {e}")
                    mres["runs"].append({"dtype": dtype, "error": f"{type(e).__name__}: {e}"})
                    continue
                r.update(dtype=dtype, validate_s=validate_s, load_s=load_s,
                         cores_needed=r["img_s"] / mres["prep"]["img_s_core"])
                if model == V4 and not args.v4_full:
                    est = v4_full_estimate(r)
                    if est:
                        r["full_est_img_s"] = 1.0 / est
                        r["full_est_cores_needed"] = r["full_est_img_s"] / mres["prep"]["img_s_core"]
                if cuda:
                    r["max_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
                mres["runs"].append(r)
                log(f"  [{model}] {dtype}: {r['img_s']:.2f} img/s (median of {repeats}), cores_needed "
                    f"{r['cores_needed']:.3f}")
                del embedder
                if cuda:
                    torch.cuda.empty_cache()
                    torch.cuda.reset_peak_memory_stats(device)
            del family
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    res["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    res["load_end"] = loadavg()
    print_report(res, argv)
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2, default=str) + "\n")
    return 0


def print_report(res: dict[str, Any], argv: list[str] | None) -> None:
    cmd = " ".join(["benchmarks/image_speed.py", *(argv if argv is not None else sys.argv[1:])])
    inp = res["inputs"]
    print(f"command: {cmd}")
    print(f"machine: {res['machine']}")
    print(f"device: {res['device']}; load average at start {res['load_start']}, at end {res['load_end']}; "
          f"peak RSS {res['peak_rss_gib']:.2f} GiB")
    print(f"inputs: {inp['images']} synthetic JPEGs (q90), mean {inp['mean_kb']:.0f} kB: "
          + ", ".join(f"{n} x {s}" for s, n in inp["sizes"].items()))
    print(f"encoder: token budget {res['batch_tokens']} per batch, 1 warm-up + {res['repeats']} timed batches per "
          "dtype, images/s from the median batch")
    for model, m in res["models"].items():
        print()
        print(f"## {model}: {m['desc']}")
        if m["checkpoint"].get("note"):
            print(f"NOTE: {m['checkpoint']['note']}")
        p = m["prep"]
        n = p["images"]
        print()
        print(f"Preprocessing, 1 thread (best of passes; output sizes {', '.join(p['out_shapes'])}):")
        print()
        print("| images | decode ms/img | resize+crop/convert ms/img | tobytes ms/img | total ms/img (CPU) "
              "| img/s/core (CPU time) | img/s (wall) |")
        print("|---|---|---|---|---|---|---|")
        for size, rows in p["by_size"].items():
            d, q, b = (1e3 * statistics.mean(r[i] for r in rows) for i in range(3))
            print(f"| {len(rows)} x {size} | {d:.1f} | {q:.1f} | {b:.2f} | {d + q + b:.1f} | {1e3 / (d + q + b):.1f} "
                  "| |")
        print(f"| all {n} | {1e3 * p['decode_s'] / n:.1f} | {1e3 * p['process_s'] / n:.1f} | "
              f"{1e3 * p['pack_s'] / n:.2f} | {1e3 * p['cpu_s'] / n:.1f} | **{p['img_s_core']:.1f}** | "
              f"{p['img_s_wall']:.1f} |")
        print()
        runs = [r for r in m["runs"] if "error" not in r]
        for r in m["runs"]:
            if "error" in r:
                print(f"{r['dtype']}: failed ({r['error']})")
        if not runs:
            continue
        print("Encoder (`Embedder.embed_images`):")
        print()
        print("| dtype | load s | images/batch (tokens/img) | batch s (warm-up) each | img/s (median) | img/s (best) "
              "| CPU-s / wall-s | in-encoder normalise+patchify ms/img | load avg before → after |")
        print("|---|---|---|---|---|---|---|---|---|")
        for r in runs:
            each = ", ".join(f"{t:.2f}" for t in r["times_s"])
            print(f"| {r['dtype']} | {r['load_s']:.1f} | {r['per_batch']} ({r['tokens_per_image']:.0f}) | "
                  f"({r['first_s']:.2f}) {each} | {r['img_s']:.3f} | {r['best_img_s']:.3f} | {r['cpu_share']:.2f} | "
                  f"{1e3 * r['in_encoder_prep_s_per_image']:.1f} | {r['load_before']} → {r['load_after']} |")
        print()
        print("Time split of the median batch, seconds per image:")
        print()
        if model == CLIP:
            print("| dtype | EVA02 blocks (total) | per block | rest (normalise, patch embed, final norm, L2) |")
            print("|---|---|---|---|")
            for r in runs:
                s = r["split"]
                print(f"| {r['dtype']} | {s['vision_blocks']:.3f} | {s['per_block']:.4f} | {s['rest']:.3f} |")
        else:
            meta = runs[0]["meta"]
            print(f"| dtype | ViT blocks ({meta['vision_layers']}) | per windowed block | per full-attn block | "
                  f"merger | LLM layers ({meta['text_layers']}) | per LLM layer | rest (patchify, M-RoPE index, "
                  "embed, pool) |")
            print("|---|---|---|---|---|---|---|---|")
            for r in runs:
                s = r["split"]
                print(f"| {r['dtype']} | {s['vision_blocks']:.3f} | {s['window_block']:.4f} | {s['full_block']:.4f} | "
                      f"{s['merger']:.4f} | {s['llm_layers']:.3f} | {s['llm_layer']:.4f} | {s['rest']:.4f} |")
        print()
        print("Ratio (cores_needed = encoder img/s / preprocessing img/s per core):")
        print()
        print("| dtype | device | prep img/s/core | encoder img/s | cores_needed |")
        print("|---|---|---|---|---|")
        for r in runs:
            print(f"| {r['dtype']} | {res['device']} | {p['img_s_core']:.1f} | {r['img_s']:.3f} | "
                  f"**{r['cores_needed']:.3f}** |")
            if "full_est_img_s" in r:
                print(f"| {r['dtype']} | {res['device']}, FULL-depth estimate (32 ViT blocks, 4 full-attn; 36 LLM "
                      f"layers) | {p['img_s_core']:.1f} | {r['full_est_img_s']:.3f} | "
                      f"**{r['full_est_cores_needed']:.4f}** |")


if __name__ == "__main__":
    sys.exit(main())
