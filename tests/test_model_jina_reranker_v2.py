"""jina-reranker-v2 on the tiny fixture, against goldens computed by Jina's own remote code (compute_score and
rerank, see tests/fixtures/jina-reranker-v2-tiny/README.md): token ids and window ids exactly, logits and
scores within 1e-5, plus the Reranker interface (rejects, errors), checkpoint validation and batching."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import FIXTURES
from embindex.models import ModelError, RerankInputError, load_reranker
from embindex.models.jina_reranker_v2 import JinaRerankerV2, window_starts

FIXTURE = FIXTURES / "jina-reranker-v2-tiny"
GOLDEN = json.loads((FIXTURE / "golden.json").read_text())
INPUTS = json.loads((FIXTURE / "inputs.json").read_text())
QUERIES, DOCS = INPUTS["queries"], INPUTS["documents"]
PAIRS = [(QUERIES[k // len(DOCS)], DOCS[k % len(DOCS)]) for k in range(len(QUERIES) * len(DOCS))]
ATOL = 1e-5


@pytest.fixture(scope="module")
def model() -> JinaRerankerV2:
    return JinaRerankerV2(str(FIXTURE), device="cpu", dtype="float32")


def golden_rerank(query_index: int, **kwargs) -> dict:
    """The golden rerank call of `query_index` whose effective parameters include `kwargs`."""
    for call in GOLDEN["rerank"]:
        if call["query_index"] == query_index and all(call["kwargs"][k] == v for k, v in kwargs.items()):
            return call
    raise KeyError((query_index, kwargs))


def assert_ids_equal(got: list[np.ndarray], want: list[list[int]]) -> None:
    assert len(got) == len(want)
    for i, (g, w) in enumerate(zip(got, want)):
        assert g.tolist() == w, f"input {i}"


# ---------------------------------------------------------------------------------------------------
# goldens


@pytest.mark.parametrize("key", ["compute_score", "compute_score_truncated"])
def test_compute_score_matches_golden(model, key):
    gold = GOLDEN[key]
    max_length = INPUTS[key]["max_length"]
    assert GOLDEN["pairs"] == [{"query_index": k // 7, "doc_index": k % 7} for k in range(21)]
    ids = model.tokenize_pairs(PAIRS, max_length=max_length)
    assert_ids_equal(ids, gold["input_ids"])
    assert max(len(x) for x in ids) == max_length  # the long document is truncated in both cases
    logits, scores = model.compute_score(PAIRS, max_length=max_length)
    np.testing.assert_allclose(logits, gold["logits"], rtol=0, atol=ATOL)
    np.testing.assert_allclose(scores, gold["scores"], rtol=0, atol=ATOL)
    assert np.ptp(gold["logits"]) > 100 * ATOL  # the goldens discriminate between pairs


@pytest.mark.parametrize("call", GOLDEN["rerank"], ids=lambda c: f"q{c['query_index']}-L{c['kwargs']['max_length']}")
def test_rerank_windows_match_golden(model, call):
    res = model.rerank_windows(QUERIES[call["query_index"]], DOCS, **call["kwargs"])
    chunks = call["chunks"]
    assert res.doc_index.tolist() == [c["doc_index"] for c in chunks]
    assert_ids_equal(res.input_ids, [c["input_ids"] for c in chunks])
    assert max(len(x) for x in res.input_ids) <= call["kwargs"]["max_length"]
    np.testing.assert_allclose(res.logits, [c["logit"] for c in chunks], rtol=0, atol=ATOL)
    np.testing.assert_allclose(res.window_scores, [c["score"] for c in chunks], rtol=0, atol=ATOL)
    np.testing.assert_allclose(res.scores, call["relevance_score_by_doc_index"], rtol=0, atol=ATOL)
    assert res.ranking().tolist() == [r["index"] for r in call["results"]]
    np.testing.assert_allclose(res.scores[res.ranking()], [r["relevance_score"] for r in call["results"]],
                               rtol=0, atol=ATOL)


def test_window_starts_follow_the_reference_rule():
    # room 4, overlap min(80, 4 // 4) = 1 -> step 3; the last window is the last 4 tokens
    assert window_starts(10, 4, 80) == [0, 3, 6]  # [0:4] [3:7] [6:10]
    assert window_starts(11, 4, 80) == [0, 3, 6, 7]  # [6:10] ends before 11, so [7:11] follows
    assert window_starts(9, 8, 0) == [0, 1]


# ---------------------------------------------------------------------------------------------------
# the Reranker interface


def test_score_via_registry_equals_rerank_golden():
    rr = load_reranker("jina-reranker-v2", str(FIXTURE), device="cpu", dtype="float32")
    res = rr.score(QUERIES[0], DOCS)
    np.testing.assert_allclose(res.scores, golden_rerank(0, max_length=1024)["relevance_score_by_doc_index"],
                               rtol=0, atol=ATOL)
    assert res.rejects == [None] * len(DOCS)
    info = rr.info()
    assert (info.family, info.max_length, info.modalities, info.score) == (
        "jina-reranker-v2", 1024, ["text"], "sigmoid(logit)")
    assert info.checkpoint.startswith("sha256:")


def test_options_override_window_parameters():
    rr = load_reranker("jina-reranker-v2", str(FIXTURE), device="cpu", dtype="float32",
                       max_length=128, max_query_length=32, overlap_tokens=80, batch_size=4)
    gold = golden_rerank(2, max_length=128)
    np.testing.assert_allclose(rr.score(QUERIES[2], DOCS).scores, gold["relevance_score_by_doc_index"],
                               rtol=0, atol=ATOL)
    assert rr.info().max_length == 128


def test_empty_candidate_is_rejected_and_others_scored(model):
    docs = DOCS[:3] + ["", "   "] + DOCS[3:]
    res = model.score(QUERIES[0], docs)
    assert res.rejects == [None] * 3 + ["empty_content"] * 2 + [None] * (len(DOCS) - 3)
    assert np.isnan(res.scores[3:5]).all()
    want = golden_rerank(0, max_length=1024)["relevance_score_by_doc_index"]
    np.testing.assert_allclose(np.delete(res.scores, [3, 4]), want, rtol=0, atol=ATOL)
    assert res.ranking().tolist()[-2:] == [3, 4]


def test_empty_query_raises(model):
    with pytest.raises(RerankInputError):
        model.score("  ", DOCS)


def test_score_many_packs_queries_and_keeps_errors_in_place(model):
    out = model.score_many([(QUERIES[0], DOCS), ("", DOCS), (QUERIES[2], ["", DOCS[4], DOCS[6]]), (QUERIES[1], [])])
    np.testing.assert_allclose(out[0].scores, golden_rerank(0, max_length=1024)["relevance_score_by_doc_index"],
                               rtol=0, atol=ATOL)
    assert isinstance(out[1], RerankInputError)
    want2 = golden_rerank(2, max_length=1024)["relevance_score_by_doc_index"]
    assert out[2].rejects == ["empty_content", None, None]
    np.testing.assert_allclose(out[2].scores[1:], [want2[4], want2[6]], rtol=0, atol=ATOL)
    assert out[3].scores.shape == (0,) and out[3].rejects == []


def test_bad_options_raise(tmp_path):
    with pytest.raises(ModelError, match="max_query_length"):
        JinaRerankerV2(str(FIXTURE), device="cpu", max_length=100, max_query_length=64)
    with pytest.raises(ModelError, match="positions"):
        JinaRerankerV2(str(FIXTURE), device="cpu", max_length=2048)
    with pytest.raises(ModelError, match="unknown options"):
        JinaRerankerV2(str(FIXTURE), device="cpu", top_n=3)


# ---------------------------------------------------------------------------------------------------
# checkpoint validation


WQKV = "roberta.encoder.layers.0.mixer.Wqkv.weight"


def _edited_checkpoint(tmp_path: Path, edit) -> str:
    from safetensors.torch import load_file, save_file

    path = tmp_path / "ckpt"
    shutil.copytree(FIXTURE, path)
    tensors = load_file(str(path / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    return str(path)


@pytest.mark.parametrize("edit, message", [
    (lambda t: t.pop("roberta.encoder.layers.1.norm2.bias"), "missing 1"),
    (lambda t: t.pop("classifier.out_proj.weight"), "missing 1"),
    (lambda t: t.update({WQKV: t[WQKV][:96].clone()}), "shape"),
    (lambda t: t.update({"roberta.encoder.layers.2.norm1.weight": t["roberta.emb_ln.weight"].clone()}), "unexpected 1"),
], ids=["missing-layer-tensor", "missing-head", "wrong-shape", "unexpected"])
def test_wrong_checkpoint_layout_raises(tmp_path, edit, message):
    path = _edited_checkpoint(tmp_path, edit)
    with pytest.raises(ModelError, match=message):
        JinaRerankerV2(path, device="cpu", dtype="float32")


# ---------------------------------------------------------------------------------------------------
# batching


def test_results_do_not_depend_on_batching(model):
    # fp32 on CPU: unpadded rows (batch size 1) and padded batches run different SDPA kernels; logits
    # differ by up to ~2e-6, scores (what is returned) by under 1e-6
    one_logits, one = model.compute_score(PAIRS, max_length=1024, batch_size=1)
    many_logits, many = model.compute_score(PAIRS, max_length=1024, batch_size=64)
    np.testing.assert_allclose(one, many, rtol=0, atol=1e-6)
    np.testing.assert_allclose(one_logits, many_logits, rtol=0, atol=5e-6)
    doc_index, ids = model.windows(QUERIES[0], DOCS, max_length=128, max_query_length=32)
    single = model.logits(ids, batch_size=1)
    np.testing.assert_allclose(model.logits(ids, batch_size=1000, batch_tokens=10**6), single, rtol=0, atol=1e-6)
    np.testing.assert_allclose(model.logits(ids, batch_size=1000, batch_tokens=300), single, rtol=0, atol=1e-6)
