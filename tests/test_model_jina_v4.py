"""jina-embeddings-v4 family against the golden outputs of tests/fixtures/jina-embeddings-v4-tiny.

The goldens were made with Jina's own v4 reference code (fp32, SDPA, right padding); see the fixture's
README.md. Tolerance 1e-5 (the reference and an independent transformers-5 computation agree to 2e-6).
"""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from embindex.models import ModelError, ModelSpec, load_family
from embindex.models.embedder import Embedder, l2_normalize
from embindex.models.jina_embeddings_v4 import (
    IMAGE_TEMPLATE,
    JinaEmbeddingsV4Family,
    task_prefix,
)
from embindex.models.qwen2_vl_images import flatten_patches, smart_resize
from embindex.text.batching import pad_batch

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "jina-embeddings-v4-tiny")
with open(os.path.join(FIXTURE, "golden.json")) as _f:
    GOLDEN = json.load(_f)
IMAGES = GOLDEN["images"]
TASKS = ["retrieval", "text-matching", "code"]
CASES = [(task, role) for task in TASKS for role in ("query", "passage")]
ATOL = 1e-5


def spec(path: str = FIXTURE, **kw) -> ModelSpec:
    return ModelSpec(name="jina-embeddings-v4", path=path, dtype="float32", **kw)


def pipeline_role(role: str) -> str:
    return "query" if role == "query" else "document"


@pytest.fixture(scope="module")
def family():
    return load_family(spec())


@pytest.fixture(scope="module")
def pixels(family):
    proc = family.load_image_processor()
    return [proc(Image.open(os.path.join(FIXTURE, f))) for f in IMAGES["files"]]


def _close(got, want, atol: float = ATOL) -> None:
    np.testing.assert_allclose(np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64), atol=atol, rtol=0)


def _matryoshka(pooled: np.ndarray, d: int) -> np.ndarray:
    return l2_normalize(l2_normalize(pooled)[:, :d])


def _batch(tokenizer, task, role):
    ids = tokenizer(GOLDEN["tasks"][f"{task}.{role}"]["texts"], pipeline_role(role), task)
    input_ids, mask = pad_batch(ids, tokenizer.pad_token_id, tokenizer.padding_side)
    return ids, torch.from_numpy(input_ids), torch.from_numpy(mask)


def test_goldens_cover_all_tasks(family):
    assert sorted(GOLDEN["tasks"]) == sorted(f"{t}.{r}" for t, r in CASES)
    assert family.info().tasks == TASKS
    assert sorted(IMAGES["tasks"]) == sorted(TASKS)


@pytest.mark.parametrize("task,role", CASES)
def test_token_ids_and_prefixes(tokenizer, task, role):
    gold = GOLDEN["tasks"][f"{task}.{role}"]
    assert task_prefix(task, pipeline_role(role)) == gold["prefix"] + ": "
    assert tokenizer.prefix(pipeline_role(role), task) == gold["prefix"] + ": "
    ids, input_ids, mask = _batch(tokenizer, task, role)
    assert [x.tolist() for x in ids] == gold["input_ids"]
    assert input_ids.tolist() == gold["padded_input_ids"]
    assert mask.tolist() == gold["attention_mask"]


def test_prefix_rule():
    assert task_prefix("retrieval", "query") == "Query: "
    assert task_prefix("retrieval", "document") == "Passage: "
    assert task_prefix("retrieval", "passage") == "Passage: "
    assert task_prefix("code", "document") == "Passage: "
    assert task_prefix("text-matching", "document") == "Query: "
    with pytest.raises(ModelError, match="role"):
        task_prefix("retrieval", "answer")


@pytest.mark.parametrize("task,role", CASES)
def test_text_single_and_multi_vectors(tokenizer, encoder, task, role):
    gold = GOLDEN["tasks"][f"{task}.{role}"]
    _, input_ids, mask = _batch(tokenizer, task, role)
    pooled = encoder.forward_pooled(input_ids, mask, task)
    assert pooled.dtype == torch.float32 and pooled.shape == (5, 64)
    _close(pooled, gold["mean_pooled_unnormalized"])
    for d, want in gold["embeddings"].items():
        _close(_matryoshka(pooled.numpy(), int(d)), want)
    single, vecs, keep = encoder.forward_multi(input_ids, mask, task)
    _close(single, pooled)
    assert torch.equal(keep, mask.bool())
    assert vecs.shape == (*mask.shape, 16)
    assert torch.all(vecs[~keep] == 0)
    for i, want in enumerate(gold["multi_vector"]):
        _close(vecs[i][keep[i]], want)
    vecs2, keep2 = encoder.forward_tokens(input_ids, mask, task)
    assert torch.equal(keep2, keep)
    _close(vecs2, vecs, 1e-6)


def test_token_states_are_what_is_pooled(tokenizer, encoder):
    _, input_ids, mask = _batch(tokenizer, "retrieval", "passage")
    states = encoder.forward_token_states(input_ids, mask, "retrieval")
    m = mask.unsqueeze(-1).float()
    _close((states * m).sum(1) / m.sum(1), GOLDEN["tasks"]["retrieval.passage"]["mean_pooled_unnormalized"])


def test_left_padding_matches_right(tokenizer, encoder):
    ids, _, _ = _batch(tokenizer, "code", "passage")
    input_ids, mask = pad_batch(ids, tokenizer.pad_token_id, "left")
    pooled = encoder.forward_pooled(torch.from_numpy(input_ids), torch.from_numpy(mask), "code")
    _close(pooled, GOLDEN["tasks"]["code.passage"]["mean_pooled_unnormalized"])


def test_image_pixels_and_grid(pixels, encoder):
    want = load_file(os.path.join(FIXTURE, "golden_pixel_values.safetensors"))
    assert [p.shape for p in pixels] == [(56, 84, 3), (112, 56, 3)]
    assert all(p.dtype == np.uint8 for p in pixels)
    for i, p in enumerate(pixels):
        flat, grid = flatten_patches(p, encoder.image_config)
        assert list(grid) == IMAGES["image_grid_thw"][i]
        assert flat.shape == want[f"pixel_values.{i}"].shape
        _close(flat, want[f"pixel_values.{i}"])
    batch = encoder.image_batch(pixels)
    assert batch["image_grid_thw"].tolist() == IMAGES["image_grid_thw"]
    assert batch["input_ids"].tolist() == IMAGES["padded_input_ids"]
    assert batch["attention_mask"].tolist() == IMAGES["attention_mask"]
    assert batch["mm_token_type_ids"].sum().item() == 6 + 8
    _close(batch["pixel_values"], torch.cat([want["pixel_values.0"], want["pixel_values.1"]]))


def test_image_template_ids(family):
    assert IMAGES["template"] == IMAGE_TEMPLATE
    tmpl = family.template_ids
    assert tmpl.count(family.image_token_id) == 1
    expanded = [list(map(int, x)) for x in IMAGES["input_ids"]]
    for row, n in zip(expanded, (6, 8)):
        i = tmpl.index(family.image_token_id)
        assert row == tmpl[:i] + [family.image_token_id] * n + tmpl[i + 1:]


@pytest.mark.parametrize("task", TASKS)
def test_image_vectors(encoder, pixels, task):
    gold = IMAGES["tasks"][task]
    single, toks = encoder.forward_images(pixels, task, tokens=True)
    assert single.dtype == torch.float32 and single.shape == (2, 64)
    _close(single, gold["mean_pooled_unnormalized"])
    for d, want in gold["embeddings"].items():
        _close(_matryoshka(single.numpy(), int(d)), want)
    assert [t.shape for t in toks] == [(22, 16), (24, 16)]
    for got, want in zip(toks, gold["multi_vector"]):
        _close(got, want)
    single2, none = encoder.forward_images(pixels, task)
    assert none is None
    _close(single2, single, 1e-6)


def test_image_rows_independent_of_batch(encoder, pixels):
    """Pooling spans are found per row: each image alone (and in swapped order) equals the batch."""
    want = np.asarray(IMAGES["tasks"]["code"]["mean_pooled_unnormalized"])
    for i in range(2):
        _close(encoder.forward_images([pixels[i]], "code")[0][0], want[i])
    _close(encoder.forward_images(pixels[::-1], "code")[0], want[::-1])


def test_adapters_matter(tokenizer, encoder, pixels):
    _, input_ids, mask = _batch(tokenizer, "retrieval", "query")
    out = {t: encoder.forward_pooled(input_ids, mask, t) for t in TASKS}
    img = {t: encoder.forward_images(pixels, t)[0] for t in TASKS}
    for a in TASKS:
        for b in TASKS:
            if a < b:
                assert (out[a] - out[b]).abs().max() > 1e-2
                assert (img[a] - img[b]).abs().max() > 1e-2
    # the projector's LoRA differs per task too
    va, _ = encoder.forward_tokens(input_ids, mask, "retrieval")
    vb, _ = encoder.forward_tokens(input_ids, mask, "code")
    assert (va - vb).abs().max() > 1e-2


def test_per_row_tasks(tokenizer, encoder):
    """A list of tasks routes each row to its own adapter (peft adapter_names)."""
    _, input_ids, mask = _batch(tokenizer, "retrieval", "query")
    rows = ["code", "retrieval", "text-matching", "code", "retrieval"]
    mixed = encoder.forward_pooled(input_ids, mask, rows)
    for i, t in enumerate(rows):
        _close(mixed[i], encoder.forward_pooled(input_ids, mask, t)[i])
    with pytest.raises(ModelError, match="per-row"):
        encoder.forward_pooled(input_ids, mask, rows[:2])
    # the single-task path still works afterwards
    _close(encoder.forward_pooled(input_ids, mask, "retrieval"),
           GOLDEN["tasks"]["retrieval.query"]["mean_pooled_unnormalized"])


def test_default_task_is_retrieval(tokenizer, encoder, family):
    assert family.task == "retrieval"
    _, input_ids, mask = _batch(tokenizer, "retrieval", "passage")
    _close(encoder.forward_pooled(input_ids, mask), GOLDEN["tasks"]["retrieval.passage"]["mean_pooled_unnormalized"])
    assert tokenizer.prefix("document") == "Passage: "


def test_info(family):
    info = family.info()
    assert info.family == "jina-embeddings-v4"
    assert info.dim == 64 and info.token_dim == 16
    assert info.pooling == "mean"
    assert info.matryoshka_dims == [8, 16, 32, 64]
    assert info.modalities == ["text", "image"]
    assert info.prefixes == {"query": "Query: ", "document": "Passage: "}
    assert info.extra["multi_vector"] is False and info.extra["multi_vector_capable"] is True
    assert info.extra["lora_rank"] == 4 and info.extra["lora_alpha"] == 8.0
    assert info.max_length == 8192
    assert all(family.query_task_for(t) == t for t in TASKS)
    tm = load_family(spec(task="text-matching"))
    assert tm.info().prefixes == {"query": "Query: ", "document": "Query: "}
    assert tm.query_task_for(None) == "text-matching"


def test_unknown_task(family, tokenizer, encoder):
    with pytest.raises(ModelError, match="retrieval"):
        load_family(spec(task="classification"))
    with pytest.raises(ModelError, match="no task 'nope'"):
        family.check_task("nope")
    family.check_task(None)
    family.check_task("code")
    with pytest.raises(ModelError, match="no task"):
        tokenizer(["x"], "query", "nope")
    ids = torch.tensor([[1, 2, 3]])
    with pytest.raises(ModelError, match="no task"):
        encoder.forward_pooled(ids, torch.ones_like(ids), "nope")


def test_encode_with_offsets(tokenizer):
    text = "Berlin is the capital and largest city of Germany."
    tt = tokenizer.encode_with_offsets(text, "document", "retrieval")
    assert tt.ids.tolist() == tokenizer([text], "document", "retrieval")[0].tolist()
    assert tt.n_prefix_tokens >= 1
    assert (tt.offsets[: tt.n_prefix_tokens] == -1).all()
    spans = [text[s:e] for s, e in tt.offsets[tt.n_prefix_tokens:]]
    assert "".join(spans).replace(" ", "") == text.replace(" ", "")


def test_truncation():
    fam = load_family(spec(max_length=6))
    ids = fam.load_tokenizer()(["a long text that has many more tokens than six"], "query")
    assert len(ids[0]) == 6
    with pytest.raises(ModelError, match="exceeds"):
        load_family(spec(max_length=10**6))


def test_embedder_end_to_end(family, encoder, tokenizer, pixels):
    emb = Embedder(family, device="cpu", batch_tokens=48, tokenizer=tokenizer, encoder=encoder)
    gold = GOLDEN["tasks"]["code.passage"]
    single, multi = emb.encode_multi(gold["texts"], "document", "code")
    _close(single, gold["embeddings"]["64"])
    for got, want in zip(multi, gold["multi_vector"]):
        _close(got, want)
    vecs, toks = emb.embed_images(pixels, "text-matching", tokens=True)
    _close(vecs, IMAGES["tasks"]["text-matching"]["embeddings"]["64"])
    for got, want in zip(toks, IMAGES["tasks"]["text-matching"]["multi_vector"]):
        _close(got, want)


# ---- checkpoint layouts ------------------------------------------------------------------------------

def _copy_checkpoint(tmp_path, base=None, adapters=None) -> str:
    """A copy of the fixture with the base / adapter tensors replaced (dicts of tensors) where given."""
    dst = tmp_path / "ckpt"
    os.makedirs(dst / "adapters")
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                 "preprocessor_config.json", "model.safetensors"):
        shutil.copy(os.path.join(FIXTURE, name), dst / name)
    shutil.copy(os.path.join(FIXTURE, "adapters", "adapter_config.json"), dst / "adapters" / "adapter_config.json")
    shutil.copy(os.path.join(FIXTURE, "adapters", "adapter_model.safetensors"),
                dst / "adapters" / "adapter_model.safetensors")
    if base is not None:
        save_file(base, str(dst / "model.safetensors"), metadata={"format": "pt"})
    if adapters is not None:
        save_file(adapters, str(dst / "adapters" / "adapter_model.safetensors"), metadata={"format": "pt"})
    return str(dst)


def _base():
    return load_file(os.path.join(FIXTURE, "model.safetensors"))


def _adapters():
    return load_file(os.path.join(FIXTURE, "adapters", "adapter_model.safetensors"))


def _new_layout(key: str) -> str:
    if key.startswith("visual."):
        return "model." + key
    if key.startswith("model."):
        return "model.language_model." + key[len("model."):]
    return key


def test_fixture_is_legacy_layout():
    with safe_open(os.path.join(FIXTURE, "model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert "model.embed_tokens.weight" in keys and any(k.startswith("visual.") for k in keys)
    assert not any(k.startswith("model.language_model.") for k in keys)


def test_new_layout_and_old_adapter_keys(tmp_path, tokenizer, pixels):
    base = {_new_layout(k): v for k, v in _base().items()}
    base["lm_head.weight"] = base["model.language_model.embed_tokens.weight"].clone()  # ignored (tied)
    adapters = {k.replace("base_model.model.model.language_model.layers.", "base_model.model.model.layers."): v
                for k, v in _adapters().items()}
    assert any(k.startswith("base_model.model.model.layers.") for k in adapters)
    fam = JinaEmbeddingsV4Family(spec(_copy_checkpoint(tmp_path, base, adapters)))
    enc = fam.load_encoder("cpu")
    for task in ("code", "text-matching"):
        _, input_ids, mask = _batch(tokenizer, task, "query")
        single, vecs, keep = enc.forward_multi(input_ids, mask, task)
        _close(single, GOLDEN["tasks"][f"{task}.query"]["mean_pooled_unnormalized"])
        _close(vecs[0][keep[0]], GOLDEN["tasks"][f"{task}.query"]["multi_vector"][0])
    _close(enc.forward_images(pixels, "code")[0], IMAGES["tasks"]["code"]["mean_pooled_unnormalized"])


def test_bad_checkpoints(tmp_path):
    base = _base()
    bad = dict(base)
    bad["model.layers.1.mlp.up_proj.weight"] = torch.zeros(129, 64)
    with pytest.raises(ModelError, match=r"model\.layers\.1\.mlp\.up_proj\.weight has shape \(129, 64\)"):
        load_family(spec(_copy_checkpoint(tmp_path / "a", base=bad)))

    missing = {k: v for k, v in base.items() if k != "multi_vector_projector.bias"}
    with pytest.raises(ModelError, match="multi_vector_projector.bias"):
        load_family(spec(_copy_checkpoint(tmp_path / "b", base=missing)))

    no_code = {k: v for k, v in _adapters().items() if ".code." not in k}
    with pytest.raises(ModelError, match="task 'code'"):
        load_family(spec(_copy_checkpoint(tmp_path / "c", adapters=no_code)))

    ad = _adapters()
    key = "base_model.model.multi_vector_projector.lora_A.retrieval.weight"
    ad[key] = torch.zeros(5, 64)
    with pytest.raises(ModelError, match="multi_vector_projector.lora_A.retrieval.weight has shape"):
        load_family(spec(_copy_checkpoint(tmp_path / "d", adapters=ad)))

    partial = _adapters()
    del partial["base_model.model.model.language_model.layers.0.mlp.up_proj.lora_B.text-matching.weight"]
    with pytest.raises(ModelError, match="text-matching"):
        load_family(spec(_copy_checkpoint(tmp_path / "e", adapters=partial)))

    path = _copy_checkpoint(tmp_path / "f")
    with open(os.path.join(path, "config.json")) as f:
        cfg = json.load(f)
    cfg["vision_config"]["out_hidden_size"] = 32
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f)
    with pytest.raises(ModelError, match="out_hidden_size"):
        load_family(spec(path))

    path = _copy_checkpoint(tmp_path / "g")
    os.remove(os.path.join(path, "adapters", "adapter_model.safetensors"))
    with pytest.raises(ModelError, match="adapter_model.safetensors"):
        load_family(spec(path))


# ---- image processor ------------------------------------------------------------------------------------

def test_image_processor_resizes_large_images(family):
    proc = family.load_image_processor()
    rng = np.random.default_rng(0)
    big = Image.fromarray(rng.integers(0, 256, (480, 640, 3), dtype=np.uint8))
    out = proc(big)
    h, w = out.shape[:2]
    assert out.dtype == np.uint8 and out.shape[2] == 3
    assert h % 28 == 0 and w % 28 == 0
    assert 3136 <= h * w <= 12544
    assert (h, w) == (84, 112)  # smart_resize of 480x640 within 12544 px
    tiny = proc(Image.fromarray(rng.integers(0, 256, (10, 20, 3), dtype=np.uint8)))
    assert tiny.shape[0] % 28 == 0 and tiny.shape[1] % 28 == 0 and tiny.shape[0] * tiny.shape[1] >= 3136
    assert proc.sequence_length(h, w) == len(family.template_ids) - 1 + (h // 28) * (w // 28)
    assert proc.sequence_length(56, 84) == 22 and proc.sequence_length(112, 56) == 24


def test_smart_resize_matches_transformers():
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
        smart_resize as hf_smart_resize,
    )

    for h, w in [(480, 640), (10, 20), (56, 84), (1000, 37), (29, 29), (3000, 2000), (123, 457)]:
        for lo, hi in [(3136, 12544), (56 * 56, 28 * 28 * 1280), (3136, 602112)]:
            assert smart_resize(h, w, 28, lo, hi) == hf_smart_resize(h, w, 28, lo, hi), (h, w, lo, hi)
    with pytest.raises(ModelError, match="aspect"):
        smart_resize(10, 3000)


def test_image_processor_modes(family):
    proc = family.load_image_processor()
    gray = Image.fromarray(np.full((56, 56), 100, dtype=np.uint8), mode="L")
    out = proc(gray)
    assert out.shape == (56, 56, 3) and (out == 100).all()
    rgba = np.zeros((56, 56, 4), dtype=np.uint8)
    rgba[..., 0] = 200
    rgba[:28, :, 3] = 255  # top half opaque red, bottom half fully transparent
    out = proc(Image.fromarray(rgba, mode="RGBA"))
    assert out.shape == (56, 56, 3)
    assert (out[:28] == [200, 0, 0]).all()
    assert (out[28:] == 255).all()  # transparency composited on white
    # the pixels as PNG file read back go through the same path
    img = Image.open(os.path.join(FIXTURE, IMAGES["files"][0]))
    assert np.array_equal(proc(img), np.asarray(img.convert("RGB")))


def test_late_chunking_whole_span_is_the_single_vector(tokenizer, encoder):
    from embindex.models.late_chunking import late_chunk

    gold = GOLDEN["tasks"]["retrieval.passage"]
    tt = tokenizer.encode_with_offsets(gold["texts"][1], "document", "retrieval", truncate=False)
    n = len(tt.ids)
    vecs = late_chunk(encoder, tt.ids, [(0, n), (tt.n_prefix_tokens, n)], "retrieval", window=64, overlap=8)
    _close(vecs[0], gold["embeddings"]["64"][1])
    assert float(vecs[0] @ vecs[1]) < 1 - 1e-6  # the prefix tokens are part of the whole-text mean
