"""jina-code-embeddings family against the golden outputs of tests/fixtures/jina-code-embeddings-tiny.

The goldens were made with transformers' Qwen2Model (eager, fp32), right padding and the model card's
last_token_pool (see the fixture's README.md).
"""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
from safetensors.torch import load_file, save_file

from conftest import pooled_batch
from embindex.models import ModelError, ModelSpec, load_family
from embindex.models.embedder import Embedder, l2_normalize
from embindex.models.jina_code_embeddings import TASKS, matryoshka_dims

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "jina-code-embeddings-tiny")
GOLDEN = json.load(open(os.path.join(FIXTURE, "golden.json")))
INPUTS = json.load(open(os.path.join(FIXTURE, "inputs.json")))
TEXTS = INPUTS["texts"]
CASES = [(task, role) for task in TASKS for role in ("query", "passage")]
ATOL = 1e-5


def spec(task: str | None = "nl2code", path: str = FIXTURE, **kw) -> ModelSpec:
    return ModelSpec(name="jina-code-embeddings", path=path, dtype="float32", task=task, **kw)


@pytest.fixture(scope="module")
def family():
    return load_family(spec())


def _assert_close(got: np.ndarray, want: np.ndarray, atol: float) -> None:
    np.testing.assert_allclose(got, want, atol=atol, rtol=0)
    cos = (l2_normalize(got) * l2_normalize(want)).sum(-1)
    assert cos.min() >= 0.9999, cos


def test_goldens_cover_all_tasks():
    assert sorted(GOLDEN["tasks"]) == sorted(f"{t}.{r}" for t, r in CASES)
    assert GOLDEN["matryoshka_dimensions"] == [8, 16, 32, 64]


@pytest.mark.parametrize("task,role", CASES)
def test_token_ids_and_prefixes(tokenizer, task, role):
    gold = GOLDEN["tasks"][f"{task}.{role}"]
    assert gold["prefix"] == INPUTS["instructions"][task][role]
    pipeline_role = "query" if role == "query" else "document"
    ids = tokenizer(TEXTS, pipeline_role, task)
    assert [x.tolist() for x in ids] == gold["input_ids"]
    assert all(x.dtype == np.int32 for x in ids)


@pytest.mark.parametrize("task,role", CASES)
def test_embeddings_match_goldens(tokenizer, encoder, task, role):
    gold = GOLDEN["tasks"][f"{task}.{role}"]
    ids = tokenizer(TEXTS, "query" if role == "query" else "document", task)
    right = pooled_batch(tokenizer, encoder, ids, side="right")
    want = np.asarray(gold["last_token_unnormalized"]["values"], dtype=np.float64)
    assert right.shape == tuple(gold["last_token_unnormalized"]["shape"])
    _assert_close(right, want, atol=ATOL)
    for dim in GOLDEN["matryoshka_dimensions"]:
        g = gold["embeddings"][str(dim)]
        assert list(g["shape"]) == [len(TEXTS), dim]
        _assert_close(l2_normalize(right[:, :dim]), np.asarray(g["values"]), atol=ATOL)
    # left padding: same token pooled, positions counted from the first real token
    left = pooled_batch(tokenizer, encoder, ids, side="left")
    tol = max(2e-5, GOLDEN["left_padding_max_abs_diff"])
    _assert_close(left, want, atol=tol)
    for dim in GOLDEN["matryoshka_dimensions"]:
        np.testing.assert_allclose(
            l2_normalize(left[:, :dim]), np.asarray(gold["embeddings"][str(dim)]["values"]), atol=tol, rtol=0
        )


def test_embedder_end_to_end(family):
    """The pipeline path (token-budget batches, padding, L2) gives the golden full-width vectors."""
    emb = Embedder(family, device="cpu", batch_tokens=64)  # several batches of different lengths
    for task, role in [("nl2code", "query"), ("code2nl", "passage")]:
        got = emb.encode(TEXTS, "query" if role == "query" else "document", task)
        want = np.asarray(GOLDEN["tasks"][f"{task}.{role}"]["embeddings"]["64"]["values"])
        np.testing.assert_allclose(got, want, atol=ATOL, rtol=0)


def test_single_rows_match_batch(tokenizer, encoder):
    ids = tokenizer(TEXTS, "document", "qa")
    batch = pooled_batch(tokenizer, encoder, ids, side="right")
    for i, row in enumerate(ids):
        np.testing.assert_allclose(pooled_batch(tokenizer, encoder, [row], side="right")[0], batch[i], atol=2e-5, rtol=0)


def test_info_and_query_prefixes(family):
    info = family.info()
    assert info.family == "jina-code-embeddings"
    assert info.dim == 64 and info.pooling == "last" and info.tasks == TASKS
    assert info.matryoshka_dims == [8, 16, 32, 64]
    assert info.prefixes == {
        "query": INPUTS["instructions"]["nl2code"]["query"],
        "document": INPUTS["instructions"]["nl2code"]["passage"],
    }
    assert info.extra["query_task"] == {t: t for t in TASKS}
    for t in TASKS:
        assert info.extra["query_prefixes"][t] == INPUTS["instructions"][t]["query"]
        assert info.extra["document_prefixes"][t] == INPUTS["instructions"][t]["passage"]
    assert info.max_length == 8192


def test_tokenizer_defaults(tokenizer):
    assert tokenizer.padding_side == "right"  # the fixture's tokenizer_config.json has no padding_side
    assert tokenizer.pad_token_id == 1000  # <|endoftext|>
    # the spec's task is the default; no EOS is appended (Qwen2 ByteLevel post-processor)
    ids = tokenizer(["x = 1"], "query")[0]
    assert ids.tolist() == tokenizer(["x = 1"], "query", "nl2code")[0].tolist()
    assert ids[-1] != 1000


def test_truncation():
    fam = load_family(spec(max_length=12))
    ids = fam.load_tokenizer()(TEXTS, "query")
    assert max(len(x) for x in ids) == 12


def test_matryoshka_dims_by_size():
    assert matryoshka_dims(896, {}) == [64, 128, 256, 512, 896]
    assert matryoshka_dims(1536, {}) == [128, 256, 512, 1024, 1536]
    assert matryoshka_dims(64, {}) == [8, 16, 32, 64]
    assert matryoshka_dims(64, {"matryoshka_dimensions": [16, 32]}) == [16, 32, 64]


def test_missing_task():
    with pytest.raises(ModelError, match="needs a task.*nl2code"):
        load_family(spec(task=None))


def test_unknown_task(tokenizer):
    with pytest.raises(ModelError, match="no task 'retrieval'.*code2completion"):
        load_family(spec(task="retrieval"))
    with pytest.raises(ModelError, match="no task 'bogus'"):
        tokenizer(["x"], "query", "bogus")


def test_causal_lm_layout(tmp_path, tokenizer):
    """A Qwen2ForCausalLM-style checkpoint (`model.` prefix + lm_head) gives the same vectors."""
    d = tmp_path / "causal"
    shutil.copytree(FIXTURE, d)
    state = load_file(str(d / "model.safetensors"))
    state = {f"model.{k}": v for k, v in state.items()}
    state["lm_head.weight"] = state["model.embed_tokens.weight"].clone()
    save_file(state, str(d / "model.safetensors"))
    enc = load_family(spec(path=str(d))).load_encoder("cpu")
    ids = tokenizer(TEXTS, "query", "nl2code")
    want = np.asarray(GOLDEN["tasks"]["nl2code.query"]["last_token_unnormalized"]["values"])
    np.testing.assert_allclose(pooled_batch(tokenizer, enc, ids, side="right"), want, atol=ATOL, rtol=0)


def test_bad_checkpoints(tmp_path):
    with pytest.raises(ModelError, match="not a directory"):
        load_family(spec(path=str(tmp_path / "nope")))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelError, match="no config.json"):
        load_family(spec(path=str(empty)))

    wrong_type = tmp_path / "bert"
    shutil.copytree(FIXTURE, wrong_type)
    cfg = json.load(open(wrong_type / "config.json"))
    cfg["model_type"] = "bert"
    json.dump(cfg, open(wrong_type / "config.json", "w"))
    with pytest.raises(ModelError, match="expects 'qwen2'"):
        load_family(spec(path=str(wrong_type)))

    pickled = tmp_path / "pickled"
    shutil.copytree(FIXTURE, pickled)
    os.remove(pickled / "model.safetensors")
    (pickled / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(ModelError, match="no .safetensors.*pickled"):
        load_family(spec(path=str(pickled)))

    missing = tmp_path / "missing"
    shutil.copytree(FIXTURE, missing)
    state = load_file(str(missing / "model.safetensors"))
    del state["norm.weight"]
    save_file(state, str(missing / "model.safetensors"))
    with pytest.raises(ModelError, match="missing 1 tensors.*norm.weight"):
        load_family(spec(path=str(missing))).load_encoder("cpu")

    shape = tmp_path / "shape"
    shutil.copytree(FIXTURE, shape)
    cfg = json.load(open(shape / "config.json"))
    cfg["intermediate_size"] = 96
    json.dump(cfg, open(shape / "config.json", "w"))
    with pytest.raises(ModelError, match="has shape"):
        load_family(spec(path=str(shape))).load_encoder("cpu")


def test_bad_request_options():
    with pytest.raises(ModelError, match="last-token pooling"):
        load_family(spec(pooling="mean"))
    with pytest.raises(ModelError, match="exceeds"):
        load_family(spec(max_length=40000))


def test_float16_is_refused_unless_forced():
    """Qwen decoders overflow in float16: the family refuses it (before any worker starts) unless forced."""
    def with_dtype(dtype: str, **kw) -> ModelSpec:
        return ModelSpec(name="jina-code-embeddings", path=FIXTURE, dtype=dtype, task="nl2code", **kw)

    with pytest.raises(ModelError, match="overflows in float16"):
        load_family(with_dtype("float16"))
    assert load_family(with_dtype("float16", force_dtype=True)).info().dim == 64
    assert load_family(with_dtype("bfloat16")).info().dim == 64
