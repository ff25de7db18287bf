"""`dtype: auto` on CPU: bf16 only on CPUs with native bf16 and only when a probe batch embeds within
cosine 0.9999 of fp32 on average (0.9995 for every vector); the embed actor runs (and reports) what the
probe chose."""

from __future__ import annotations

import numpy as np
import pytest

from embindex.config import ModelConfig, OutputsConfig
from embindex.embed.actor import EmbedActor
from embindex.models import dtype_probe
from embindex.models.base import ModelSpec
from embindex.models.embedder import Embedder
from embindex.models.registry import load_family

FIXTURES = __import__("pathlib").Path(__file__).parent / "fixtures"


def _embedder(minilm_path: str) -> Embedder:
    return Embedder(load_family(ModelSpec(name="hf-encoder", path=minilm_path, dtype="auto", max_length=128)))


def test_no_bf16_instructions_keeps_fp32_without_loading_twice(minilm_path, monkeypatch):
    monkeypatch.setattr(dtype_probe, "cpu_supports_bf16", lambda: False)
    monkeypatch.setattr(dtype_probe, "load_family", lambda spec: pytest.fail("loaded a second encoder"))
    emb = _embedder(minilm_path)
    choice = dtype_probe.choose_cpu_dtype(emb, None)
    assert choice.dtype == "float32" and "no native bf16" in choice.reason and emb.dtype_name == "float32"


def test_probe_keeps_bf16_only_above_the_cosine_bar(minilm_path, monkeypatch):
    """The real MiniLM in bf16 vs fp32 on the probe texts: bf16 is kept when its worst cosine clears the
    bar, and the fp32 encoder is restored (same vectors as before) when it does not."""
    monkeypatch.setattr(dtype_probe, "cpu_supports_bf16", lambda: True)
    emb = _embedder(minilm_path)
    before = emb.encode(list(dtype_probe.PROBE_TEXTS))
    choice = dtype_probe.choose_cpu_dtype(emb, None)
    assert 0.999 < choice.min_cosine <= choice.mean_cosine < 1.0  # bf16 moved the vectors a little
    # MiniLM clears both bars (mean ~0.99995; its worst, the two-token "ok", ~0.99986)
    assert choice.mean_cosine >= dtype_probe.MIN_COSINE and choice.min_cosine >= dtype_probe.MIN_COSINE_ANY
    assert choice.dtype == emb.dtype_name == "bfloat16"

    for bar in ("MIN_COSINE", "MIN_COSINE_ANY"):  # either bar alone, set where bf16 cannot clear it
        monkeypatch.setattr(dtype_probe, bar, 1.0)
        emb = _embedder(minilm_path)
        refused = dtype_probe.choose_cpu_dtype(emb, None)
        assert refused.dtype == emb.dtype_name == "float32" and "below the bars" in refused.reason
        np.testing.assert_array_equal(emb.encode(list(dtype_probe.PROBE_TEXTS)), before)
        monkeypatch.undo()
        monkeypatch.setattr(dtype_probe, "cpu_supports_bf16", lambda: True)



def test_multivector_probe_compares_token_vectors(monkeypatch):
    monkeypatch.setattr(dtype_probe, "cpu_supports_bf16", lambda: True)
    monkeypatch.setattr(dtype_probe, "MIN_COSINE", 0.9)
    monkeypatch.setattr(dtype_probe, "MIN_COSINE_ANY", 0.9)
    spec = ModelSpec(name="jina-colbert-v2", path=str(FIXTURES / "jina-colbert-v2-tiny"), dtype="auto")
    emb = Embedder(load_family(spec))
    choice = dtype_probe.choose_cpu_dtype(emb, None, multivector=True)  # colbert has no pooled vector
    assert choice.dtype == "bfloat16" and choice.min_cosine > 0.9


@pytest.mark.parametrize("dtype,supported,expected", [("auto", True, "bfloat16"), ("auto", False, "float32"),
                                                      ("float32", True, "float32")])
def test_embed_actor_runs_what_the_probe_chose(minilm_path, monkeypatch, dtype, supported, expected):
    """Only `auto` probes; an explicit dtype is what runs. The actor's dtype (the manifest's model.dtype)
    is the one that ran."""
    monkeypatch.setattr(dtype_probe, "cpu_supports_bf16", lambda: supported)
    model = ModelConfig(name="hf-encoder", path=minilm_path, dtype=dtype, max_length=128)
    actor = EmbedActor(model.model_dump_json(), OutputsConfig().model_dump_json(), None, 8192, 1)
    assert actor.dtype == f"{expected} (cpu)"
    assert (actor.dtype_choice is None) == (dtype != "auto")
