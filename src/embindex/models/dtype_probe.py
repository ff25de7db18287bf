"""`dtype: auto` on a CPU with native bf16 (AVX512-BF16 or AMX): bf16 only where it embeds like fp32.

bf16 runs ~2-4x faster than fp32 on such CPUs, but its 8-bit mantissa moves vectors by an amount that
depends on the model. At start-up the actor embeds a fixed probe batch with the fp32 encoder it loaded,
loads the same checkpoint in bf16, embeds the batch again and keeps bf16 only when the probe vectors'
mean cosine with their fp32 twins is >= `MIN_COSINE` and none is below `MIN_COSINE_ANY` (short inputs
average less of the rounding away: a two-token text moves most). Otherwise (or without the
instructions, where bf16 is emulated and slow) it stays fp32. The manifest records the dtype that ran
(`model.dtype`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from .device import cpu_supports_bf16
from .embedder import Embedder
from .registry import load_family

MIN_COSINE = 0.9999  # mean over the probe vectors
MIN_COSINE_ANY = 0.9995  # every probe vector

# short and long, prose, code, markup, numbers, non-Latin scripts: what a corpus mixes
PROBE_TEXTS: tuple[str, ...] = (
    "How do I read a gzip-compressed file line by line?",
    "The mitochondrion is the organelle that produces most of the cell's supply of adenosine triphosphate, "
    "used as a source of chemical energy; it has its own small genome, inherited from the mother.",
    "def merge(a, b):\n    out = []\n    while a and b:\n        out.append(a.pop(0) if a[0] < b[0] else b.pop(0))\n"
    "    return out + a + b",
    "<table><tr><th>Quarter</th><th>Revenue</th></tr><tr><td>Q3 2024</td><td>$1.27B (+14% YoY)</td></tr></table>",
    "Die Bahn fährt heute wegen Bauarbeiten zwischen Köln und Bonn nur stündlich; Ersatzbusse verkehren.",
    "東京の天気は明日、午前中は晴れ、午後から雨の予報です。",
    "Error: connection refused (errno 111) while contacting 10.0.3.7:5432 after 3 retries",
    "ok",
)


@dataclass(frozen=True)
class DtypeChoice:
    dtype: str  # what runs: "bfloat16" or "float32"
    reason: str
    mean_cosine: float | None = None
    min_cosine: float | None = None


def _vectors(embed: Callable[[Sequence[str]], object]) -> np.ndarray:
    """Probe vectors as rows: pooled vectors, or every token vector of multi-vector output."""
    out = embed(PROBE_TEXTS)
    return np.concatenate(out) if isinstance(out, list) else np.asarray(out)


def choose_cpu_dtype(embedder: Embedder, task: str | None, multivector: bool = False) -> DtypeChoice:
    """For an fp32 `embedder` on CPU loaded from `dtype: auto`: switch its encoder to bf16 when the probe
    allows it (see the module docstring); returns what runs and why."""
    if not cpu_supports_bf16():
        return DtypeChoice("float32", "this CPU has no native bf16 instructions")

    def embed(texts: Sequence[str]):
        return embedder.encode_tokens(texts, task=task) if multivector else embedder.encode(texts, task=task)

    reference = _vectors(embed)
    fp32 = embedder.encoder
    bf16_family = load_family(dataclasses.replace(embedder.family.spec, dtype="bfloat16"))
    embedder.encoder = bf16_family.load_encoder(getattr(fp32, "device", None))
    candidate = _vectors(embed)
    a = reference / np.maximum(np.linalg.norm(reference, axis=1, keepdims=True), 1e-12)
    b = candidate / np.maximum(np.linalg.norm(candidate, axis=1, keepdims=True), 1e-12)
    cos = np.sum(a * b, axis=1)
    mean, worst = float(np.mean(cos)), float(np.min(cos))
    measured = f"bf16 probe against fp32: mean cosine {mean:.6f}, min {worst:.6f}"
    if mean >= MIN_COSINE and worst >= MIN_COSINE_ANY:
        return DtypeChoice("bfloat16", f"{measured} (bars {MIN_COSINE} / {MIN_COSINE_ANY})", mean, worst)
    embedder.encoder = fp32
    return DtypeChoice("float32", f"{measured}: below the bars {MIN_COSINE} / {MIN_COSINE_ANY}", mean, worst)
