"""The generic HF encoder family on the real bundled MiniLM, against sentence-transformers."""

import json
import shutil

import numpy as np
import pytest

from conftest import sample_docs
from embindex.models import ModelError, ModelSpec, load_family
from embindex.models.embedder import Embedder


@pytest.fixture(scope="module")
def embedder(minilm_path):
    return Embedder(load_family(ModelSpec(name="hf-encoder", path=minilm_path, dtype="float32")), batch_tokens=2048)


def test_matches_sentence_transformers(embedder, minilm_path):
    from sentence_transformers import SentenceTransformer

    texts = [d["text"] for d in sample_docs(40)] + ["short", "x"]
    ours = embedder.encode(texts)
    ref = SentenceTransformer(minilm_path, device="cpu").encode(texts, normalize_embeddings=True, batch_size=16)
    assert ours.shape == ref.shape == (len(texts), 384)
    assert np.min(np.sum(ours * ref, axis=1)) > 0.99999
    assert np.abs(ours - ref).max() < 1e-5


def test_reads_sentence_transformers_settings(embedder):
    info = embedder.info
    assert (info.dim, info.max_length, info.pooling) == (384, 256, "mean")


def test_batch_policy_does_not_change_vectors(minilm_path):
    fam = load_family(ModelSpec(name="hf-encoder", path=minilm_path, dtype="float32"))
    texts = [d["text"] for d in sample_docs(20)]
    a = Embedder(fam, batch_tokens=100_000).encode(texts)
    b = Embedder(fam, batch_tokens=64).encode(texts)  # one row per batch
    assert np.abs(a - b).max() < 1e-5


def test_bf16_close_to_fp32(minilm_path):
    texts = [d["text"] for d in sample_docs(20)]
    f32 = Embedder(load_family(ModelSpec(name="hf-encoder", path=minilm_path, dtype="float32"))).encode(texts)
    b16 = Embedder(load_family(ModelSpec(name="hf-encoder", path=minilm_path, dtype="bfloat16"))).encode(texts)
    assert np.min(np.sum(f32 * b16, axis=1)) > 0.999


def test_cls_pooling_from_checkpoint(tmp_path, minilm_path):
    ckpt = tmp_path / "m"
    shutil.copytree(minilm_path, ckpt)
    (ckpt / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_cls_token": True}))
    fam = load_family(ModelSpec(name="hf-encoder", path=str(ckpt), dtype="float32"))
    assert fam.info().pooling == "cls"


def test_clear_errors(tmp_path, minilm_path):
    with pytest.raises(ModelError, match="not a directory"):
        load_family(ModelSpec(name="hf-encoder", path=str(tmp_path / "missing")))
    with pytest.raises(ModelError, match="unknown model family"):
        load_family(ModelSpec(name="nope", path=minilm_path))
    with pytest.raises(ModelError, match="takes no task"):
        load_family(ModelSpec(name="hf-encoder", path=minilm_path, task="retrieval.query"))
    with pytest.raises(ModelError, match="exceeds"):
        load_family(ModelSpec(name="hf-encoder", path=minilm_path, max_length=100_000))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="config.json"):
        load_family(ModelSpec(name="hf-encoder", path=str(tmp_path / "empty")))
