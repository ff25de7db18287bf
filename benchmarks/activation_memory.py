"""Peak activation memory of one forward (1 row, no padding) per embedding family at 512 / 2,048 / 8,192 tokens.

Run from the repository root (CPU, 2 cores: ~5-8 minutes):

    RAY_AUTH_MODE=disabled HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false \\
        .venv/bin/python benchmarks/activation_memory.py

Models. The bundled all-MiniLM-L6-v2 (`hf-encoder`) is the real model (6 layers; 512 positions, so only the
512-token row exists). Every other family is a random-weight checkpoint written from its tiny test fixture
(tests/fixtures/<family>-tiny: same key layout, tokenizer, LoRA adapters) with the widths of the real model:
hidden size, heads, KV heads, intermediate size, LoRA/projection output sizes (table below, `REAL`). Two things
stay at the fixture's values, and neither changes the activation peak of an inference forward:

* depth: 2 layers instead of 12-36. Under `torch.inference_mode` a layer's intermediates are freed before the
  next layer runs, so the peak is one layer's (checked at 2,048 tokens: jina-embeddings-v2 base widths 153 MiB
  with 2 layers, 190 with 12; Qwen2-0.5B widths 193 MiB with 2, 168 with 8: allocator noise, no trend);
* vocabulary: the fixture tokenizer's (1,000-1,500 pieces instead of 30k-250k). The embedding table is a
  lookup; only the weights would be larger, and weights are not counted here.

The image towers of jina-clip-v2 / -v4 load at the fixture's sizes (only text is measured).

Measurement. Each (family, length) runs in a fresh subprocess: load the model (fp32 unless --dtype), one
16-token warm-up forward, then reset the peak and run one forward of `length` random token ids (the family's
own `forward_pooled`, `forward_multi` for ColBERT). CPU: peak RSS growth over the forward (Linux `VmHWM`
after resetting it through /proc/self/clear_refs; `ru_maxrss` growth where that is not possible, which
misses peaks below the load-time peak). CUDA: `torch.cuda.max_memory_allocated()` minus the memory
allocated before the forward. Weights (RSS / allocated after loading) are reported separately.

Writes a markdown table on stdout and, unless --no-results, a section appended to benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from machine_info import cpu_name, loadavg, log  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
FIXTURES = REPO / "tests" / "fixtures"
LENGTHS = (512, 2048, 8192)
MIB = 2**20


# ---------------------------------------------------------------------------------------------------------
# Families: the real widths, as config.json edits plus a map of fixture tensor sizes to real ones
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Family:
    key: str  # table label
    name: str  # model.name
    fixture: str | None  # tests/fixtures directory; None: the bundled MiniLM (real weights)
    real: str  # the real model whose widths are used
    config: dict[str, Any] = field(default_factory=dict)  # dotted config.json fields -> real values
    dims: Callable[[str], dict[int, int]] = lambda key: {}  # checkpoint key -> {fixture size: real size}
    task: str | None = None
    multi: bool = False  # forward_multi (ColBERT) instead of forward_pooled
    max_positions: int | None = None  # longest input the architecture takes (None: no limit here)


def _same(dims: dict[int, int]) -> Callable[[str], dict[int, int]]:
    return lambda key: dims


def _v4_dims(key: str) -> dict[int, int]:
    """Text tensors at Qwen2.5-VL-3B widths; the vision tower stays tiny except its merger's output."""
    if "visual." not in key:
        return {64: 2048, 32: 256, 128: 11008, 16: 128}  # hidden, KV (2 x 128), MLP, projector
    return {64: 2048} if "merger.mlp.2." in key else {}


XLMR_LARGE = {"hidden_size": 1024, "num_attention_heads": 16, "intermediate_size": 4096}
XLMR_DIMS = {64: 1024, 192: 3072, 256: 4096}  # hidden, fused QKV, MLP
FAMILIES = [
    Family("hf-encoder", "hf-encoder", None, "all-MiniLM-L6-v2 (real weights, 6 x 384)", max_positions=512),
    Family("jina-embeddings-v2", "jina-embeddings-v2", "jina-embeddings-v2-tiny", "v2-base-en: 768, 12 heads, 3072",
           {"hidden_size": 768, "num_attention_heads": 12, "intermediate_size": 3072},
           _same({48: 768, 192: 3072, 384: 6144})),
    Family("jina-embeddings-v3", "jina-embeddings-v3", "jina-embeddings-v3-tiny", "XLM-R large: 1024, 16 heads, 4096",
           XLMR_LARGE, _same(XLMR_DIMS), task="retrieval.passage"),
    Family("jina-colbert-v2", "jina-colbert-v2", "jina-colbert-v2-tiny", "XLM-R large + 128-d tokens",
           {**XLMR_LARGE, "dim": 128}, _same({**XLMR_DIMS, 32: 128}), multi=True),
    Family("jina-clip-v2 text", "jina-clip-v2", "jina-clip-v2-tiny", "XLM-R large text tower, 1024-d projection",
           {"text_config.hf_model_config_kwargs.hidden_size": 1024,
            "text_config.hf_model_config_kwargs.num_attention_heads": 16,
            "text_config.hf_model_config_kwargs.intermediate_size": 4096,
            "text_config.embed_dim": 1024, "vision_config.embed_dim": 1024, "projection_dim": 1024,
            "vision_config.width": 1024, "vision_config.head_width": 64},
           _same({32: 1024, 85: 2730, 96: 3072, 128: 4096})),
    Family("jina-code-embeddings", "jina-code-embeddings", "jina-code-embeddings-tiny",
           "0.5b (Qwen2.5-Coder-0.5B): 896, 14/2 heads, 4864",
           {"hidden_size": 896, "num_attention_heads": 14, "num_key_value_heads": 2, "intermediate_size": 4864},
           _same({32: 128, 64: 896, 128: 4864}), task="nl2code"),
    Family("jina-embeddings-v4 text", "jina-embeddings-v4", "jina-embeddings-v4-tiny",
           "Qwen2.5-VL-3B text: 2048, 16/2 heads, 11008",
           {key: value for prefix in ("", "text_config.") for key, value in {
               f"{prefix}hidden_size": 2048, f"{prefix}num_attention_heads": 16, f"{prefix}num_key_value_heads": 2,
               f"{prefix}intermediate_size": 11008, f"{prefix}rope_scaling.mrope_section": [16, 24, 24]}.items()}
           | {"multi_vector_projector_dim": 128, "vision_config.out_hidden_size": 2048},
           _v4_dims, task="retrieval"),
]


# ---------------------------------------------------------------------------------------------------------
# Writing a checkpoint at real widths
# ---------------------------------------------------------------------------------------------------------


def _set(cfg: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, last = dotted.split(".")
    for p in parents:
        cfg = cfg[p]
    if last not in cfg:
        raise KeyError(f"config.json has no {dotted!r}")
    cfg[last] = value


def _rewrite_weights(src: Path, dst: Path, dims: Callable[[str], dict[int, int]], seed: int) -> int:
    """Random N(0, 0.02) tensors with each fixture size mapped to its real size; returns the parameter count."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    with safe_open(str(src), "pt") as f:
        metadata = f.metadata()
        for key in f.keys():  # noqa: SIM118 (safe_open is not iterable)
            t = f.get_tensor(key)
            shape = tuple(dims(key).get(d, d) for d in t.shape)
            if not t.is_floating_point():
                if shape != tuple(t.shape):
                    raise ValueError(f"{src}: cannot resize the integer tensor {key}")
                out[key] = t
                continue
            out[key] = (torch.randn(shape, generator=gen) * 0.02).to(t.dtype)
    save_file(out, str(dst), metadata=metadata)
    return sum(t.numel() for t in out.values())


def checkpoint_params(path: str) -> int:
    """Parameters in the checkpoint's safetensors files (LoRA adapters included), from their headers."""
    from safetensors import safe_open

    total = 0
    for file in Path(path).rglob("*.safetensors"):
        if file.name.startswith("golden"):
            continue
        with safe_open(str(file), "pt") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is not iterable)
                shape = f.get_slice(key).get_shape()
                total += _prod(shape)
    return total


def _prod(shape: list[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def write_checkpoint(family: Family, workdir: Path) -> tuple[str, int]:
    """The family's fixture at real widths in `workdir`; (path, parameters of the written weights)."""
    src, dst = FIXTURES / str(family.fixture), workdir / family.name
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("golden*", "*.png", "crosscheck*"))
    cfg = json.loads((dst / "config.json").read_text())
    for dotted, value in family.config.items():
        _set(cfg, dotted, value)
    (dst / "config.json").write_text(json.dumps(cfg, indent=2))
    params = 0
    for i, weights in enumerate(sorted(dst.rglob("*.safetensors"))):
        params += _rewrite_weights(weights, weights, family.dims, seed=i)
    return str(dst), params


# ---------------------------------------------------------------------------------------------------------
# One measurement (in its own process)
# ---------------------------------------------------------------------------------------------------------


def _status_kib(field_name: str) -> int | None:
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return None
    m = re.search(rf"^{field_name}:\s+(\d+) kB", text, re.M)
    return int(m.group(1)) if m else None


def _reset_peak_rss() -> bool:
    """Reset Linux's peak-RSS mark (VmHWM) to the current RSS; False where that is not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return _status_kib("VmHWM") is not None


class PeakMemory:
    """Peak memory growth over a block of code: the CUDA allocator's peak, else the peak RSS."""

    def __init__(self, device: str):
        self.cuda = device.startswith("cuda")
        self.method = "torch.cuda.max_memory_allocated" if self.cuda else "VmHWM"
        self.base = 0.0

    def current(self) -> float:
        """MiB allocated (CUDA) or resident (CPU) now."""
        import torch

        if self.cuda:
            return torch.cuda.memory_allocated() / MIB
        return (_status_kib("VmRSS") or _max_rss_kib()) / 1024

    def start(self) -> None:
        import torch

        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = self.current()
        elif _reset_peak_rss():
            self.base = self.current()
        else:
            self.method, self.base = "ru_maxrss", _max_rss_kib() / 1024

    def growth(self) -> float:
        """MiB the peak rose above the memory in use at `start`."""
        import torch

        if self.cuda:
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() / MIB - self.base
        peak = _status_kib("VmHWM") if self.method == "VmHWM" else _max_rss_kib()
        return (peak or 0) / 1024 - self.base


def _max_rss_kib() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux


def _spec(family: Family, path: str, dtype: str, length: int) -> Any:
    from embindex.models import ModelSpec

    max_length = min(length, family.max_positions) if family.max_positions else None
    return ModelSpec(name=family.name, path=path, dtype=dtype, task=family.task, max_length=max_length)


def measure(family: Family, path: str, length: int, device: str, dtype: str) -> dict[str, Any]:
    """Load the family from `path` and measure one forward of `length` tokens."""
    import torch

    from embindex.models import load_family

    torch.set_num_threads(os.cpu_count() or 1)
    mem = PeakMemory(device)
    encoder = load_family(_spec(family, path, dtype, length)).load_encoder(device)
    forward = encoder.forward_multi if family.multi else encoder.forward_pooled
    ids = torch.randint(5, 1000, (1, length), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        forward(ids[:, :16], torch.ones_like(ids[:, :16]), family.task)  # one-time allocations
        mem.start()
        start = time.perf_counter()
        out = forward(ids, torch.ones_like(ids), family.task)
        peak = mem.growth()
    seconds = time.perf_counter() - start
    first = out[0] if isinstance(out, tuple) else out
    return {"peak_mib": peak, "seconds": seconds, "method": mem.method,
            "finite": bool(torch.isfinite(first.float()).all()) if first is not None else True}


def run_one(family: Family, path: str, length: int, args: argparse.Namespace) -> dict[str, Any]:
    """`measure` in a fresh subprocess (so one run's allocations cannot hide the next one's peak)."""
    cmd = [sys.executable, __file__, "--measure", family.key, path, str(length), "--device", args.device,
           "--dtype", args.dtype]
    try:
        run = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return {"skipped": f"over {args.timeout} s"}
    if run.returncode != 0:
        return {"skipped": "failed: " + (run.stderr.strip().splitlines() or ["?"])[-1][:200]}
    return json.loads(run.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------------------
# Table
# ---------------------------------------------------------------------------------------------------------


def _cell(r: dict[str, Any] | None) -> str:
    if r is None:
        return "n/a"
    if "skipped" in r:
        return f"skipped ({r['skipped']})"
    return f"{r['peak_mib']:,.0f} ({r['seconds']:.1f} s)"


def table(rows: list[tuple[Family, int, dict[int, dict[str, Any] | None]]], lengths: list[int]) -> str:
    head = "| family | widths used | parameters written | " + " | ".join(f"{n:,} tokens" for n in lengths) + " |"
    lines = [head, "|" + "---|" * (3 + len(lengths))]
    for family, params, results in rows:
        depth = "6 layers" if family.fixture is None else "2 layers"
        lines.append(f"| {family.key} | {family.real} | {params / 1e6:.1f} M ({depth}) | "
                     + " | ".join(_cell(results.get(n)) for n in lengths) + " |")
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


def _family(key: str) -> Family:
    found = [f for f in FAMILIES if f.key == key or f.name == key]
    if not found:
        raise SystemExit(f"unknown family {key!r}; choose from {[f.key for f in FAMILIES]}")
    return found[0]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--families", default=",".join(f.key for f in FAMILIES), help="comma list of family keys")
    ap.add_argument("--lengths", default=",".join(map(str, LENGTHS)))
    ap.add_argument("--device", default="cuda" if _cuda_available() else "cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--timeout", type=int, default=300, help="seconds per measurement before it is skipped")
    ap.add_argument("--results", default=str(REPO / "benchmarks" / "RESULTS.md"))
    ap.add_argument("--no-results", action="store_true", help="print only, do not append to RESULTS.md")
    ap.add_argument("--measure", nargs=3, metavar=("FAMILY", "PATH", "LENGTH"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.measure:
        key, path, length = args.measure
        print(json.dumps(measure(_family(key), path, int(length), args.device, args.dtype)))
        return 0

    from embindex.checkpoints import resolve_model_path

    lengths = [int(x) for x in args.lengths.split(",")]
    started = time.perf_counter()
    rows = []
    with tempfile.TemporaryDirectory(prefix="activation-memory-") as tmp:
        for family in map(_family, args.families.split(",")):
            if family.fixture is None:
                path = resolve_model_path("builtin:all-MiniLM-L6-v2")
                params = checkpoint_params(path)
            else:
                path, params = write_checkpoint(family, Path(tmp))
            results: dict[int, dict[str, Any] | None] = {}
            for n in lengths:
                if family.max_positions and n > family.max_positions:
                    results[n] = None
                    continue
                results[n] = run_one(family, path, n, args)
                log(f"{family.key} {n}: {results[n]} (load {loadavg()})")
            rows.append((family, params, results))
            if family.fixture is not None:
                shutil.rmtree(path)
    elapsed = time.perf_counter() - started
    text = table(rows, lengths)
    print(text)
    methods = sorted({r["method"] for _, _, res in rows for r in res.values() if r and "method" in r})
    section = (
        f"## Peak activation memory per family, 1 row ({'`' + args.device + '`'}, {args.dtype}; "
        f"`benchmarks/activation_memory.py`, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())})\n\n"
        "```\nRAY_AUTH_MODE=disabled HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false \\\n"
        f"    .venv/bin/python benchmarks/activation_memory.py{''.join(' ' + a for a in (argv or sys.argv[1:]))}\n```\n\n"
        f"{cpu_name()}, {os.cpu_count()} cores, {elapsed / 60:.1f} min. Cells: peak memory growth of one forward "
        f"in MiB ({', '.join(methods)}), forward seconds in brackets. Random weights at the real widths, 2 layers, "
        "the fixture's vocabulary (see the script's docstring); n/a: beyond the model's positions.\n\n"
        + text + "\n"
    )
    if not args.no_results:
        append_results(Path(args.results), section)
    return 0


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


if __name__ == "__main__":
    raise SystemExit(main())
