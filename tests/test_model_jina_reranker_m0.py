"""jina-reranker-m0 against the golden outputs of tests/fixtures/jina-reranker-m0-tiny.

The goldens were made with Jina's own `JinaVLForRanking.compute_score` (transformers 4.51, fp32, SDPA, left
padding); see the fixture's README.md. Tolerance 1e-5 (the reference and an independent transformers-5
computation agree to 2.6e-6); pixel values 1e-6; token ids exact.
"""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from embindex.models import ModelError, RerankDoc, RerankInputError, load_reranker
from embindex.models.jina_reranker_m0 import JinaRerankerM0
from embindex.models.qwen2_vl_images import flatten_patches

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "jina-reranker-m0-tiny")
with open(os.path.join(FIXTURE, "golden.json")) as _f:
    GOLDEN = json.load(_f)
CASES = GOLDEN["cases"]
IMAGES = ["img_red_square_56x84.png", "img_blue_disc_84x56.png", "img_offgrid_70x98.png"]
CHECKPOINT_FILES = ["config.json", "model.safetensors", "preprocessor_config.json", "tokenizer.json",
                    "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json"]
ATOL = 1e-5


def _close(got, want, atol: float = ATOL) -> None:
    np.testing.assert_allclose(np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64), atol=atol, rtol=0)


def _path(name: str) -> str:
    return os.path.join(FIXTURE, name)


def _case_args(case: dict) -> tuple[str, str, dict, list[tuple[str, str]]]:
    """(query_type, doc_type, other compute_score kwargs, pairs with image names turned into paths)."""
    kw = dict(case["compute_score_kwargs"])
    qt, dt = kw.pop("query_type", "text"), kw.pop("doc_type", "text")
    pairs = [(_path(q) if qt == "image" else q, _path(d) if dt == "image" else d) for q, d in case["pairs"]]
    return qt, dt, kw, pairs


@pytest.fixture(scope="module")
def reranker() -> JinaRerankerM0:
    return load_reranker("jina-reranker-m0", FIXTURE, device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def runs(reranker):
    """Per case: the rows, the padded batch exactly as fed, the last-token hidden states and the logits."""
    out = {}
    for name, case in CASES.items():
        qt, dt, kw, pairs = _case_args(case)
        rows, pixels = reranker.build_inputs([((qt, q), (dt, d)) for q, d in pairs], **kw)
        batch = reranker.batch(rows, pixels)
        hidden = reranker.last_hidden(batch)
        out[name] = (rows, batch, hidden.numpy(), reranker.head(hidden))
    return out


def _tmp_checkpoint(tmp_path, state: dict | None = None) -> str:
    """The fixture's checkpoint files in tmp_path, model.safetensors replaced by `state` when given."""
    for f in CHECKPOINT_FILES:
        shutil.copy(_path(f), tmp_path / f)
    if state is not None:
        save_file(state, str(tmp_path / "model.safetensors"))
    return str(tmp_path)


def test_pixel_values(reranker):
    with safe_open(_path("golden_pixel_values.safetensors"), framework="pt") as f:
        gold = {k: f.get_tensor(k).numpy() for k in f.keys()}  # noqa: SIM118
    assert sorted(gold) == sorted(IMAGES)
    grids = {IMAGES[0]: (1, 4, 6), IMAGES[1]: (1, 6, 4), IMAGES[2]: (1, 4, 8)}
    for name in IMAGES:
        flat, grid = flatten_patches(reranker.prepare_image(_path(name)), reranker.image_config)
        assert grid == grids[name]
        assert flat.shape == gold[name].shape
        _close(flat.numpy(), gold[name], atol=1e-6)


@pytest.mark.parametrize("name", sorted(CASES))
def test_inputs_match_reference(runs, name):
    case = CASES[name]
    rows, batch, _, _ = runs[name]
    assert [r.ids for r in rows] == case["input_ids"]
    assert all(r.ids[-1] == 100 for r in rows)
    assert batch.input_ids.tolist() == case["padded_input_ids"]
    assert batch.attention_mask.tolist() == case["attention_mask"]
    grid = batch.image_grid_thw.tolist() if batch.image_grid_thw is not None else None
    assert grid == case.get("image_grid_thw")


@pytest.mark.parametrize("name", sorted(CASES))
def test_hidden_logits_scores(reranker, runs, name):
    case = CASES[name]
    _, _, hidden, logits = runs[name]
    _close(hidden, case["last_token_hidden"])
    _close(logits, case["logits"])
    _close(reranker.to_scores(logits), case["scores"])


@pytest.mark.parametrize("name", ["text_query_image_docs", "image_query_image_docs", "text_truncation"])
def test_compute_score_batch_size_one_equals_batched(reranker, name):
    case = CASES[name]
    qt, dt, kw, pairs = _case_args(case)
    logits, scores = reranker.compute_score(pairs, query_type=qt, doc_type=dt, **kw)
    _close(logits, case["logits"])
    _close(scores, case["scores"])
    one_logits, one_scores = reranker.compute_score(pairs, query_type=qt, doc_type=dt, batch_size=1, **kw)
    _close(one_logits, logits)
    _close(one_scores, scores)


def test_score_text_query_mixed_candidates(reranker):
    """Images (as path, bytes and PIL image) and texts in one call score as in their homogeneous batches."""
    img_case, text_case = CASES["text_query_image_docs"], CASES["text_query_text_docs"]
    query = img_case["pairs"][0][0]
    texts = [d for _, d in text_case["pairs"]]
    with open(_path(IMAGES[1]), "rb") as f:
        blue = f.read()
    docs = [RerankDoc(image=_path(IMAGES[0])), texts[0], RerankDoc(image=blue), texts[1],
            Image.open(_path(IMAGES[2])), texts[2]]
    res = reranker.score(query, docs)
    assert res.rejects == [None] * 6
    _close(res.scores[[0, 2, 4]], img_case["scores"])
    _, text_scores = reranker.compute_score([(query, t) for t in texts])
    _close(res.scores[[1, 3, 5]], text_scores)


def test_score_image_query_and_reject(reranker):
    """An image query (encoded bytes) over texts + an image; undecodable bytes are rejected, others score."""
    case = CASES["image_query_text_docs"]
    with open(_path(IMAGES[0]), "rb") as f:
        query = RerankDoc(image=f.read())
    texts = [d for _, d in case["pairs"]]
    junk = RerankDoc(image=np.random.default_rng(0).bytes(256))
    res = reranker.score(query, [texts[0], junk, texts[1], RerankDoc(image=_path(IMAGES[1])), texts[2], ""])
    assert np.isnan(res.scores[1]) and res.rejects[1].startswith("image_decode_error")
    assert np.isnan(res.scores[5]) and res.rejects[5] == "empty_content"
    _close(res.scores[[0, 2, 4]], case["scores"])
    _, image_score = reranker.compute_score([(_path(IMAGES[0]), _path(IMAGES[1]))], query_type="image",
                                            doc_type="image")
    _close(res.scores[3], image_score[0])
    assert list(res.ranking()[-2:]) == [1, 5]


def test_extreme_aspect_ratio_is_a_reject(reranker):
    res = reranker.score("q", [Image.new("RGB", (600, 2)), "a document"])
    assert np.isnan(res.scores[0]) and res.rejects[0].startswith("image_not_supported")
    assert np.isfinite(res.scores[1])
    logits, scores = reranker.compute_score(("q", "a document"))  # one pair
    _close(scores, res.scores[1:])
    assert logits.shape == (1,)


def test_empty_query_raises(reranker):
    for q in ("", "  \n", RerankDoc()):
        with pytest.raises(RerankInputError):
            reranker.score(q, ["a document"])
    with pytest.raises(RerankInputError, match="image_decode_error"):
        reranker.score(RerankDoc(image=b"not an image"), ["a document"])


def test_options_override_defaults():
    r = load_reranker("jina-reranker-m0", FIXTURE, device="cpu", dtype="float32", max_length=48,
                      max_query_length=16, batch_size=2)
    case = CASES["text_truncation"]
    res = r.score(case["pairs"][0][0], [d for _, d in case["pairs"]])
    _close(res.scores, case["scores"])
    info = r.info()
    assert (info.max_length, info.extra["max_query_length"], info.extra["max_doc_length"]) == (48, 16, 32)
    assert info.extra["batch_size"] == 2
    with pytest.raises(ModelError, match="unknown options"):
        JinaRerankerM0(FIXTURE, device="cpu", dtype="float32", max_len=10)


def test_info(reranker):
    info = reranker.info()
    assert info.family == "jina-reranker-m0"
    assert info.checkpoint.startswith("sha256:")
    assert info.max_length == 10240
    assert info.modalities == ["text", "image"]
    assert info.score == "sigmoid(logit - 2.65)"
    assert info.extra["score_token_id"] == 100 and info.extra["padding_side"] == "left"
    assert (info.extra["image_min_pixels"], info.extra["image_max_pixels"]) == (3136, 602112)


def test_special_token_strings_in_text_stay_text(reranker):
    """A document naming `<|image_pad|>` cannot inject image tokens."""
    rows, pixels = reranker.build_inputs([(("text", "q"), ("text", "see <|image_pad|><|vision_start|>"))])
    assert pixels == [] and reranker.image_token_id not in rows[0].ids
    assert reranker.vision_start_id not in rows[0].ids
    _, scores = reranker.compute_score([("q", "see <|image_pad|><|vision_start|>")])
    assert np.isfinite(scores).all()


def test_truncation_inside_an_image_drops_the_image(reranker):
    """Cut at max_length - 1 inside the query image: the whole image span goes, the row still scores."""
    doc = CASES["text_query_text_docs"]["pairs"][0][1]
    pair = [(("image", _path(IMAGES[0])), ("text", doc))]
    full, _ = reranker.build_inputs(pair)
    start = full[0].ids.index(reranker.vision_start_id)
    rows, _ = reranker.build_inputs(pair, max_length=start + 4)
    assert rows[0].ids == full[0].ids[:start] + [100] and rows[0].images == []
    logits, _ = reranker.compute_score([(_path(IMAGES[0]), doc)], max_length=start + 4, query_type="image")
    assert np.isfinite(logits).all()


def test_missing_tensor_is_a_model_error(tmp_path):
    state = load_file(_path("model.safetensors"))
    del state["model.layers.1.mlp.up_proj.weight"]
    path = _tmp_checkpoint(tmp_path, state)
    with pytest.raises(ModelError, match=r"missing 1 tensors \['model.language_model.layers.1.mlp.up_proj.weight'"):
        JinaRerankerM0(path, device="cpu", dtype="float32")


def test_unexpected_tensor_is_a_model_error(tmp_path):
    state = load_file(_path("model.safetensors"))
    state["score.4.weight"] = state["score.2.weight"].clone()
    with pytest.raises(ModelError, match=r"unexpected 1 \['score.4.weight'\]"):
        JinaRerankerM0(_tmp_checkpoint(tmp_path, state), device="cpu", dtype="float32")


def test_transformers5_key_layout_loads_the_same(tmp_path):
    """`model.visual.*` / `model.language_model.*` keys, no lm_head: the same scores."""
    state = {}
    for key, t in load_file(_path("model.safetensors")).items():
        if key.startswith("visual."):
            state["model." + key] = t
        elif key.startswith("model."):
            state["model.language_model." + key[len("model."):]] = t
        elif not key.startswith("lm_head."):
            state[key] = t
    r = JinaRerankerM0(_tmp_checkpoint(tmp_path, state), device="cpu", dtype="float32")
    case = CASES["text_query_image_docs"]
    _, _, kw, pairs = _case_args(case)
    _, scores = r.compute_score(pairs, doc_type="image", **kw)
    _close(scores, case["scores"])


def test_wrong_model_type_is_a_model_error(tmp_path):
    path = _tmp_checkpoint(tmp_path)
    with open(os.path.join(path, "config.json")) as f:
        cfg = json.load(f)
    cfg["model_type"] = "qwen2_5_vl"
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f)
    with pytest.raises(ModelError, match="expects 'qwen2_vl'"):
        JinaRerankerM0(path, device="cpu", dtype="float32")
