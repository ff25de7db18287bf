"""jina-colbert-v2 family against the PyLate-recipe goldens (tiny random checkpoint)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from embindex.models import ModelError, ModelSpec, load_family
from embindex.models.jina_colbert_v2 import maxsim
from embindex.text.batching import pad_batch

FIX = Path(__file__).parent / "fixtures" / "jina-colbert-v2-tiny"
NAME = "jina-colbert-v2"
GOLD = json.loads((FIX / "golden.json").read_text())
INPUTS = json.loads((FIX / "inputs.json").read_text())
ATOL = 1e-5


def _close(got: np.ndarray, want, atol: float = ATOL) -> None:
    want = np.asarray(want, dtype=np.float32)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, atol=atol, rtol=0)
    assert (got * want).sum(-1).min() >= 0.9999  # unit vectors: dot = cosine


@pytest.fixture(scope="module")
def family():
    return load_family(ModelSpec(name=NAME, path=str(FIX), dtype="float32"))


def _encode(tokenizer, encoder, texts, role):
    """Tokenize, right-pad like the pipeline, forward_tokens -> list of kept [n, d] arrays (+ raw outputs)."""
    ids = tokenizer(texts, role)
    input_ids, mask = pad_batch(ids, tokenizer.pad_token_id)
    vecs, keep = encoder.forward_tokens(torch.from_numpy(input_ids), torch.from_numpy(mask))
    assert vecs.dtype == torch.float32 and keep.dtype == torch.bool
    return ids, vecs, keep


def test_info(family):
    info = family.info()
    assert info.family == NAME and info.dim == 32  # from linear.weight
    assert info.tasks == [] and info.max_length == GOLD["document_length"]
    ex = info.extra
    assert ex["multi_vector"] and ex["query_length"] == GOLD["query_length"] == 32
    assert ex["query_marker_id"] == GOLD["query_marker_id"]
    assert ex["document_marker_id"] == GOLD["document_marker_id"]
    assert ex["mask_token_id"] == GOLD["pad_token_id_used"]
    assert set(ex["skiplist_ids"]) == set(GOLD["skiplist_ids"])
    assert family.query_task_for(None) is None


def test_query_ids(tokenizer):
    ids = tokenizer(INPUTS["queries"], "query")
    for got, gold in zip(ids, GOLD["queries"]):
        assert got.tolist() == gold["input_ids"]
        assert all(m == 1 for m in gold["attention_mask"])
    assert tokenizer.pad_token_id == GOLD["pad_token_id_used"]


def test_document_ids(tokenizer):
    ids = tokenizer(INPUTS["documents"], "document")
    for got, gold in zip(ids, GOLD["documents"]):
        n = sum(gold["attention_mask"])
        assert got.tolist() == gold["input_ids"][:n]
    # the pipeline's right padding reproduces the golden batch exactly (mask token as pad, attention 0)
    input_ids, mask = pad_batch(ids, tokenizer.pad_token_id)
    assert input_ids.tolist() == [g["input_ids"] for g in GOLD["documents"]]
    assert mask.tolist() == [g["attention_mask"] for g in GOLD["documents"]]


@pytest.mark.parametrize("role, key", [("query", "queries"), ("document", "documents")])
def test_token_vectors(tokenizer, encoder, role, key):
    _, vecs, keep = _encode(tokenizer, encoder, INPUTS[key], role)
    for i, gold in enumerate(GOLD[key]):
        assert keep[i].nonzero().squeeze(1).tolist() == gold["kept_positions"]
        _close(vecs[i][keep[i]].numpy(), gold["embeddings"])
    norms = vecs.norm(dim=-1)[keep]
    assert torch.allclose(norms, torch.ones_like(norms), atol=1e-5)


def test_golden_inputs_directly(encoder):
    """The golden input_ids/attention_mask fed as-is give the golden kept positions and vectors."""
    for key in ("queries", "documents"):
        ids = torch.tensor([g["input_ids"] for g in GOLD[key]])
        mask = torch.tensor([g["attention_mask"] for g in GOLD[key]])
        vecs, keep = encoder.forward_tokens(ids, mask)
        for i, gold in enumerate(GOLD[key]):
            assert keep[i].nonzero().squeeze(1).tolist() == gold["kept_positions"]
            _close(vecs[i][keep[i]].numpy(), gold["embeddings"])


def test_query_expansion_tokens_are_attended(encoder):
    """Even when a caller's mask leaves the <mask> expansion tokens out, queries attend to all of them."""
    ids = torch.tensor([g["input_ids"] for g in GOLD["queries"]])
    mask = (ids != GOLD["pad_token_id_used"]).long()
    vecs, keep = encoder.forward_tokens(ids, mask)
    assert keep.all()
    for i, gold in enumerate(GOLD["queries"]):
        _close(vecs[i].numpy(), gold["embeddings"])


def test_maxsim(tokenizer, encoder):
    _, qv, qk = _encode(tokenizer, encoder, INPUTS["queries"], "query")
    _, dv, dk = _encode(tokenizer, encoder, INPUTS["documents"], "document")
    scores = np.array([[maxsim(qv[i][qk[i]], dv[j][dk[j]]) for j in range(len(dv))] for i in range(len(qv))])
    np.testing.assert_allclose(scores, np.asarray(GOLD["maxsim_scores"]), atol=1e-4, rtol=0)


def test_query_truncation_and_padding(tokenizer):
    long_q = " ".join(INPUTS["documents"])
    short, long_ = tokenizer(["Berlin", long_q], "query")
    for ids in (short, long_):
        assert len(ids) == 32 and ids[0] == 0 and ids[1] == GOLD["query_marker_id"]
    assert long_[-1] == 2 and GOLD["pad_token_id_used"] not in long_.tolist()
    assert short[-1] == GOLD["pad_token_id_used"] and 2 in short.tolist()


def test_document_truncation():
    fam = load_family(ModelSpec(name=NAME, path=str(FIX), dtype="float32", max_length=12))
    ids = fam.load_tokenizer()([INPUTS["documents"][0]], "document")[0]
    assert len(ids) == 12 and ids[:2].tolist() == [0, GOLD["document_marker_id"]] and ids[-1] == 2
    assert fam.info().max_length == 12


def test_no_pooled_output(tokenizer, encoder):
    ids = torch.tensor([GOLD["queries"][0]["input_ids"]])
    with pytest.raises(NotImplementedError):
        encoder.forward_pooled(ids, torch.ones_like(ids))


def test_no_task(family, tokenizer, encoder):
    with pytest.raises(ModelError, match="takes no task"):
        tokenizer(["x"], "query", "retrieval.query")
    with pytest.raises(ModelError):
        family.check_task("retrieval.query")
    ids = torch.tensor([GOLD["queries"][0]["input_ids"]])
    with pytest.raises(ModelError, match="takes no task"):
        encoder.forward_tokens(ids, torch.ones_like(ids), "retrieval.query")
    with pytest.raises(ModelError, match="takes no task"):
        load_family(ModelSpec(name=NAME, path=str(FIX), task="retrieval.query"))


# ------------------------------------------------------------------------------------------- errors


def _copy(tmp_path: Path) -> Path:
    dst = tmp_path / "ckpt"
    shutil.copytree(FIX, dst)
    for f in dst.iterdir():
        f.chmod(0o644)
    return dst


def _edit_config(path: Path, **changes) -> None:
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(changes)
    (path / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize(
    "changes, match",
    [
        ({"dim": 128}, "dim 128 disagrees with linear.weight"),
        ({"intermediate_size": 512}, "shape mismatches.*fc1"),
        ({"num_hidden_layers": 4}, "missing tensors"),
        ({"hidden_act": "relu"}, "hidden_act"),
    ],
)
def test_config_mismatch(tmp_path, changes, match):
    path = _copy(tmp_path)
    _edit_config(path, **changes)
    with pytest.raises(ModelError, match=match):
        load_family(ModelSpec(name=NAME, path=str(path)))


def test_missing_projection(tmp_path):
    from safetensors.torch import load_file, save_file

    path = _copy(tmp_path)
    tensors = load_file(str(path / "model.safetensors"))
    del tensors["linear.weight"]
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ModelError, match="lacks.*linear.weight"):
        load_family(ModelSpec(name=NAME, path=str(path)))


def test_tokenizer_without_markers(tmp_path):
    path = _copy(tmp_path)
    shutil.copy(FIX.parent / "jina-embeddings-v3-tiny" / "tokenizer.json", path / "tokenizer.json")
    with pytest.raises(ModelError, match="query marker"):
        load_family(ModelSpec(name=NAME, path=str(path)))


def test_v3_checkpoint_is_not_colbert():
    with pytest.raises(ModelError, match="LoRA"):
        load_family(ModelSpec(name=NAME, path=str(FIX.parent / "jina-embeddings-v3-tiny")))
