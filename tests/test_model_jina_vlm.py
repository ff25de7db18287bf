"""jina-vlm against the golden outputs of tests/fixtures/jina-vlm-tiny.

The goldens were made with Jina's own remote code (transformers 4.57.1, fp32, CPU, one thread) and the model
card's `processor(...)` / `model.generate(...)` calls; see the fixture's README.md. Token ids, input ids,
valid `image_input_idx` entries and masks exact; pixels 1e-6; features, hidden states, logits 1e-5.
"""

from __future__ import annotations

import io
import json
import os
import shutil

import jinja2
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from embindex.models import ModelError
from embindex.models.generator import GenerationInput
from embindex.models.jina_vlm import JinaVLM
from embindex.models.jina_vlm_processor import (
    JinaVLMImageConfig,
    chat_prompt,
    collate,
    image_layout,
    prompt_token_ids,
    select_tiling,
)
from embindex.models.registry import load_generator

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "jina-vlm-tiny")
with open(os.path.join(FIXTURE, "golden.json")) as _f:
    GOLDEN = json.load(_f)
CASES = {c["id"]: c for c in GOLDEN["cases"]}
IMAGE_CASES = [name for name, c in CASES.items() if c["images"]]
BATCH = GOLDEN["batches"][0]
MAX_NEW_TOKENS = 24
CHECKPOINT_FILES = ["config.json", "model.safetensors", "generation_config.json", "preprocessor_config.json",
                    "processor_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                    "added_tokens.json"]
ATOL = 1e-5


def _path(name: str) -> str:
    return os.path.join(FIXTURE, name)


def _text(case: dict) -> str:
    return next(p["text"] for p in case["conversation_content"] if p["type"] == "text")


def _input(case: dict) -> GenerationInput:
    """The case as a generator input: the image (a path) with the case's text as its prompt, or the text."""
    if case["images"]:
        return GenerationInput(image=_path(case["images"][0]), text=_text(case))
    return GenerationInput(text=_text(case))


def _close(got, want, atol: float = ATOL) -> None:
    np.testing.assert_allclose(np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64), atol=atol, rtol=0)


def _valid(idx) -> np.ndarray:
    """image_input_idx with every skipped (negative) entry as -1."""
    idx = np.asarray(idx)
    return np.where(idx >= 0, idx, -1)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The goldens were made on one thread; tiny models also run faster so on a busy machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def vlm() -> JinaVLM:
    return JinaVLM(FIXTURE, device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def inputs(vlm):
    """Per case: the prepared input and its model input (one example, the processor's output)."""
    out = {}
    for name, case in CASES.items():
        prepared = vlm.prepare(_input(case))
        out[name] = (prepared, vlm.prompt_input(prepared))
    return out


@pytest.fixture(scope="module")
def tensors() -> dict[str, np.ndarray]:
    with safe_open(_path("golden_tensors.safetensors"), framework="np") as f:
        return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118


# -- prompt and preprocessing ---------------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(CASES))
def test_prompt_string_and_text_tokens(vlm, name):
    case = CASES[name]
    has_image = bool(case["images"])
    prompt = chat_prompt(_text(case), has_image, vlm.always_start_with_space)
    assert prompt == case["prompt"]
    with open(_path("chat_template.jinja")) as f:  # the real template renders the same string
        template = jinja2.Environment().from_string(f.read())
    conv = [{"role": "user", "content": case["conversation_content"]}]
    assert template.render(messages=conv, add_generation_prompt=True, always_start_with_space=True,
                           image_prompt_token="<|image|>") == prompt
    ids, placeholder = prompt_token_ids(vlm.tok, _text(case), has_image, vlm.always_start_with_space)
    if has_image:
        ids[placeholder] = vlm.image_ids["<|image|>"]
    assert ids == case["text_token_ids"]


@pytest.mark.parametrize("name", sorted(CASES))
def test_input_ids_and_image_arrays(inputs, name):
    case = CASES[name]
    prepared, row = inputs[name]
    assert row.input_ids.tolist() == case["input_ids"]
    assert prepared.length == len(case["input_ids"])
    batch = collate([row])
    assert batch.attention_mask.tolist() == [case["attention_mask"]]
    if not case["images"]:
        assert row.images is None and batch.images is None
        return
    info = case["per_image"][0]
    assert list(prepared.pixels.shape[:2]) == info["smart_resized_hw"]
    assert list(prepared.layout.tiling) == info["tiling"]
    assert list(row.images.shape) == case["images_shape"] and len(row.images) == info["n_crops_incl_global"]
    assert (np.asarray(row.input_ids) >= 1152).sum() == info["n_image_tokens"]
    assert np.array_equal(_valid(row.image_input_idx), _valid(case["image_input_idx"]))
    assert np.array_equal(row.image_masks, np.asarray(case["image_masks"], dtype=np.float32))
    # every valid index points at an <im_patch> token, each at most once
    valid = row.image_input_idx[row.image_input_idx >= 0]
    assert (row.input_ids[valid] == 1154).all() and len(set(valid.tolist())) == len(valid)


@pytest.mark.parametrize("name", IMAGE_CASES)
def test_pixels(inputs, tensors, name):
    _, row = inputs[name]
    gold = tensors[f"{name}.images"]
    assert row.images.shape == gold.shape
    _close(row.images, gold, atol=1e-6)


def test_pixels_do_not_depend_on_torch_threads(vlm, tensors):
    """torch's float bilinear rounds differently when split over threads; the resizes run on one thread."""
    torch.set_num_threads(4)
    try:
        for name in IMAGE_CASES:
            crops, _ = vlm.images.crops(vlm.images.prepare(Image.open(_path(CASES[name]["images"][0]))))
            _close(crops, tensors[f"{name}.images"], atol=1e-6)
    finally:
        torch.set_num_threads(1)


def test_rgba_and_grey_images_convert(vlm):
    """RGBA: alpha dropped (not composited); L: the grey value in all three channels."""
    rgb = Image.open(_path("photo_80x60.png")).convert("RGB")
    alpha = Image.fromarray(np.random.default_rng(0).integers(0, 256, (rgb.height, rgb.width), dtype=np.uint8))
    rgba = rgb.copy()
    rgba.putalpha(alpha)
    grey = rgb.convert("L")
    buf = io.BytesIO()
    rgba.save(buf, format="PNG")
    ready = [vlm.prepare(GenerationInput(image=x)) for x in (rgb, buf.getvalue(), grey, grey.convert("RGB"))]
    assert np.array_equal(ready[0].pixels, ready[1].pixels)
    assert np.array_equal(ready[2].pixels, ready[3].pixels)
    out = vlm.generate([GenerationInput(image=rgba), GenerationInput(image=grey)], 4)
    assert [g.reject for g in out] == [None, None] and all(len(g.ids) >= 1 for g in out)


@pytest.mark.parametrize("tiling", [(1, 1), (2, 1), (1, 3), (2, 2), (3, 1), (1, 4)])
def test_layout_covers_every_crop_token_once(vlm, tiling):
    """For any tiling, the kept cells of the crops fill the crops' token block exactly once, row-major."""
    cfg = vlm.image_config
    layout = image_layout(tiling, cfg, vlm.image_ids)
    assert layout.patch_index.shape == (1 + tiling[0] * tiling[1], cfg.token_h * cfg.token_w)
    thumb = 2 + cfg.token_h * (cfg.token_w + 1)
    patch_positions = np.flatnonzero(layout.tokens == vlm.image_ids["<im_patch>"])
    assert np.array_equal(np.sort(layout.patch_index[0]), patch_positions[patch_positions < thumb])
    crops = layout.patch_index[1:]
    kept = crops[crops >= 0]
    assert np.array_equal(np.sort(kept), patch_positions[patch_positions >= thumb])
    assert (layout.image_masks[:-1] == 1).all() and (layout.image_masks[-1] == -1).all()


def test_select_tiling():
    # the golden cases (margins removed: 84x56 -> 28x0, 84x140 -> 28x84; 14 px windows; up to 4 crops)
    assert select_tiling(28, 0, 14, 4) == (2, 1)
    assert select_tiling(28, 84, 14, 4) == (1, 3)
    assert select_tiling(0, 0, 14, 4) == (1, 1)  # an image no larger than the margins
    assert select_tiling(1000, 1000, 14, 4) == (2, 2)  # forced to downscale: the least downscale
    assert select_tiling(14, 14, 14, 4) == (1, 1)


# -- model ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", IMAGE_CASES)
def test_image_features(vlm, inputs, tensors, name):
    _, row = inputs[name]
    feats = vlm.image_features(row.images, row.image_masks)
    gold = tensors[f"{name}.image_features"]
    assert tuple(feats.shape) == gold.shape == tuple(CASES[name]["image_features_shape"])
    _close(feats.numpy(), gold)


def test_image_features_of_golden_pixels(vlm, tensors):
    """The vision tower on the reference's own pixels (independent of our preprocessing)."""
    case = CASES["vlm-alt-banner"]
    feats = vlm.image_features(tensors["vlm-alt-banner.images"], np.asarray(case["image_masks"], dtype=np.float32))
    _close(feats.numpy(), tensors["vlm-alt-banner.image_features"])


def test_all_minus_one_crops_get_zero_vit_features(vlm):
    """The reference zeroes the ViT features of a crop whose pixels are all -1 (padding, or a black crop)
    before the padding embeddings and the pooling."""
    crops = torch.full((2, 25, 588), -1.0)
    crops[1] = 0.25
    masks = torch.ones(2, 25)
    with torch.inference_mode():
        got = vlm.vision(crops, masks)
        zero = vlm.vision.vl_connector(torch.zeros(1, 25, vlm.vision_cfg.feature_dim), masks[:1])
        ones = vlm.vision.vl_connector(vlm.vision.features(crops[1:]), masks[1:])
    _close(got[0].numpy(), zero[0].numpy())
    _close(got[1].numpy(), ones[0].numpy())


@pytest.mark.parametrize("name", sorted(CASES))
def test_prefill_hidden_and_first_step_logits(vlm, inputs, name):
    case = CASES[name]
    hidden, logits, _ = vlm.prefill(collate([inputs[name][1]]))
    _close(hidden[0].numpy(), case["prefill_last_hidden"])
    top = case["first_step"]
    assert logits[0].topk(8).indices.tolist() == top["top8_ids"]
    _close(logits[0, top["top8_ids"]].numpy(), top["top8_logits"])
    assert logits.shape[-1] == 1152  # lm_head: embedding_size rows, no image-token rows


@pytest.mark.parametrize("name", sorted(CASES))
def test_generate_single(vlm, name):
    case = CASES[name]
    (g,) = vlm.generate([_input(case)], MAX_NEW_TOKENS)
    assert g.reject is None
    assert g.ids == case["generated_ids"]
    assert g.text == case["generated_text"]
    assert g.finished == case["stopped_on_eos"]
    assert g.prompt_tokens == len(case["input_ids"]) and not g.truncated


def test_batch_layout_matches_reference(inputs):
    batch = collate([inputs[name][1] for name in BATCH["cases"]])
    assert batch.input_ids.tolist() == BATCH["input_ids"]
    assert batch.attention_mask.tolist() == BATCH["attention_mask"]
    assert list(batch.images.shape) == BATCH["images_shape"]
    assert np.array_equal(batch.image_masks, np.asarray(BATCH["image_masks"], dtype=np.float32))
    assert np.array_equal(_valid(batch.image_input_idx), _valid(BATCH["image_input_idx"]))
    assert (batch.images[0, 3] == -1).all()  # the shorter image's padding crop


def test_batch_generation_matches_reference(vlm, inputs):
    """Both image cases in one left-padded batch: the reference's rows (finished rows continue with the pad
    id), and `generate` with a budget that puts them in one batch."""
    batch = collate([inputs[name][1] for name in BATCH["cases"]])
    rows = vlm.greedy(batch, MAX_NEW_TOKENS)
    for (got, stopped), want in zip(rows, BATCH["generated_ids"]):
        stop = want.index(1000) + 1 if 1000 in want else len(want)
        assert got == want[:stop] and stopped == (1000 in want)
    out = vlm.generate([_input(CASES[name]) for name in BATCH["cases"]], MAX_NEW_TOKENS, batch_tokens=10_000)
    assert [g.ids for g in out] == [CASES[name]["generated_ids"] for name in BATCH["cases"]]


def test_rejects_keep_the_other_inputs(vlm):
    photo, text_only = CASES["vlm-describe-photo"], CASES["vlm-text-only"]
    with open(_path(photo["images"][0]), "rb") as f:
        photo_bytes = f.read()
    out = vlm.generate([GenerationInput(image=b"\x89PNG not an image"), GenerationInput(image=photo_bytes),
                        GenerationInput(), GenerationInput(text="  "), _input(text_only),
                        GenerationInput(image=Image.new("RGB", (600, 2)))], MAX_NEW_TOKENS, batch_tokens=10_000)
    assert out[0].reject.startswith("image_decode_error:") and out[0].ids == []
    assert out[1].reject is None and out[1].ids == photo["generated_ids"]  # the default prompt is the photo's
    assert out[2].reject.startswith("no_input") and out[3].reject.startswith("no_input")
    assert out[4].ids == text_only["generated_ids"]
    assert out[5].reject.startswith("image_not_supported:")


def test_special_token_strings_in_text_stay_text(vlm):
    ids, placeholder = prompt_token_ids(vlm.tok, "see <|image|><|endoftext|><im_patch>", False)
    assert placeholder == -1
    assert not set(ids) & {1000, *vlm.image_ids.values()}


# -- loading, options, info -----------------------------------------------------------------------------------

def _tmp_checkpoint(tmp_path, config: dict | None = None, state: dict | None = None) -> str:
    for f in CHECKPOINT_FILES:
        shutil.copy(_path(f), tmp_path / f)
    if config is not None:
        (tmp_path / "config.json").write_text(json.dumps(config))
    if state is not None:
        save_file(state, str(tmp_path / "model.safetensors"))
    return str(tmp_path)


def _config() -> dict:
    with open(_path("config.json")) as f:
        return json.load(f)


def test_too_long_is_a_reject(tmp_path):
    cfg = _config()
    cfg["text_config"]["max_sequence_length"] = 60
    vlm = JinaVLM(_tmp_checkpoint(tmp_path, cfg), device="cpu", dtype="float32")
    assert vlm.info().context_length == 60
    out = vlm.generate([_input(CASES["vlm-describe-photo"]), _input(CASES["vlm-text-only"])], MAX_NEW_TOKENS)
    assert out[0].reject.startswith("too_long:") and out[0].prompt_tokens == 49
    assert out[1].ids == CASES["vlm-text-only"]["generated_ids"]  # 19 + 24 tokens fit


def test_wrong_checkpoint_is_a_model_error(tmp_path):
    cfg = _config()
    cfg["architectures"] = ["Qwen3ForCausalLM"]
    (tmp_path / "a").mkdir()
    with pytest.raises(ModelError, match="JinaVLMForConditionalGeneration"):
        JinaVLM(_tmp_checkpoint(tmp_path / "a", cfg), device="cpu")
    state = load_file(_path("model.safetensors"))
    del state["model.vision_model.vl_connector.pad_embed"]
    (tmp_path / "b").mkdir()
    with pytest.raises(ModelError, match="missing 1 tensors"):
        JinaVLM(_tmp_checkpoint(tmp_path / "b", state=state), device="cpu")
    cfg = _config()
    cfg["vision_config"]["vl_connector_config"]["pooling_type"] = "stack"
    (tmp_path / "c").mkdir()
    with pytest.raises(ModelError, match="pooling_type"):
        JinaVLM(_tmp_checkpoint(tmp_path / "c", cfg), device="cpu")


def test_device_dtype_and_options():
    default = JinaVLM(FIXTURE)
    assert default.device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    if default.device.type == "cpu":
        assert default.dtype == torch.float32
    with pytest.raises(ModelError, match="float16"):
        JinaVLM(FIXTURE, device="cpu", dtype="float16")
    with pytest.raises(ModelError, match="unknown options"):
        JinaVLM(FIXTURE, device="cpu", instruction="x")
    alt = load_generator("jina-vlm", FIXTURE, device="cpu", dtype="float32", prompt=_text(CASES["vlm-alt-banner"]),
                         max_crops=2)
    assert isinstance(alt, JinaVLM) and alt.image_config.max_crops == 2
    assert alt.info().extra["prompt"] == "Write one sentence of alt text for this image."
    assert JinaVLMImageConfig.from_dir(FIXTURE).max_crops == 4


def test_info(vlm):
    info = vlm.info()
    assert info.family == "jina-vlm" and info.checkpoint.startswith("sha256:")
    assert info.context_length == 40960
    assert info.modalities == ["image"] and info.output == "caption"
    assert info.extra["prompt"] == "Describe this image"
    assert info.extra["dtype"] == "float32"
