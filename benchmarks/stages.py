"""Generative stages: generated tokens/s per actor (ReaderLM-v2, jina-vlm) with and without batching, and
end-to-end docs/s of a crawl built with and without the `html_to_markdown` stage.

Run from the repository root:

    .venv/bin/python benchmarks/stages.py                         # everything, as in RESULTS.md (2 cores: 7-11 min)
    .venv/bin/python benchmarks/stages.py --no-real-size          # tiny fixtures + end to end only (~3 min)
    .venv/bin/python benchmarks/stages.py --parts generators --real-docs 8 --real-max-new 64 --workdir ckpts
    .venv/bin/python benchmarks/stages.py --parts e2e --e2e-pages 400 --json stages.json

What it measures:

1. Generators. One generator loaded in this process = one actor of a generative stage (`load_generator`, the
   stage's call). The same inputs go through `generate(inputs, max_new_tokens, batch_tokens)` twice per
   repeat, alternating: `batch_tokens=None` (one input per batch) and `--batch-tokens` (length-bucketed
   batches of at most that many padded prompt + max_new_tokens tokens, as the stage runs it). Generated
   tokens/s = generated ids (stop ids included, padding of finished rows not) / wall seconds of the median
   call (of an even count, the faster middle one); the ratio batched / unbatched is printed. Forward hooks on the decoder split each call into
   prefill (the prompt forward, plus jina-vlm's vision tower) and decode steps (one token per row); the
   rest is tokenization, image preprocessing and the sampling loop. "same ids" counts inputs whose ids are
   equal in both modes (the families promise equal output up to float noise; bf16 can flip near-ties).
   "tokens / CPU-s" divides by the process's CPU time instead of wall time: on a shared machine where
   other processes take cores (CPU-s / wall-s below the thread count) it is the steadier number.
   prefill tok/s = prompt tokens / prefill seconds; decode tok/s = rows x decode steps / decode seconds.
   a. Tiny fixtures (tests/fixtures/readerlm-v2-tiny on its five .html pages repeated to `--tiny-docs`;
      tests/fixtures/jina-vlm-tiny on its two PNGs plus synthetic images of other sizes, `--tiny-images` in
      all), fp32 (`--tiny-dtype`, the fixtures' own dtype).
   b. Real sizes (`--real-size`, default on): random weights with the REAL architectures, written one model
      at a time into a temporary directory (or `--workdir`, reused when its parameters match) in the real
      checkpoint layout, so `ReaderLMV2` / `JinaVLM` load them unchanged. config.json is the fixture's with
      the sizes of the fixture README's "Real:" column; tokenizer / processor files are copied from the
      fixture (the real tokenizers are not bundled), with jina-vlm's preprocessor at its real sizes (378 px
      crops, margins 4, 14 x 14 pooled tokens per crop, max_crops 12, max_pixels 1,003,520), which the
      vision input size requires. ReaderLM-v2 = Qwen2-1.5B (hidden 1536, 28 layers, 12 q / 2 KV heads,
      head 128, intermediate 8960, rope_theta 5e6, vocab 151,936, tied embeddings; the file also stores
      `lm_head.weight`, like the fixture); jina-vlm = text 28 layers x 2048 (16 q / 8 KV heads, head 128,
      ffn 6144, vocab 151,936 + 128) + vision 27 layers x 1152 (16 x 72 heads, ffn 4304, 378 px input,
      patch 14, vit_layers [-4, -10]) + connector (pooling 16 x 72, projector 6144), in 3 shards with an
      index like the real one. The vocabulary is real (the lm_head runs every step), so a random model
      generates ids the tiny tokenizer does not have: they decode to nothing. Weights: a pool of N(0, 0.02^2)
      values tiled into every matrix (norm weights 1, biases 0), stored as `--ckpt-dtype`; only the shapes
      (hence the compute) are real. Prompts are kept short (`--real-max-input` prompt tokens, small images)
      and `--real-max-new` small, so the part runs in minutes on 2 cores. Run dtype `--dtype`: bfloat16
      when the CPU has bf16 instructions (AVX512-BF16 / AMX, `cpu_supports_bf16`) or with `--device cuda`,
      else float32.
2. End to end: `--e2e-pages` pages made from the fixture's five pages (each with its own title and
   paragraph, a distinct URL), written with warcio into `--e2e-files` .warc.gz files, built twice with
   `embindex.build` into fresh indexes: `read, normalize, html_to_markdown (readerlm-v2-tiny,
   max_new_tokens --e2e-max-new), tokenize, embed, write`, and the same without the generative stage (the
   HTML embedded as it is), both embedding with the bundled MiniLM (`builtin:all-MiniLM-L6-v2`, max_length
   256). Ray is started once in this process (`num_cpus=3`); actors are sized by the pipeline's defaults.
   docs/s = documents indexed / `embindex.build` wall seconds (Ray already up); ratio = with / without;
   "stages s" is the build's `pipeline_s` (all stages over all fragments, from the first read to the last
   commit; without planning, census and tiers). The manifest's `stages` entry (generated documents and
   tokens, flags) and the reject reasons are printed. An untimed warm-up build of 10 pages runs first
   (`--e2e-warmup`): Ray starts its worker processes on the first build.

Threads: the generators run with `--threads` torch threads (default 1: what a generate actor gets when it
shares a 2-core machine with the embed actor, as in part 2). On a machine loaded by other processes, 2
threads on 2 cores made the same calls 5-20x slower than 1 thread (threads waiting for each other at every
op), so use more only on a quiet machine. The machine's load average is printed before and after every
measurement, and CPU-s / wall-s of the process for the generator calls (below the thread count: other
processes took cores).
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
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("RAY_worker_niceness", "0")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from machine_info import cpu_name, loadavg, log  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"
READERLM = FIXTURES / "readerlm-v2-tiny"
VLM = FIXTURES / "jina-vlm-tiny"
PAGES = ("news_article.html", "recipe_blog.html", "docs_page.html", "forum_thread.html", "produkt_de_zh.html")
EMBED_MODEL = "builtin:all-MiniLM-L6-v2"
TINY_IMAGE_SIZES = ((64, 64), (120, 90), (100, 200), (150, 150), (48, 160), (224, 168))  # (height, width)

READERLM_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")
VLM_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "vocab.json",
             "merges.txt", "chat_template.jinja", "processor_config.json", "generation_config.json")

# config.json values of the real models (tests/fixtures/*/README.md, "Real:"); nested dicts are merged
READERLM_REAL: dict[str, Any] = {
    "hidden_size": 1536, "num_hidden_layers": 28, "num_attention_heads": 12, "num_key_value_heads": 2,
    "intermediate_size": 8960, "rope_theta": 5000000.0, "vocab_size": 151936, "tie_word_embeddings": True,
    "max_window_layers": 28,
}
_VLM_HEADS = {"n_heads": 16, "head_dim": 72}
VLM_REAL: dict[str, Any] = {
    "text_config": {
        "hidden_size": 2048, "n_layers": 28, "num_hidden_layers": 28, "vocab_size": 151936, "embedding_size": 151936,
        "additional_vocab_size": 128,
        "block_config": {"attn_config": {"n_heads": 16, "n_kv_heads": 8, "head_dim": 128}, "ffn_config": {"size": 6144}},
    },
    "vision_config": {
        "hidden_size": 1152, "n_layers": 27, "input_size": [378, 378], "patch_size": 14, "vit_layers": [-4, -10],
        "output_size": 2048,
        "block_config": {"attn_config": dict(_VLM_HEADS), "ffn_config": {"size": 4304}},
        "vl_connector_config": {"attn_pooling_config": dict(_VLM_HEADS), "mlp_projector_config": {"size": 6144}},
    },
}
VLM_PREPROCESSOR_REAL: dict[str, Any] = {
    "base_input_size": [378, 378], "crop_size": 378, "image_base_patch_h": 27, "image_base_patch_w": 27,
    "overlap_margins": [4, 4], "token_length_h": 14, "token_length_w": 14, "tokens_per_image": 196, "max_crops": 12,
    "min_pixels": 3136, "max_pixels": 1003520, "size": {"longest_edge": 1003520, "shortest_edge": 3136},
}
VLM_SHARDS = 3  # the real checkpoint: 3 shards + model.safetensors.index.json
POOL_SIZE = 16_777_259  # random values tiled into the weights (a prime: rows do not repeat in step)
_NORM = re.compile(r"(norm|ln_f)[^.]*\.weight$")
_BIAS = re.compile(r"(\.bias|\.[qkv]_b)$")


# ------------------------------------------------------------------------------ real-size checkpoints


def merged(base: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    """`base` with `changes` applied, nested dicts merged key by key."""
    out = copy.deepcopy(base)
    for key, value in changes.items():
        out[key] = merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def readerlm_shapes(folder: Path) -> dict[str, tuple[int, ...]]:
    """Qwen2ForCausalLM's keys and shapes for folder/config.json (lm_head.weight included, as the file has it)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config.from_pretrained(str(folder), local_files_only=True)
    with torch.device("meta"):
        model = Qwen2ForCausalLM(config)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def vlm_shapes(folder: Path) -> dict[str, tuple[int, ...]]:
    """jina-vlm's checkpoint keys and shapes for folder/config.json, as `JinaVLM._load_model` expects them."""
    from embindex.models.jina_vlm import VisionTower, text_config, text_layout, vision_config

    raw = json.loads((folder / "config.json").read_text())
    vc, tc = vision_config(raw["vision_config"], "vision_config"), text_config(raw["text_config"], "text_config")
    with torch.device("meta"):
        vision = VisionTower(vc)
    out = {f"model.vision_model.{k}": tuple(v.shape) for k, v in vision.state_dict().items()}
    out.update({f"model.language_model.{k}": s for k, s in text_layout(tc).items()})
    out["lm_head.weight"] = (tc.vocab, tc.hidden)
    return out


def header_shapes(folder: Path) -> dict[str, tuple[int, ...]]:
    from safetensors import safe_open

    from embindex.models.checkpoint_files import safetensors_files

    out = {}
    for file in safetensors_files(str(folder)):
        with safe_open(file, "pt") as f:
            out.update({k: tuple(f.get_slice(k).get_shape()) for k in f.keys()})  # noqa: SIM118
    return out


def check_layout(name: str, fixture: Path, shapes: Callable[[Path], dict[str, tuple[int, ...]]]) -> None:
    """The key generator at the fixture's sizes must give exactly the fixture's keys and shapes."""
    want, have = shapes(fixture), header_shapes(fixture)
    if want != have:
        wrong = sorted(k for k in set(want) | set(have) if want.get(k) != have.get(k))
        raise SystemExit(f"{name}: generated layout differs from the fixture's: {wrong[:6]}")


def random_tensor(key: str, shape: tuple[int, ...], pool: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Norm weights 1, biases 0, anything else a slice of the random pool at a random offset, tiled."""
    if _NORM.search(key):
        return torch.ones(shape, dtype=pool.dtype)
    if _BIAS.search(key):
        return torch.zeros(shape, dtype=pool.dtype)
    n = int(np.prod(shape))
    start = int(torch.randint(0, len(pool), (1,), generator=gen))
    reps = -(-(start + n) // len(pool))
    return pool.repeat(reps)[start:start + n].reshape(shape).clone()


def shard_keys(shapes: dict[str, tuple[int, ...]], shards: int) -> list[list[str]]:
    """Keys in order, cut into `shards` groups of about equal size."""
    sizes = {k: int(np.prod(s)) for k, s in shapes.items()}
    per = sum(sizes.values()) / shards
    groups: list[list[str]] = [[]]
    acc = 0
    for k in shapes:
        if acc >= per * len(groups) and len(groups) < shards:
            groups.append([])
        groups[-1].append(k)
        acc += sizes[k]
    return groups


def write_weights(folder: Path, shapes: dict[str, tuple[int, ...]], shards: int, dtype: torch.dtype,
                  seed: int) -> int:
    """Random weights into model.safetensors, or `shards` files + model.safetensors.index.json; one shard in
    memory at a time. Returns the parameter count."""
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(seed)
    pool = torch.empty(POOL_SIZE, dtype=torch.float32).normal_(0.0, 0.02, generator=gen).to(dtype)
    groups = shard_keys(shapes, shards)
    weight_map: dict[str, str] = {}
    total = 0
    for i, keys in enumerate(groups):
        name = "model.safetensors" if shards == 1 else f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        tensors = {k: random_tensor(k, shapes[k], pool, gen) for k in keys}
        save_file(tensors, str(folder / name), metadata={"format": "pt"})
        total += sum(t.numel() for t in tensors.values())
        weight_map.update({k: name for k in keys})
        del tensors
    if shards > 1:
        index = {"metadata": {"total_size": total * pool.element_size()}, "weight_map": weight_map}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return total


@dataclass
class RealModel:
    """How to write one real-size checkpoint from its fixture."""

    name: str
    fixture: Path
    config: dict[str, Any]
    copied: tuple[str, ...]
    shapes: Callable[[Path], dict[str, tuple[int, ...]]]
    shards: int
    extra_files: dict[str, Any] = field(default_factory=dict)  # file name -> JSON content


def real_models() -> dict[str, RealModel]:
    pre = json.loads((VLM / "preprocessor_config.json").read_text())
    return {
        "readerlm-v2": RealModel("readerlm-v2", READERLM, READERLM_REAL, READERLM_FILES, readerlm_shapes, 1),
        "jina-vlm": RealModel("jina-vlm", VLM, VLM_REAL, VLM_FILES, vlm_shapes, VLM_SHARDS,
                              {"preprocessor_config.json": merged(pre, VLM_PREPROCESSOR_REAL)}),
    }


def write_real(m: RealModel, folder: Path, ckpt_dtype: str, seed: int) -> dict[str, Any]:
    """config.json (the fixture's with the real sizes), copied tokenizer / processor files, random weights."""
    cfg = merged(json.loads((m.fixture / "config.json").read_text()), m.config)
    cfg["torch_dtype" if "torch_dtype" in cfg else "dtype"] = ckpt_dtype
    manifest = {"model": m.name, "config": cfg, "extra": m.extra_files, "ckpt_dtype": ckpt_dtype, "seed": seed,
                "shards": m.shards, "pool": POOL_SIZE}
    mfile = folder / "bench_manifest.json"
    if mfile.exists():
        saved = json.loads(mfile.read_text())
        if {k: v for k, v in saved.items() if k != "written"} == manifest:
            return {"reused": True, **saved["written"]}
    t0 = time.perf_counter()
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    for name in m.copied:
        shutil.copyfile(m.fixture / name, folder / name)
    for name, content in m.extra_files.items():
        (folder / name).write_text(json.dumps(content, indent=2) + "\n")
    (folder / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    params = write_weights(folder, m.shapes(folder), m.shards, getattr(torch, ckpt_dtype), seed)
    os.sync()  # flush now, not during the timed calls
    size = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    written = {"params_in_file": params, "gib": round(size / 2**30, 2)}
    mfile.write_text(json.dumps({**manifest, "written": written}) + "\n")
    return {"reused": False, "write_s": round(time.perf_counter() - t0, 1), **written}


# ------------------------------------------------------------------------------ inputs


def page_texts(n: int) -> list[str]:
    """The fixture's five pages, repeated in order to n documents."""
    pages = [(READERLM / p).read_text(encoding="utf-8") for p in PAGES]
    return [pages[i % len(pages)] for i in range(n)]


def synthetic_image(height: int, width: int, rng: np.random.Generator) -> Any:
    """A smooth random colour field with noise (RGB PIL image)."""
    from PIL import Image

    coarse = rng.integers(0, 256, size=(4, 4, 3), dtype=np.uint8)
    img = Image.fromarray(coarse).resize((width, height), Image.BICUBIC)
    arr = np.asarray(img, dtype=np.int16) + rng.integers(-12, 13, size=(height, width, 3))
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def vlm_images(n: int, sizes: Sequence[tuple[int, int]], seed: int) -> list[Any]:
    """The fixture's two PNGs, then synthetic images of `sizes` (h, w), cycled to n images."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    pool = [Image.open(VLM / name).convert("RGB") for name in ("photo_80x60.png", "banner_90x150.png")]
    pool += [synthetic_image(h, w, rng) for h, w in sizes]
    return [pool[i % len(pool)] for i in range(n)]


# ------------------------------------------------------------------------------ generator timing


class PhaseTimer:
    """Forward hooks that add up wall time of prefill forwards (sequence length > 1, and `prefill_only`
    modules such as a vision tower) and of decode forwards (one new token per row). `followers` (a separate
    lm_head) count toward the phase of the decoder call before them."""

    def __init__(self, decoder: torch.nn.Module, followers: Sequence[torch.nn.Module] = (),
                 prefill_only: Sequence[torch.nn.Module] = (), sync: Callable[[], None] = lambda: None):
        self.sync = sync  # CUDA: wait for the kernels, so a module's time is its own
        self.seconds = {"prefill": 0.0, "decode": 0.0}
        self.decode_rows = 0  # rows x decode steps computed (finished rows in a batch included)
        self.phase = "prefill"
        self._start: dict[int, float] = {}
        self._handles = [decoder.register_forward_pre_hook(self._pre_decoder, with_kwargs=True),
                         decoder.register_forward_hook(self._post)]
        for mod in followers:
            self._handles += [mod.register_forward_pre_hook(self._pre), mod.register_forward_hook(self._post)]
        for mod in prefill_only:
            self._handles += [mod.register_forward_pre_hook(self._pre_prefill), mod.register_forward_hook(self._post)]

    def reset(self) -> None:
        self.seconds = {"prefill": 0.0, "decode": 0.0}
        self.decode_rows = 0

    def _pre_decoder(self, mod: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        x = kwargs.get("input_ids")
        x = kwargs.get("inputs_embeds") if x is None else x
        x = args[0] if x is None else x
        self.phase = "decode" if x.shape[1] == 1 else "prefill"
        if self.phase == "decode":
            self.decode_rows += int(x.shape[0])
        self._pre(mod, args)

    def _pre_prefill(self, mod: torch.nn.Module, args: tuple) -> None:
        self.phase = "prefill"
        self._pre(mod, args)

    def _pre(self, mod: torch.nn.Module, args: tuple) -> None:
        self.sync()
        self._start[id(mod)] = time.perf_counter()

    def _post(self, mod: torch.nn.Module, args: tuple, output: Any) -> None:
        self.sync()
        self.seconds[self.phase] += time.perf_counter() - self._start.pop(id(mod))

    def close(self) -> None:
        for h in self._handles:
            h.remove()


def device_sync(device: torch.device) -> Callable[[], None]:
    return (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)


def phase_timer(gen: Any) -> PhaseTimer:
    sync = device_sync(gen.device)
    if hasattr(gen, "decoder"):  # jina-vlm: Qwen3Model + separate lm_head + vision tower
        return PhaseTimer(gen.decoder, followers=[gen.lm_head], prefill_only=[gen.vision], sync=sync)
    return PhaseTimer(gen.model, sync=sync)  # ReaderLM-v2: Qwen2ForCausalLM (lm_head inside)


def one_call(gen: Any, timer: PhaseTimer, inputs: list[Any], max_new: int, batch_tokens: int | None
             ) -> dict[str, Any]:
    """One timed `generate` call: wall / CPU seconds, tokens, batches, prefill / decode split, ids."""
    from embindex.models.generator import length_batches

    sync = device_sync(gen.device)
    timer.reset()
    load0 = loadavg()
    sync()
    c0, t0 = time.process_time(), time.perf_counter()
    out = gen.generate(inputs, max_new, batch_tokens)
    sync()
    wall = time.perf_counter() - t0
    rejects = [g.reject for g in out if g.reject]
    if rejects:
        raise SystemExit(f"{gen.name}: {len(rejects)} input(s) rejected, e.g. {rejects[0]}")
    lengths = [g.prompt_tokens for g in out]
    return {"seconds": wall, "cpu_share": (time.process_time() - c0) / wall, "generated": sum(len(g.ids) for g in out),
            "prompt_tokens": sum(lengths), "batches": len(length_batches(lengths, max_new, batch_tokens)),
            "finished": sum(g.finished for g in out), "prefill_s": timer.seconds["prefill"],
            "decode_s": timer.seconds["decode"], "decode_rows": timer.decode_rows, "load": f"{load0} -> {loadavg()}",
            "ids": [g.ids for g in out]}


def median_call(calls: list[dict[str, Any]]) -> dict[str, Any]:
    """The call with the median wall time (the lower middle one for an even count)."""
    return sorted(calls, key=lambda c: c["seconds"])[(len(calls) - 1) // 2]


def bench_generator(label: str, family: str, path: Path, inputs: list[Any], max_new: int, batch_tokens: int,
                    repeats: int, dtype: str, threads: int, options: dict[str, Any], device: str = "cpu"
                    ) -> dict[str, Any]:
    """Load one generator, one untimed warm-up call, then `repeats` x (unbatched, batched) timed calls."""
    from embindex.models.registry import load_generator

    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    gen = load_generator(family, str(path), device=device, dtype=dtype, **options)
    device_sync(gen.device)()
    load_s = time.perf_counter() - t0
    params = sum(p.numel() for mod in (getattr(gen, "model", None), getattr(gen, "vision", None),
                                       getattr(gen, "decoder", None)) if mod is not None for p in mod.parameters())
    if hasattr(gen, "lm_head"):
        params += gen.lm_head.weight.numel()
    log(f"[{label}] {family} loaded in {load_s:.1f}s ({params / 1e6:,.1f}M parameters, {dtype}, {gen.device}, "
        f"{threads} threads)")
    gen.generate(inputs[:1], min(max_new, 2))  # warm-up: first-call allocations
    timer = phase_timer(gen)
    runs: dict[str, list[dict[str, Any]]] = {"unbatched": [], "batched": []}
    try:
        for r in range(repeats):
            for mode, budget in (("unbatched", None), ("batched", batch_tokens)):
                runs[mode].append(one_call(gen, timer, inputs, max_new, budget))
                c = runs[mode][-1]
                log(f"[{label}] {family} {mode} #{r}: {c['seconds']:.2f}s, {c['generated']} tokens "
                    f"({c['generated'] / c['seconds']:.1f}/s), {c['batches']} batches, load {c['load']}")
    finally:
        timer.close()
    un, ba = median_call(runs["unbatched"]), median_call(runs["batched"])
    same = sum(a == b for a, b in zip(un["ids"], ba["ids"]))
    for c in runs["unbatched"] + runs["batched"]:
        c.pop("ids")
    del gen
    return {"label": label, "family": family, "dtype": dtype, "device": device, "threads": threads, "params": params,
            "load_s": load_s, "inputs": len(inputs), "max_new_tokens": max_new, "batch_tokens": batch_tokens,
            "options": options,
            "unbatched": un, "batched": ba, "runs": runs, "same_ids": same,
            "ratio": (ba["generated"] / ba["seconds"]) / (un["generated"] / un["seconds"]),
            "ratio_cpu": (ba["generated"] / (ba["seconds"] * ba["cpu_share"]))
            / (un["generated"] / (un["seconds"] * un["cpu_share"]))}


def tiny_generators(args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = []
    for name in args.generators:
        if name == "readerlm-v2":
            inputs, path = [_text_input(t) for t in page_texts(args.tiny_docs)], READERLM
        else:
            inputs, path = [_image_input(im) for im in vlm_images(args.tiny_images, TINY_IMAGE_SIZES, args.seed)], VLM
        rows.append(bench_generator("tiny", name, path, inputs, args.tiny_max_new, args.batch_tokens,
                                    args.tiny_repeats, args.tiny_dtype, args.threads, {}, args.device))
    return rows


def real_generators(args: argparse.Namespace) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Write, load, measure and delete one real-size model at a time."""
    import gc

    models = real_models()
    check_layout("readerlm-v2", READERLM, readerlm_shapes)
    check_layout("jina-vlm", VLM, vlm_shapes)
    tmp = None if args.workdir else tempfile.mkdtemp(prefix="embindex-stages-")
    root = Path(args.workdir or tmp)
    rows, written = [], {}
    try:
        for name in args.generators:
            folder = root / f"{name}-real"
            log(f"[real] writing {name} ({args.ckpt_dtype}) to {folder} ...")
            written[name] = write_real(models[name], folder, args.ckpt_dtype, args.seed)
            log(f"[real] {name}: {written[name]}")
            if name == "readerlm-v2":
                inputs = [_text_input(t) for t in page_texts(args.real_docs)]
                options: dict[str, Any] = {"max_input_tokens": args.real_max_input}
            else:
                sizes = [(h, h * 4 // 3) for h in args.real_image_heights]
                inputs = [_image_input(im) for im in vlm_images(args.real_images, sizes, args.seed)]
                options = {}
            rows.append(bench_generator("real", name, folder, inputs, args.real_max_new, args.batch_tokens,
                                        args.real_repeats, args.dtype, args.threads, options, args.device))
            gc.collect()
            if not args.workdir:
                shutil.rmtree(folder, ignore_errors=True)
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    return rows, written


def _text_input(text: str) -> Any:
    from embindex.models.generator import GenerationInput

    return GenerationInput(text=text)


def _image_input(image: Any) -> Any:
    from embindex.models.generator import GenerationInput

    return GenerationInput(image=image)


# ------------------------------------------------------------------------------ end to end


def variant_page(html: str, i: int) -> bytes:
    """A fixture page made distinct: its own title and a paragraph after <body>."""
    words = " ".join(f"w{(i * 7 + k) % 97}" for k in range(8 + i % 13))
    html = re.sub(r"<title>.*?</title>", f"<title>Page {i}</title>", html, count=1, flags=re.S | re.I)
    html = re.sub(r"(<body[^>]*>)", rf"\1\n<p>Variation {i}: {words}.</p>", html, count=1, flags=re.I)
    return html.encode("utf-8")


def write_crawl(folder: Path, pages: int, files: int) -> Path:
    """`pages` HTML responses (distinct URLs) in `files` gzipped WARC files under folder/crawl/."""
    from warcio.statusandheaders import StatusAndHeaders
    from warcio.warcwriter import WARCWriter

    root = folder / "crawl"
    root.mkdir(parents=True, exist_ok=True)
    texts = page_texts(pages)
    for f, part in enumerate(np.array_split(np.arange(pages), files)):
        buf = io.BytesIO()
        w = WARCWriter(buf, gzip=True)
        for i in part:
            body = variant_page(texts[i], int(i))
            http = StatusAndHeaders("200 OK", [("Content-Type", "text/html; charset=utf-8"),
                                               ("Content-Length", str(len(body)))], protocol="HTTP/1.1")
            uri = f"https://example.org/{PAGES[i % len(PAGES)].removesuffix('.html')}/{i}"
            w.write_record(w.create_warc_record(uri, "response", payload=io.BytesIO(body), http_headers=http))
        (root / f"crawl-{f:03d}.warc.gz").write_bytes(buf.getvalue())
    return root


def e2e_config(crawl: Path, index: Path, args: argparse.Namespace, generate: bool) -> dict[str, Any]:
    """A small job (tests/conftest.py `job_config` style) over the crawl, with or without html_to_markdown."""
    stages: list[Any] = ["read", "normalize", "tokenize", "embed", "write"]
    if generate:
        stages.insert(2, {"stage": "html_to_markdown", "model": {"path": str(READERLM), "dtype": args.tiny_dtype},
                          "max_new_tokens": args.e2e_max_new,
                          "resources": {"actors": 1, "batch_tokens": args.batch_tokens}})
    return {
        "source": {"uri": str(crawl), "format": "warc"},
        "stages": stages,
        "model": {"name": "hf-encoder", "path": EMBED_MODEL, "dtype": args.dtype, "max_length": 256},
        "index": {"uri": str(index), "tiers": [64, "full"], "quality_sample": 100},
        "resources": {"actors": 1, "batch_tokens": 4096},
        "run": {"progress": False},
    }


def run_build(cfg: dict[str, Any], tag: str) -> dict[str, Any]:
    import embindex

    lines: list[str] = []
    load0 = loadavg()
    t0 = time.perf_counter()
    res = embindex.build(cfg, log=lines.append)
    seconds = time.perf_counter() - t0
    stages = [s if isinstance(s, str) else {k: s[k] for k in ("stage", "family", "max_new_tokens", "counts")}
              for s in res.manifest.stages]
    reasons: dict[str, int] = {}
    for r in res.manifest.rejects:
        for k, v in r.reasons.items():
            reasons[k] = reasons.get(k, 0) + v
    out = {"tag": tag, "seconds": seconds, "counts": dict(res.counts), "timings": dict(res.timings),
           "stages": stages, "rejects": reasons, "actors": [ln.strip() for ln in lines if "actors:" in ln],
           "load": f"{load0} -> {loadavg()}"}
    log(f"[e2e] {tag}: {seconds:.1f}s, {res.counts['documents']} documents, stages {stages}, load {out['load']}")
    return out


def end_to_end(args: argparse.Namespace) -> dict[str, Any]:
    import ray
    import ray.data

    with tempfile.TemporaryDirectory(prefix="embindex-stages-e2e-") as tmp:
        work = Path(tmp)
        crawl = write_crawl(work, args.e2e_pages, args.e2e_files)
        t0 = time.perf_counter()
        ray.init(num_cpus=3, include_dashboard=False, log_to_driver=False, configure_logging=False)
        ray.data.DataContext.get_current().enable_progress_bars = False
        ray_init_s = time.perf_counter() - t0
        try:
            if args.e2e_warmup:  # Ray's first tasks and actors start worker processes; not timed
                small = write_crawl(work / "warmup", 10, 1)
                run_build(e2e_config(small, work / "index-warmup", args, True), "warm-up (not counted)")
            runs: dict[str, list[dict[str, Any]]] = {"plain": [], "generate": []}
            for r in range(args.e2e_repeats):
                for tag, gen in (("plain", False), ("generate", True)):
                    cfg = e2e_config(crawl, work / f"index-{tag}-{r}", args, gen)
                    runs[tag].append(run_build(cfg, f"{tag}#{r}"))
        finally:
            ray.shutdown()
    plain, gen = median_call(runs["plain"]), median_call(runs["generate"])
    docs_p, docs_g = plain["counts"]["documents"] / plain["seconds"], gen["counts"]["documents"] / gen["seconds"]
    return {"pages": args.e2e_pages, "files": args.e2e_files, "max_new_tokens": args.e2e_max_new,
            "ray_init_s": ray_init_s, "plain": plain, "generate": gen, "runs": runs,
            "docs_per_s": {"plain": docs_p, "generate": docs_g}, "ratio": docs_g / docs_p,
            "stages_ratio": (gen["counts"]["documents"] / gen["timings"]["pipeline_s"])
            / (plain["counts"]["documents"] / plain["timings"]["pipeline_s"])}


# ------------------------------------------------------------------------------ report


def machine(args: argparse.Namespace) -> str:
    import transformers

    from embindex.models.device import cpu_supports_bf16

    isa = "bf16 ISA" if cpu_supports_bf16() else "no bf16 ISA"
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    gpu = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else "CPU only"
    return (f"{cpu_name()} ({os.cpu_count()} cores, {isa}), {mem:.0f} GiB, {gpu}; torch {torch.__version__}, "
            f"transformers {transformers.__version__}, Python {platform.python_version()}")


def device_label(g: dict[str, Any]) -> str:
    return f"{g['threads']} thr" if g["device"] == "cpu" else g["device"]


def rate(x: float) -> str:
    return f"{x:.2f}" if x < 10 else f"{x:,.1f}"


def generator_rows(rows: list[dict[str, Any]]) -> list[str]:
    head = ("| size | generator | params | inputs (prompt tokens) | max_new | mode | batches | s (median) | "
            "CPU-s / wall-s | prefill s / decode s | generated | **tokens/s** | tokens / CPU-s | prefill tok/s "
            "| decode tok/s | batched / unbatched |")
    out = [head, "|---" * (head.count("|") - 1) + "|"]
    for g in rows:
        for mode in ("unbatched", "batched"):
            c = g[mode]
            budget = "none" if mode == "unbatched" else f"{g['batch_tokens']:,}"
            ratio = (f"**{g['ratio']:.2f}x** wall, {g['ratio_cpu']:.2f}x CPU (same ids {g['same_ids']}/{g['inputs']})"
                     if mode == "batched" else "")
            decode_tok = c["decode_rows"] / c["decode_s"] if c["decode_s"] else float("nan")
            out.append("| " + " | ".join([
                g["label"], f"{g['family']} ({g['dtype']}, {device_label(g)})", f"{g['params'] / 1e6:,.1f}M",
                f"{g['inputs']} ({c['prompt_tokens']:,})", str(g["max_new_tokens"]), f"{mode} (budget {budget})",
                str(c["batches"]), f"{c['seconds']:.2f}", f"{c['cpu_share']:.2f}",
                f"{c['prefill_s']:.2f} / {c['decode_s']:.2f}", str(c["generated"]),
                f"**{rate(c['generated'] / c['seconds'])}**", rate(c["generated"] / (c["seconds"] * c["cpu_share"])),
                rate(c["prompt_tokens"] / c["prefill_s"]),
                rate(decode_tok), ratio]) + " |")
    return out


def e2e_rows(e: dict[str, Any]) -> list[str]:
    out = ["| build | stages | documents (rejects) | s (excl. ray.init) | **docs/s** | stages s (docs/s) | "
           "generated docs / tokens | with / without: build (stages) |", "|---|---|---|---|---|---|---|---|"]
    for tag in ("plain", "generate"):
        b = e[tag]
        gen = next((s for s in b["stages"] if isinstance(s, dict)), None)
        names = " -> ".join(s if isinstance(s, str) else s["stage"] for s in b["stages"])
        counts = f"{gen['counts'].get('documents', 0)} / {gen['counts'].get('tokens', 0):,}" if gen else "-"
        ratio = f"**{e['ratio']:.2f}x** ({e['stages_ratio']:.2f}x)" if tag == "generate" else ""
        rejects = ", ".join(f"{k} {v}" for k, v in sorted(b["rejects"].items())) or "none"
        pipe = b["timings"]["pipeline_s"]
        out.append(f"| {tag} | {names} | {b['counts']['documents']} ({rejects}) | {b['seconds']:.1f} | "
                   f"**{rate(e['docs_per_s'][tag])}** | {pipe:.1f} ({rate(b['counts']['documents'] / pipe)}) | "
                   f"{counts} | {ratio} |")
    return out


def print_report(res: dict[str, Any]) -> None:
    print(f"\ncommand: {res['command']}")
    print(f"machine: {res['machine']}")
    print(f"load average (1/5/15 min): start {res['load_start']}, end {res['load_end']}")
    if res.get("generators"):
        print("\nGenerated tokens/s per actor (one generator in this process), unbatched vs batched:\n")
        print("\n".join(generator_rows(res["generators"])))
        for g in res["generators"]:
            if g["options"]:
                print(f"  {g['label']} {g['family']} options: {g['options']}")
    if res.get("checkpoints"):
        print(f"\nreal-size checkpoints: {json.dumps(res['checkpoints'])}")
    if res.get("e2e"):
        e = res["e2e"]
        print(f"\nEnd to end: {e['pages']} pages in {e['files']} .warc.gz files, html_to_markdown max_new_tokens "
              f"{e['max_new_tokens']}, ray.init {e['ray_init_s']:.1f}s (not counted):\n")
        print("\n".join(e2e_rows(e)))
        for tag in ("plain", "generate"):
            b = e[tag]
            print(f"  {tag}: counts {b['counts']}; timings {b['timings']}; load {b['load']}")
            print(f"  {tag}: manifest stages {json.dumps(b['stages'])}")
            for line in b["actors"]:
                print(f"  {tag}: {line}")


# ------------------------------------------------------------------------------ main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    from embindex.models.device import cpu_supports_bf16

    p = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    p.add_argument("--parts", nargs="+", default=["generators", "e2e"], choices=["generators", "e2e"])
    p.add_argument("--generators", nargs="+", default=["readerlm-v2", "jina-vlm"], choices=["readerlm-v2", "jina-vlm"])
    p.add_argument("--real-size", action=argparse.BooleanOptionalAction, default=True,
                   help="also measure random real-size ReaderLM-v2 and jina-vlm (default on)")
    p.add_argument("--device", default="cpu", help="generators' device: cpu, or cuda for a GPU run (part 1; "
                   "part 2 runs where the pipeline puts its actors)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16"],
                   help="real-size generators and the e2e embedding model (default: bfloat16 on CUDA or on a CPU "
                   "with bf16 instructions, else float32)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads of the generators (a generate actor's share of a 2-core machine: 1)")
    p.add_argument("--batch-tokens", type=int, default=16384,
                   help="padded prompt + max_new_tokens per batched generate call (the stage's default)")
    p.add_argument("--tiny-docs", type=int, default=40, help="HTML pages for readerlm-v2-tiny")
    p.add_argument("--tiny-images", type=int, default=24, help="images for jina-vlm-tiny")
    p.add_argument("--tiny-max-new", type=int, default=24)
    p.add_argument("--tiny-repeats", type=int, default=3, help="timed calls per mode, tiny (median)")
    p.add_argument("--tiny-dtype", default="float32", choices=["float32", "bfloat16"],
                   help="tiny fixtures (also the e2e html_to_markdown stage)")
    p.add_argument("--real-docs", type=int, default=4, help="HTML pages for the real-size ReaderLM-v2")
    p.add_argument("--real-max-input", type=int, default=128, help="ReaderLM-v2 max_input_tokens at real size")
    p.add_argument("--real-images", type=int, default=2, help="images for the real-size jina-vlm")
    p.add_argument("--real-image-heights", type=int, nargs="+", default=[120],
                   help="synthetic images (4:3) after the fixture's two PNGs, real size")
    p.add_argument("--real-max-new", type=int, default=8)
    p.add_argument("--real-repeats", type=int, default=2, help="timed calls per mode, real size (of 2: the faster)")
    p.add_argument("--ckpt-dtype", default="bfloat16", choices=["float32", "bfloat16"],
                   help="dtype of the random real-size weights on disk (cast to --dtype at load)")
    p.add_argument("--workdir", default=None, help="keep the real-size checkpoints here (reused when they match)")
    p.add_argument("--e2e-pages", type=int, default=200)
    p.add_argument("--e2e-files", type=int, default=4)
    p.add_argument("--e2e-max-new", type=int, default=32)
    p.add_argument("--e2e-repeats", type=int, default=1)
    p.add_argument("--e2e-warmup", action=argparse.BooleanOptionalAction, default=True,
                   help="one untimed build of 10 pages through both stages first (Ray worker start-up)")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.dtype is None:
        args.dtype = "bfloat16" if args.device.startswith("cuda") or cpu_supports_bf16() else "float32"
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    res: dict[str, Any] = {
        "command": " ".join([".venv/bin/python benchmarks/stages.py", *(argv if argv is not None else sys.argv[1:])]),
        "machine": machine(args), "load_start": loadavg(), "args": vars(args), "generators": []}
    t0 = time.perf_counter()
    if "generators" in args.parts:
        res["generators"] += tiny_generators(args)
    if "e2e" in args.parts:
        res["e2e"] = end_to_end(args)
    if "generators" in args.parts and args.real_size:
        rows, res["checkpoints"] = real_generators(args)
        res["generators"] += rows
    res["load_end"] = loadavg()
    res["wall_s"] = time.perf_counter() - t0
    res["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print_report(res)
    print(f"\nwall {res['wall_s']:.0f}s, peak RSS {res['peak_rss_gib']:.1f} GiB")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
