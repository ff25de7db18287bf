"""jina-embeddings-v3 family against the golden outputs of Jina's reference code (tiny random checkpoint)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import pooled_batch
from embindex.models import ModelError, ModelSpec, load_family
from embindex.models.embedder import Embedder
from embindex.models.jina_embeddings_v3 import NO_TASK

FIX = Path(__file__).parent / "fixtures" / "jina-embeddings-v3-tiny"
NAME = "jina-embeddings-v3"
GOLD = json.loads((FIX / "golden.json").read_text())
INPUTS = json.loads((FIX / "inputs.json").read_text())
TEXTS = INPUTS["texts"]
TASKS = INPUTS["tasks"]
ATOL = 1e-5


def _task(key: str) -> str:
    return NO_TASK if key == "__no_task__" else key


def _role(key: str) -> str:
    return "query" if key == "retrieval.query" else "document"


def _normalize(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _close(got: np.ndarray, want, atol: float = ATOL) -> None:
    want = np.asarray(want, dtype=np.float32)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, atol=atol, rtol=0)
    cos = (_normalize(got) * _normalize(want)).sum(-1)
    assert cos.min() >= 0.9999, cos


@pytest.fixture(scope="module")
def family():
    return load_family(ModelSpec(name=NAME, path=str(FIX), dtype="float32"))


def test_info(family):
    info = family.info()
    assert info.family == NAME and info.dim == GOLD["hidden_size"] == 64
    assert info.tasks == TASKS
    assert info.matryoshka_dims == GOLD["matryoshka_dimensions"] == [8, 16, 32, 64]
    assert info.max_length == 8194  # tokenizer_config model_max_length, as the reference truncates
    assert info.pooling == "mean"
    assert info.prefixes == {
        "query": INPUTS["task_instructions"]["retrieval.query"],
        "document": INPUTS["task_instructions"]["retrieval.passage"],
    }


@pytest.mark.parametrize("key", list(GOLD["tasks"]))
def test_token_ids(tokenizer, key):
    gold = GOLD["tasks"][key]
    ids = tokenizer(TEXTS, _role(key), _task(key))
    assert [x.tolist() for x in ids] == gold["input_ids"]
    assert tokenizer.prefix(_role(key), _task(key)) == gold["prefix"]


def test_prefix_follows_role_for_retrieval(tokenizer):
    q, p = INPUTS["task_instructions"]["retrieval.query"], INPUTS["task_instructions"]["retrieval.passage"]
    for task in ("retrieval.query", "retrieval.passage"):
        assert tokenizer.prefix("query", task) == q
        assert tokenizer.prefix("document", task) == p
    for task in ("separation", "classification", "text-matching", NO_TASK):
        assert tokenizer.prefix("query", task) == tokenizer.prefix("document", task) == ""


@pytest.mark.parametrize("key", list(GOLD["tasks"]))
def test_task_goldens(tokenizer, encoder, key):
    """Every task (and the no-task base weights): pooled vectors and every Matryoshka width."""
    gold = GOLD["tasks"][key]
    pooled = pooled_batch(tokenizer, encoder, tokenizer(TEXTS, _role(key), _task(key)), _task(key))
    _close(pooled, gold["mean_pooled_unnormalized"]["values"])
    assert sorted(map(int, gold["embeddings"])) == GOLD["matryoshka_dimensions"]
    for d, emb in gold["embeddings"].items():
        _close(_normalize(pooled[:, : int(d)]), emb["values"])


def test_one_at_a_time_equals_batch(tokenizer, encoder):
    ids = tokenizer(TEXTS, "document", "retrieval.passage")
    batch = pooled_batch(tokenizer, encoder, ids, "retrieval.passage")
    single = np.concatenate([pooled_batch(tokenizer, encoder, [x], "retrieval.passage") for x in ids])
    np.testing.assert_allclose(single, batch, atol=1e-5, rtol=0)


def test_mixed_task_batch(tokenizer, encoder):
    """Per-row tasks in one padded batch, and the same rows grouped per task."""
    mixed = GOLD["mixed_task_batch"]
    ids = [np.asarray(GOLD["tasks"][t]["input_ids"][i]) for t, i in zip(mixed["tasks"], mixed["text_indices"])]
    pooled = pooled_batch(tokenizer, encoder, ids, mixed["tasks"])
    _close(pooled, mixed["mean_pooled_unnormalized"]["values"])
    _close(_normalize(pooled), mixed["embeddings_full_dim_normalized"]["values"])
    for task in set(mixed["tasks"]):
        rows = [r for r, t in enumerate(mixed["tasks"]) if t == task]
        grouped = pooled_batch(tokenizer, encoder, [ids[r] for r in rows], task)
        np.testing.assert_allclose(grouped, pooled[rows], atol=1e-5, rtol=0)


def test_mixed_batch_with_base_rows(tokenizer, encoder):
    ids = tokenizer(TEXTS[:2], "document", NO_TASK) + tokenizer(TEXTS[:2], "document", "separation")
    pooled = pooled_batch(tokenizer, encoder, ids, [NO_TASK, NO_TASK, "separation", "separation"])
    _close(pooled[:2], GOLD["tasks"]["__no_task__"]["mean_pooled_unnormalized"]["values"][:2])
    _close(pooled[2:], GOLD["tasks"]["separation"]["mean_pooled_unnormalized"]["values"][:2])


def test_embedder_end_to_end(family, tokenizer, encoder):
    emb = Embedder(family, tokenizer=tokenizer, encoder=encoder, batch_tokens=64)  # several sub-batches
    docs = emb.encode(TEXTS, role="document", task="retrieval.passage")
    _close(docs, GOLD["tasks"]["retrieval.passage"]["embeddings"]["64"]["values"])
    query_task = family.query_task_for("retrieval.passage")
    assert query_task == "retrieval.query"
    queries = emb.encode(TEXTS, role="query", task=query_task)
    _close(queries, GOLD["tasks"]["retrieval.query"]["embeddings"]["64"]["values"])


def test_query_task_for(family):
    assert family.query_task_for("retrieval.passage") == "retrieval.query"
    for t in ("retrieval.query", "separation", "classification", "text-matching"):
        assert family.query_task_for(t) == t
    assert family.info().extra["query_task"]["retrieval.passage"] == "retrieval.query"


def test_token_embeddings_support_late_chunking(encoder):
    """The hidden states late chunking needs: span means over the reference's spans match its goldens."""
    lc = GOLD["late_chunking"]
    ids = torch.tensor([lc["model_input_ids"]])
    hidden = encoder.token_embeddings(ids, torch.ones_like(ids), lc["task"])[0].float()
    chunks = np.stack([hidden[s:e].mean(0).numpy() for s, e in lc["token_spans_in_model_input"]])
    _close(chunks, lc["chunk_embeddings_unnormalized"]["values"])
    _close(_normalize(chunks), lc["chunk_embeddings"]["values"])


def test_spec_task_is_the_default(tokenizer):
    fam = load_family(ModelSpec(name=NAME, path=str(FIX), dtype="float32", task=NO_TASK))
    fam.check_task(None)
    tok = fam.load_tokenizer()
    assert [x.tolist() for x in tok(TEXTS, "document")] == GOLD["tasks"]["__no_task__"]["input_ids"]


def test_truncation_keeps_special_tokens():
    fam = load_family(ModelSpec(name=NAME, path=str(FIX), dtype="float32", max_length=10))
    ids = fam.load_tokenizer()([TEXTS[-1]], "document", "retrieval.passage")[0]
    assert len(ids) == 10 and ids[0] == 0 and ids[-1] == 2


def test_bfloat16_close(tokenizer):
    enc = load_family(ModelSpec(name=NAME, path=str(FIX), dtype="bfloat16")).load_encoder("cpu")
    assert enc.dtype == torch.bfloat16
    pooled = pooled_batch(tokenizer, enc, tokenizer(TEXTS, "query", "retrieval.query"), "retrieval.query")
    want = np.asarray(GOLD["tasks"]["retrieval.query"]["embeddings"]["64"]["values"])
    assert (_normalize(pooled) * want).sum(-1).min() > 0.99


# ------------------------------------------------------------------------------------------- errors


def test_unknown_task(family, tokenizer, encoder):
    with pytest.raises(ModelError, match="no task 'retrieval.doc'"):
        family.check_task("retrieval.doc")
    with pytest.raises(ModelError, match="no task"):
        tokenizer(TEXTS, "document", "retrieval.doc")
    ids = torch.tensor([GOLD["tasks"]["separation"]["input_ids"][0]])
    with pytest.raises(ModelError, match="no task"):
        encoder.forward_pooled(ids, torch.ones_like(ids), "retrieval.doc")
    with pytest.raises(ModelError, match="no task"):
        load_family(ModelSpec(name=NAME, path=str(FIX), task="retrieval.doc"))


def test_task_required(family, tokenizer, encoder):
    with pytest.raises(ModelError, match="needs a task"):
        family.check_task(None)
    with pytest.raises(ModelError, match="needs a task"):
        tokenizer(TEXTS, "document")
    ids = torch.tensor([GOLD["tasks"]["separation"]["input_ids"][0]])
    with pytest.raises(ModelError, match="needs a task"):
        encoder.forward_pooled(ids, torch.ones_like(ids))


def _copy(tmp_path: Path) -> Path:
    dst = tmp_path / "ckpt"
    shutil.copytree(FIX, dst)
    for f in dst.iterdir():
        f.chmod(0o644)
    return dst


def _edit_config(path: Path, **changes) -> None:
    cfg = json.loads((path / "config.json").read_text())
    for k, v in changes.items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    (path / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize(
    "changes, match",
    [
        ({"intermediate_size": 128}, "shape mismatches.*fc1"),
        ({"hidden_size": 128, "num_attention_heads": 8}, "config.json does not"),
        ({"num_hidden_layers": 3}, "missing tensors.*layers.2"),
        ({"num_hidden_layers": 1}, "unexpected tensors.*layers.1"),
        ({"vocab_size": 2000}, "word_embeddings"),
        ({"lora_rank": 8}, "lora_rank 8"),
        ({"lora_adaptations": ["retrieval.query", "retrieval.passage"]}, "2 tasks"),
        ({"rotary_emb_base": None}, "rotary_emb_base"),
        ({"position_embedding_type": "absolute"}, "position_embedding_type"),
        ({"lora_adaptations": None}, "lora_adaptations"),
    ],
)
def test_config_mismatch(tmp_path, changes, match):
    path = _copy(tmp_path)
    _edit_config(path, **changes)
    with pytest.raises(ModelError, match=match):
        load_family(ModelSpec(name=NAME, path=str(path), dtype="float32"))


def _rewrite_weights(path: Path, keep) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(path / "model.safetensors"))
    save_file({k: v for k, v in tensors.items() if keep(k)}, str(path / "model.safetensors"), metadata={"format": "pt"})


def test_missing_adapter_tensor(tmp_path):
    path = _copy(tmp_path)
    _rewrite_weights(path, lambda k: k != "roberta.encoder.layers.1.mlp.fc2.parametrizations.weight.0.lora_B")
    with pytest.raises(ModelError, match="layers.1.mlp.fc2.*incomplete"):
        load_family(ModelSpec(name=NAME, path=str(path), dtype="float32"))


def test_missing_adapters_of_a_module(tmp_path):
    path = _copy(tmp_path)
    _rewrite_weights(path, lambda k: not (k.startswith("roberta.encoder.layers.0.mixer.Wqkv") and "lora" in k))
    with pytest.raises(ModelError, match="task LoRA tensors missing.*layers.0.self_attn.k_proj"):
        load_family(ModelSpec(name=NAME, path=str(path), dtype="float32"))


def test_colbert_checkpoint_is_not_v3():
    with pytest.raises(ModelError, match="lora_adaptations"):
        load_family(ModelSpec(name=NAME, path=str(FIX.parent / "jina-colbert-v2-tiny")))


def test_no_model_type_needed():
    cfg = json.loads((FIX / "config.json").read_text())
    assert "model_type" not in cfg  # like the real v3 config: the family builds the native config itself
