"""jina-reranker-v3 against the golden outputs of tests/fixtures/jina-reranker-v3-tiny.

The goldens were made with Jina's own `modeling.py` (`JinaForRanking.rerank`, transformers 4.55, fp32 CPU); see
the fixture's README.md. Values there are rounded to 6 decimals.
"""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
from safetensors.torch import load_file, save_file

from embindex.models import ModelError, RerankInputError, load_reranker
from embindex.models.jina_reranker_v3 import JinaRerankerV3, format_prompt, split_blocks, strip_markers

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "jina-reranker-v3-tiny")
GOLDEN = json.load(open(os.path.join(FIXTURE, "golden.json")))
CALLS = {f"call{i}": c for i, c in enumerate(GOLDEN["calls"], 1)}
CALLS["truncation"] = GOLDEN["truncation_call"]
SCORE_ATOL = 1e-5
EMBED_ATOL = 2e-5


@pytest.fixture(scope="module")
def reranker() -> JinaRerankerV3:
    return load_reranker("jina-reranker-v3", FIXTURE, device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def results(reranker):
    """rerank_details of every golden call (computed once)."""
    cache = {}

    def get(name):
        if name not in cache:
            c = CALLS[name] if name in CALLS else GOLDEN["multi_block_call"]
            cache[name] = reranker.rerank_details(c["query"], c["documents"], **c.get("rerank_kwargs", {}))
        return cache[name]

    return get


def _close(got, want, atol: float) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, atol=atol, rtol=0)
    return float(np.abs(got - want).max())


def _cos_rows(a, b) -> np.ndarray:
    a, b = np.atleast_2d(np.asarray(a, np.float64)), np.atleast_2d(np.asarray(b, np.float64))
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


def test_marker_ids_come_from_the_tokenizer(reranker):
    assert reranker.doc_marker_id == GOLDEN["meta"]["marker_ids"]["<|embed_token|>"]
    assert reranker.query_marker_id == GOLDEN["meta"]["marker_ids"]["<|rerank_token|>"]


@pytest.mark.parametrize("name", list(CALLS))
def test_truncation_prompt_and_ids(results, name):
    gold, res = CALLS[name], results(name)
    assert res.query == gold["truncated_query"]
    assert res.documents == gold["truncated_documents"]
    assert res.query_length == gold["query_token_length"]
    assert res.doc_lengths == gold["doc_token_lengths"]
    assert len(res.blocks) == len(gold["blocks"]) == 1
    block, gb = res.blocks[0], gold["blocks"][0]
    assert block.prompt == gb["prompt"] == format_prompt(res.query, res.documents)
    assert block.input_ids.tolist() == gb["input_ids"]
    assert len(block.input_ids) == gb["n_tokens"]
    assert block.doc_positions.tolist() == gb["doc_marker_positions"]
    assert block.query_position == gb["query_marker_position"]


@pytest.mark.parametrize("name", list(CALLS))
def test_hidden_states_and_embeddings(results, name):
    gold, res = CALLS[name], results(name)
    block, gb = res.blocks[0], gold["blocks"][0]
    _close(block.hidden_docs, gb["hidden_at_doc_markers"], EMBED_ATOL)
    _close(block.hidden_query, gb["hidden_at_query_marker"], EMBED_ATOL)
    _close(block.doc_embeds, gb["doc_embeds"], EMBED_ATOL)
    _close(block.query_embed, gb["query_embed"], EMBED_ATOL)
    _close(res.doc_embeds, gold["doc_embeds_by_doc_index"], EMBED_ATOL)
    assert _cos_rows(res.doc_embeds, gold["doc_embeds_by_doc_index"]).min() >= 0.9999
    assert _cos_rows(block.query_embed, gb["query_embed"]).min() >= 0.9999


@pytest.mark.parametrize("name", list(CALLS))
def test_scores_and_order(reranker, results, name):
    gold, res = CALLS[name], results(name)
    block, gb = res.blocks[0], gold["blocks"][0]
    _close(block.scores, gb["forward_scores"], SCORE_ATOL)
    assert abs(block.weight - gb["block_weight"]) <= SCORE_ATOL
    _close(res.scores, gold["relevance_score_by_doc_index"], SCORE_ATOL)
    _close(res.scores, block.scores, 1e-6)  # one block: the final score is the block's cosine
    assert res.order().tolist() == gold["order"]
    out = reranker.rerank(gold["query"], gold["documents"], return_embeddings=True, **gold["rerank_kwargs"])
    assert [r["index"] for r in out] == gold["order"]
    assert [r["document"] for r in out] == [gold["documents"][i] for i in gold["order"]]
    want = [gold["relevance_score_by_doc_index"][i] for i in gold["order"]]
    _close([r["relevance_score"] for r in out], want, SCORE_ATOL)
    _close(np.stack([r["embedding"] for r in out]), [gold["doc_embeds_by_doc_index"][i] for i in gold["order"]],
           EMBED_ATOL)
    top = reranker.rerank(gold["query"], gold["documents"], top_n=1, **gold["rerank_kwargs"])
    assert [r["index"] for r in top] == gold["order"][:1] and top[0]["embedding"] is None


def test_multi_block_call(results):
    gold, res = GOLDEN["multi_block_call"], results("multi")
    assert res.doc_lengths == gold["doc_token_lengths"]
    assert res.documents == gold["truncated_documents"]
    assert [len(b.docs) for b in res.blocks] == [b["n_docs"] for b in gold["blocks"]] == [125, 5]
    assert [b.docs for b in res.blocks] == [list(range(125)), list(range(125, 130))]
    for block, gb in zip(res.blocks, gold["blocks"]):
        assert len(block.input_ids) == gb["n_tokens"]
        assert block.doc_positions.tolist() == gb["doc_marker_positions"]
        assert block.query_position == gb["query_marker_position"]
        _close(block.scores, gb["forward_scores"], SCORE_ATOL)
        assert abs(block.weight - gb["block_weight"]) <= SCORE_ATOL
        _close(block.query_embed, gb["query_embed"], EMBED_ATOL)
    w = np.array([b["block_weight"] for b in gold["blocks"]])
    q = (w[:, None] * np.array([b["query_embed"] for b in gold["blocks"]])).sum(0) / w.sum()
    _close(res.query_embed, q, EMBED_ATOL)
    _close(res.scores, gold["relevance_score_by_doc_index"], SCORE_ATOL)
    assert res.order().tolist() == gold["order"]


def test_split_blocks_rule():
    # budget 100 - 2*10 = 80; a block closes at 125 docs (here 3) or when the budget left is <= max_doc_length 30
    assert split_blocks([20, 20, 20, 5], 10, 30, 100) == [[0, 1, 2], [3]]
    assert split_blocks([5, 5, 5, 5, 5], 10, 30, 100, block_size=2) == [[0, 1], [2, 3], [4]]
    assert split_blocks([60, 1], 10, 30, 100) == [[0], [1]]
    assert split_blocks([], 10, 30, 100) == []


def test_strip_markers():
    assert strip_markers("a <|embed_token|>b<|rerank_token|>") == "a b"
    assert strip_markers("<|embed_<|rerank_token|>token|>x") == "x"  # a marker re-formed by stripping is removed too


def test_score_via_interface_matches_golden(reranker):
    gold = CALLS["call1"]
    got = reranker.score(gold["query"], gold["documents"])
    assert got.scores.dtype == np.float64
    assert got.rejects == [None] * len(gold["documents"])
    _close(got.scores, gold["relevance_score_by_doc_index"], SCORE_ATOL)
    assert got.ranking().tolist() == gold["order"]
    info = reranker.info()
    assert (info.family, info.score, info.modalities) == ("jina-reranker-v3", "cosine", ["text"])
    assert info.max_length == 131072  # tokenizer_config.json's model_max_length: the block budget
    assert info.checkpoint.startswith("sha256:")
    assert info.extra["marker_ids"] == GOLDEN["meta"]["marker_ids"]


def test_init_options_override_limits():
    gold = CALLS["truncation"]
    r = load_reranker("jina-reranker-v3", FIXTURE, device="cpu", dtype="float32", **gold["rerank_kwargs"])
    _close(r.score(gold["query"], gold["documents"]).scores, gold["relevance_score_by_doc_index"], SCORE_ATOL)
    # a small block budget splits the 6 documents of call 1 into blocks (weighted query embedding)
    small = load_reranker("jina-reranker-v3", FIXTURE, device="cpu", dtype="float32", max_length=2200)
    res = small.rerank_details(CALLS["call1"]["query"], CALLS["call1"]["documents"])
    assert len(res.blocks) > 1
    with pytest.raises(ModelError, match="unknown options"):
        load_reranker("jina-reranker-v3", FIXTURE, device="cpu", dtype="float32", max_len=10)


def test_empty_candidate_is_rejected_others_scored(reranker):
    gold = CALLS["call1"]
    got = reranker.score(gold["query"], [gold["documents"][0], "  ", *gold["documents"][1:]])
    assert np.isnan(got.scores[1]) and got.rejects[1] == "empty_content"
    keep = [0, *range(2, len(gold["documents"]) + 1)]
    assert all(got.rejects[i] is None for i in keep)
    _close(got.scores[keep], gold["relevance_score_by_doc_index"], SCORE_ATOL)


def test_empty_query_raises(reranker):
    with pytest.raises(RerankInputError):
        reranker.score("   ", ["a document"])


def test_missing_projector_is_a_model_error(tmp_path):
    path = tmp_path / "ckpt"
    shutil.copytree(FIXTURE, path)
    state = load_file(str(path / "model.safetensors"))
    del state["projector.2.weight"]
    save_file(state, str(path / "model.safetensors"))
    with pytest.raises(ModelError, match=r"missing 1 tensors \['projector.2.weight'\]"):
        load_reranker("jina-reranker-v3", str(path), device="cpu", dtype="float32")


def test_wrong_model_type_is_a_model_error(tmp_path):
    path = tmp_path / "ckpt"
    shutil.copytree(FIXTURE, path)
    cfg = json.loads((path / "config.json").read_text())
    cfg["model_type"] = "qwen2"
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelError, match="expects 'qwen3'"):
        load_reranker("jina-reranker-v3", str(path), device="cpu", dtype="float32")


def test_float16_is_refused_unless_forced():
    from embindex.models import ModelError, load_reranker

    with pytest.raises(ModelError, match="overflows in float16"):
        load_reranker(None, FIXTURE, dtype="float16")
    assert load_reranker(None, FIXTURE, dtype="float16", force_dtype=True).info().family == "jina-reranker-v3"
