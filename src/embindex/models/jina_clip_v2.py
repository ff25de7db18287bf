"""`model.name: jina-clip-v2`: a CLIP of a Jina-XLM-RoBERTa text tower and an EVA02 vision tower.

Loads the ORIGINAL `jinaai/jina-clip-v2` checkpoint (`JinaCLIPModel`, `model_type jina_clip`) without
remote code, from safetensors only:

* `text_model.transformer.roberta.*` -- the jina-embeddings-v3 backbone (`jina_xlmr`), with the Jina LoRA
  parametrization; the checkpoint carries ONE adaptation (`text_config.hf_model_config_kwargs.lora_adaptations`,
  "retrieval.query"), loaded as a peft LoRA adapter and applied to EVERY text row (`text_config.default_lora_task`),
  scaling lora_alpha / lora_rank.
  The real config does not carry the backbone sizes (they live in the config of `hf_model_name_or_path`,
  jinaai/jina-embeddings-v3, which is not read here), so they are derived from the safetensors headers:
  vocab_size / hidden_size from the word-embedding matrix, num_hidden_layers from the `encoder.layers.N`
  count, intermediate_size from `mlp.fc1`. num_attention_heads cannot be derived from shapes: it is taken
  from `hf_model_config_kwargs` when set, else 16 (jina-embeddings-v3's value) only when
  `hf_model_name_or_path` is jinaai/jina-embeddings-v3 and hidden_size is 1024; otherwise a ModelError.
  Sizes that `hf_model_config_kwargs` does carry must agree with the tensors. The RoPE base and the other
  v3 constants default to jina-embeddings-v3's values when `hf_model_name_or_path` is jina-embeddings-v3.
* `vision_model.*` -- EVA02 (`eva02`), CLS token after the final LayerNorm.
* `logit_scale` -- exposed as `JinaClipV2Encoder.logit_scale` (CLIP logits = cos * exp(logit_scale)).
* projections: `add_projections false` and `proj_type null` -> identity (anything else is refused).

Text: `<s> … </s>` from tokenizer.json; role "query" prepends
`task_instructions["retrieval.query"]` (the model card's `encode_text(..., task="retrieval.query")`), role
"document" no instruction (plain `encode_text`). Masked mean pooling over the last hidden state (instruction,
`<s>` and `</s>` tokens included), fp32, not normalised. Images: resize the shortest side to `size` (PIL
bicubic), centre crop `size`x`size`, RGB; the encoder divides by 255 and normalises with the preprocessor's
mean/std. Both towers output `projection_dim` vectors in one space; Matryoshka = truncate to a listed dim,
then L2-normalise.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from .base import ImageProcessor, ModelError, ModelFamily, ModelInfo, Role, TextEncoder, check_image_size
from .checkpoint_files import read_config, read_json
from .device import pick_device, resolve_dtype
from .pooling import mean_pool
from .tokenization import PrefixTokenizer
from .eva02 import EVA02Config, EVA02VisionTransformer, build_eva02
from .jina_xlmr import (
    JinaXLMRBackbone,
    XLMRConfig,
    build_backbone,
    config_from_dict,
    header_tensors,
    load_safetensors,
    load_tokenizer_json,
    prepare_checkpoint,
    tokenizer_max_length,
)

TEXT_PREFIX = "text_model.transformer."
VISION_PREFIX = "vision_model."
LOGIT_SCALE_KEY = "logit_scale"
DEFAULT_MAX_LENGTH = 8192
RETRIEVAL_QUERY = "retrieval.query"

V3_NAME = "jinaai/jina-embeddings-v3"
# jina-embeddings-v3's config values for the backbone fields that are not sizes (used only when
# hf_model_name_or_path is jina-embeddings-v3 and hf_model_config_kwargs does not set them)
V3_BACKBONE_DEFAULTS: dict[str, Any] = {
    "rotary_emb_base": 20000.0,
    "position_embedding_type": "rotary",
    "layer_norm_eps": 1e-5,
    "pad_token_id": 1,
    "hidden_act": "gelu",
    "type_vocab_size": 1,
    "max_position_embeddings": 8194,
}
SUPPORTED_INTERPOLATION = {"bicubic": "BICUBIC", "bilinear": "BILINEAR"}


# ----------------------------------------------------------------------------------------------
# config


V3_HIDDEN_SIZE = 1024
V3_NUM_ATTENTION_HEADS = 16
_LAYER_KEY = re.compile(r"^encoder\.layers\.(\d+)\.")
_WEIGHT_SUFFIXES = (".parametrizations.weight.original", ".weight")


def _text_weight(text: dict[str, torch.Tensor], module: str) -> torch.Tensor | None:
    """The base weight of `module` (path after `roberta.`) among the text tower's tensors, LoRA-parametrized
    (`.parametrizations.weight.original`) or plain (`.weight`); None when absent."""
    for prefix in ("roberta.", ""):
        for suffix in _WEIGHT_SUFFIXES:
            t = text.get(prefix + module + suffix)
            if t is not None:
                return t
    return None


def derived_text_sizes(text: dict[str, torch.Tensor], path: str) -> dict[str, int]:
    """vocab_size, hidden_size, num_hidden_layers and intermediate_size of the text tower, from the shapes of
    its tensors (keys without `text_model.transformer.`; meta tensors from the headers suffice)."""
    where = f"{path}: {TEXT_PREFIX}roberta"
    emb = _text_weight(text, "embeddings.word_embeddings")
    if emb is None or emb.dim() != 2:
        raise ModelError(
            f"{where}.embeddings.word_embeddings.parametrizations.weight.original: missing or not 2-D; cannot "
            "derive the text tower's vocab_size / hidden_size"
        )
    layers: set[int] = set()
    for k in text:
        m = _LAYER_KEY.match(k.removeprefix("roberta."))
        if m:
            layers.add(int(m.group(1)))
    if not layers:
        raise ModelError(f"{where}.encoder.layers.*: no text encoder layers in the checkpoint")
    if layers != set(range(len(layers))):
        raise ModelError(
            f"{where}.encoder.layers.*: layer indices {sorted(layers)[:8]}... are not 0..{len(layers) - 1}; "
            "the checkpoint is incomplete"
        )
    fc1 = _text_weight(text, "encoder.layers.0.mlp.fc1")
    if fc1 is None or fc1.dim() != 2:
        raise ModelError(
            f"{where}.encoder.layers.0.mlp.fc1.parametrizations.weight.original: missing or not 2-D; cannot "
            "derive the text tower's intermediate_size"
        )
    return {
        "vocab_size": int(emb.shape[0]),
        "hidden_size": int(emb.shape[1]),
        "num_hidden_layers": len(layers),
        "intermediate_size": int(fc1.shape[0]),
    }


def text_backbone_config(raw: dict[str, Any], path: str, text: dict[str, torch.Tensor]) -> XLMRConfig:
    """The text tower's backbone config: sizes derived from the text tensors `text` (keys without
    `text_model.transformer.`), checked against `text_config.hf_model_config_kwargs` where it sets them;
    num_attention_heads from the kwargs or, for jina-embeddings-v3, its known value."""
    tc = raw.get("text_config")
    if not isinstance(tc, dict):
        raise ModelError(f"{path}/config.json: no 'text_config'; not a jina-clip checkpoint")
    kw = tc.get("hf_model_config_kwargs")
    where = f"{path}/config.json text_config.hf_model_config_kwargs"
    if not isinstance(kw, dict):
        raise ModelError(f"{where}: missing")
    field = "text_config.hf_model_config_kwargs"
    base = tc.get("hf_model_name_or_path")
    merged = dict(kw)
    sizes = derived_text_sizes(text, path)
    for key, value in sizes.items():
        given = kw.get(key)
        if given is None:
            merged[key] = value
            continue
        try:
            ok = int(given) == value and float(given) == float(value)
        except (TypeError, ValueError):
            ok = False
        if not ok:
            raise ModelError(
                f"{path}/config.json: {field}.{key} = {given!r} does not match the checkpoint's text tensors "
                f"({key} {value}); remove it (it is derived from the weights) or fix it"
            )
    if kw.get("num_attention_heads") is None:
        if base == V3_NAME and sizes["hidden_size"] == V3_HIDDEN_SIZE:
            merged["num_attention_heads"] = V3_NUM_ATTENTION_HEADS
        else:
            raise ModelError(
                f"{path}/config.json: {field}.num_attention_heads is missing and cannot be derived from the "
                f"tensor shapes (hf_model_name_or_path {base!r}, hidden_size {sizes['hidden_size']}; only "
                f"{V3_NAME!r} with hidden_size {V3_HIDDEN_SIZE} has a known value, "
                f"{V3_NUM_ATTENTION_HEADS}) -- copy num_attention_heads from the config of {base!r} into "
                f"{field}"
            )
    if base == V3_NAME:
        for key, value in V3_BACKBONE_DEFAULTS.items():
            merged.setdefault(key, value)
    return config_from_dict(merged, where)


def _need(d: dict[str, Any], key: str, where: str) -> Any:
    if d.get(key) is None:
        raise ModelError(f"{where}: missing {key!r}")
    return d[key]


# ----------------------------------------------------------------------------------------------
# tokenizer


class JinaClipV2Tokenizer(PrefixTokenizer):
    """XLM-R `tokenizers` pipeline (`<s> … </s>`, right padding); role "query" gets the retrieval.query
    instruction, role "document" none."""

    padding_side = "right"

    def __init__(self, path: str, max_length: int, query_instruction: str, pad_token_id: int, task: str):
        self.tok = load_tokenizer_json(path)
        self.tok.enable_truncation(max_length)  # counts <s> and </s>
        self.max_length = max_length
        self.query_instruction = query_instruction
        self.pad_token_id = int(pad_token_id)
        self.task = task

    def prefix(self, role: Role, task: str | None = None) -> str:
        _check_task(task, self.task)
        if role not in ("query", "document"):
            raise ModelError(f"unknown role {role!r} (query | document)")
        return self.query_instruction if role == "query" else ""


def _check_task(task: str | None, supported: str) -> None:
    if task is not None and task != supported:
        raise ModelError(f"jina-clip-v2 has no task {task!r}; it takes {supported!r} or no task")


# ----------------------------------------------------------------------------------------------
# images


class JinaClipV2ImageProcessor(ImageProcessor):
    """RGB, then resize the shortest side to `size` (PIL bicubic) and centre crop `size`x`size`; -> uint8.

    RGB first, as the reference `encode_image` converts every input (`.convert('RGB')`) before its
    processor: an image with alpha resized in RGBA mode would be premultiplied and embed differently."""

    def __init__(self, size: int, patch_size: int, interpolation: str = "bicubic"):
        from PIL import Image

        self.size = int(size)
        self.patch_size = int(patch_size)
        self.resample = getattr(Image.Resampling, SUPPORTED_INTERPOLATION[interpolation])

    def resized_size(self, width: int, height: int) -> tuple[int, int]:
        """(w, h) after the shortest-side resize (torchvision's rounding: the long side is truncated)."""
        if width <= height:
            return self.size, int(self.size * height / width)
        return int(self.size * width / height), self.size

    def __call__(self, image: Any) -> np.ndarray:
        image = image.convert("RGB")
        w, h = image.size
        check_image_size(w, h)  # the shortest-side resize would blow up the long side of a thin image
        nw, nh = self.resized_size(w, h)
        if (nw, nh) != (w, h):
            image = image.resize((nw, nh), self.resample)
        s = self.size
        top, left = round((nh - s) / 2.0), round((nw - s) / 2.0)  # torchvision CenterCrop
        image = image.crop((left, top, left + s, top + s))
        return np.ascontiguousarray(np.asarray(image, dtype=np.uint8))

    def sequence_length(self, height: int, width: int) -> int:
        return (self.size // self.patch_size) ** 2 + 1


# ----------------------------------------------------------------------------------------------
# encoder


class JinaClipV2Encoder(TextEncoder):
    """Text tower (v3 backbone + the one LoRA on every row, mean pooling) and EVA02 vision tower."""

    def __init__(self, backbone: JinaXLMRBackbone, vision: EVA02VisionTransformer, task: str,
                 mean: Sequence[float], std: Sequence[float], logit_scale: torch.Tensor | None,
                 device: torch.device, dtype: torch.dtype):
        self.backbone = backbone
        self.vision = vision
        self.task = task  # the LoRA task of every text row
        self.device, self.dtype = device, dtype
        self.mean = torch.tensor(list(mean), dtype=torch.float32, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(list(std), dtype=torch.float32, device=device).view(1, 3, 1, 1)
        self.logit_scale = None if logit_scale is None else logit_scale.float().cpu()

    # -- text ----------------------------------------------------------------------------------
    @torch.inference_mode()
    def forward_token_states(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, task: str | None = None
    ) -> torch.Tensor:
        """[B, L] -> [B, L, H] last hidden states (model dtype), retrieval.query LoRA on every row."""
        _check_task(task, self.task)
        return self.backbone(input_ids.to(self.device), attention_mask.to(self.device), self.task)

    @torch.inference_mode()
    def forward_pooled(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, task: str | None = None,
        role: Role | None = None,
    ) -> torch.Tensor:
        """[B, L] -> [B, D] fp32 masked mean (identity projection), not normalised."""
        mask = attention_mask.to(self.device)
        return mean_pool(self.forward_token_states(input_ids, mask, task), mask)

    # -- images --------------------------------------------------------------------------------
    def pixel_values(self, pixels: Sequence[np.ndarray]) -> torch.Tensor:
        """Prepared uint8 [S, S, 3] images -> [B, 3, S, S] fp32 normalised pixels on the device."""
        s = self.vision.config.image_size
        for i, p in enumerate(pixels):
            if p.dtype != np.uint8 or p.shape != (s, s, 3):
                raise ModelError(
                    f"image {i}: expected uint8 pixels of shape ({s}, {s}, 3) from the jina-clip-v2 image "
                    f"processor, got {p.dtype} {p.shape}"
                )
        x = torch.from_numpy(np.stack(pixels)).to(self.device).permute(0, 3, 1, 2).float() / 255.0
        return (x - self.mean) / self.std

    @torch.inference_mode()
    def image_token_states(self, pixels: Sequence[np.ndarray]) -> torch.Tensor:
        """All tokens after the last EVA02 block, before the final norm: [B, N + 1, width] fp32 (CLS first)."""
        return self.vision.forward_tokens(self.pixel_values(pixels).to(self.dtype)).float()

    @torch.inference_mode()
    def forward_images(
        self, pixels: Sequence[np.ndarray], task: str | None = None, tokens: bool = False
    ) -> tuple[torch.Tensor, list[torch.Tensor] | None]:
        """[S, S, 3] uint8 images -> ([B, D] fp32 final-norm CLS vectors, not normalised, None)."""
        _check_task(task, self.task)
        if tokens:
            raise NotImplementedError("jina-clip-v2 has no multi-vector image output")
        if not len(pixels):
            return torch.zeros(0, self.vision.config.embed_dim), None
        return self.vision(self.pixel_values(pixels).to(self.dtype)).float(), None


# ----------------------------------------------------------------------------------------------
# family


class JinaClipV2Family(ModelFamily):
    """The original jina-clip-v2 checkpoint (`JinaCLIPModel`)."""

    name = "jina-clip-v2"

    def __init__(self, spec):
        super().__init__(spec)
        path = spec.path
        raw = read_config(path)
        self.raw = raw
        where = f"{path}/config.json"
        if "JinaCLIPModel" not in (raw.get("architectures") or []) and raw.get("model_type") != "jina_clip":
            raise ModelError(
                f"{where}: architectures {raw.get('architectures')} / model_type {raw.get('model_type')!r}; "
                "not a jina-clip checkpoint (expected JinaCLIPModel / jina_clip)"
            )
        if raw.get("add_projections"):
            raise ModelError(f"{where}: add_projections true (text/visual projection layers) is not supported")
        tc = raw.get("text_config") or {}
        vc = raw.get("vision_config")
        if not isinstance(vc, dict):
            raise ModelError(f"{where}: no 'vision_config'; not a jina-clip checkpoint")
        if tc.get("proj_type") is not None:
            raise ModelError(f"{where}: text_config.proj_type {tc['proj_type']!r} is not supported (identity only)")
        if tc.get("pooler_type", "mean_pooler") not in ("mean_pooler", None):
            raise ModelError(f"{where}: text_config.pooler_type {tc['pooler_type']!r} is not supported (mean_pooler)")
        if spec.pooling not in ("auto", "mean"):
            raise ModelError(f"jina-clip-v2 uses mean pooling for text (got pooling {spec.pooling!r})")

        # safetensors headers only (no data read): the text sizes are derived from them, and config/shape
        # mismatches fail now, not in the actor
        header_text, header_vision, _ = self._split(header_tensors(path))
        self.cfg: XLMRConfig = text_backbone_config(raw, path, header_text)
        kw = tc["hf_model_config_kwargs"]
        kw_where = f"{where} text_config.hf_model_config_kwargs"
        adaptations = _need(kw, "lora_adaptations", kw_where)
        if not isinstance(adaptations, list) or not adaptations:
            raise ModelError(f"{kw_where}: 'lora_adaptations' must be a non-empty list")
        self.lora_tasks = [str(t) for t in adaptations]
        self.lora_rank = int(_need(kw, "lora_rank", kw_where))
        self.lora_alpha = float(_need(kw, "lora_alpha", kw_where))
        task = tc.get("default_lora_task")
        if task is None:
            raise ModelError(f"{where}: text_config.default_lora_task is missing (the LoRA every text row uses)")
        if task not in self.lora_tasks:
            raise ModelError(f"{where}: text_config.default_lora_task {task!r} is not in lora_adaptations")
        self.task = str(task)
        self.instruction = str((kw.get("task_instructions") or {}).get(self.task) or "")
        if spec.task is not None:
            _check_task(spec.task, self.task)

        self.dim = int(_need(raw, "projection_dim", where))
        text_dim = int(tc.get("embed_dim") or self.cfg.hidden_size)
        if not (self.cfg.hidden_size == text_dim == self.dim):
            raise ModelError(
                f"{where}: identity text projection needs hidden_size ({self.cfg.hidden_size}) == text_config.embed_dim "
                f"({text_dim}) == projection_dim ({self.dim})"
            )
        self.vcfg = EVA02Config.from_dict(vc, f"{where} vision_config")
        if self.vcfg.embed_dim != self.dim:
            raise ModelError(
                f"{where}: vision_config.embed_dim {self.vcfg.embed_dim} != projection_dim {self.dim} "
                "(identity projection)"
            )
        mrl = raw.get("matryoshka_dimensions")
        self.matryoshka_dims = sorted(int(d) for d in mrl) if mrl else None
        if self.matryoshka_dims and self.matryoshka_dims[-1] > self.dim:
            raise ModelError(f"{where}: matryoshka_dimensions {mrl} exceed projection_dim {self.dim}")

        pp = read_json(os.path.join(path, "preprocessor_config.json")) or {}
        pwhere = f"{path}/preprocessor_config.json"
        self.image_size = int(pp.get("size") or self.vcfg.image_size)
        if self.image_size != self.vcfg.image_size:
            raise ModelError(
                f"{pwhere}: size {self.image_size} != vision_config.image_size {self.vcfg.image_size}"
            )
        if pp.get("resize_mode", "shortest") != "shortest":
            raise ModelError(f"{pwhere}: resize_mode {pp['resize_mode']!r} is not supported (shortest only)")
        self.interpolation = str(pp.get("interpolation", "bicubic"))
        if self.interpolation not in SUPPORTED_INTERPOLATION:
            raise ModelError(f"{pwhere}: interpolation {self.interpolation!r} is not supported")
        self.mean = [float(x) for x in pp.get("mean") or (0.48145466, 0.4578275, 0.40821073)]
        self.std = [float(x) for x in pp.get("std") or (0.26862954, 0.26130258, 0.27577711)]
        if len(self.mean) != 3 or len(self.std) != 3:
            raise ModelError(f"{pwhere}: mean/std must have 3 values")

        tok_file = os.path.join(path, "tokenizer.json")
        if not os.path.exists(tok_file):
            raise ModelError(f"{path}: no tokenizer.json")
        default_max = min(tokenizer_max_length(path, DEFAULT_MAX_LENGTH), self.cfg.max_position_embeddings,
                          DEFAULT_MAX_LENGTH)
        self.max_length = int(spec.max_length or default_max)
        if self.max_length > self.cfg.max_position_embeddings:
            raise ModelError(
                f"model.max_length {self.max_length} exceeds the text tower's {self.cfg.max_position_embeddings} positions"
            )
        prepare_checkpoint(path, self.cfg, header_text, **self._lora_kwargs())
        build_eva02(self.vcfg, header_vision, torch.device("meta"), torch.float32, f"{path}: vision_model")

    # -- helpers -------------------------------------------------------------------------------
    def _lora_kwargs(self) -> dict[str, Any]:
        return {"lora_tasks": self.lora_tasks, "lora_rank": self.lora_rank, "lora_alpha": self.lora_alpha,
                "require_lora": True}

    def _split(self, tensors: dict[str, torch.Tensor]):
        """Checkpoint tensors -> (text tower keys without `text_model.transformer.`, vision keys without
        `vision_model.`, logit_scale or None); any other key is a ModelError."""
        text, vision, other = {}, {}, []
        logit_scale = None
        for k, t in tensors.items():
            if k.startswith(TEXT_PREFIX):
                text[k[len(TEXT_PREFIX):]] = t
            elif k.startswith(VISION_PREFIX):
                vision[k[len(VISION_PREFIX):]] = t
            elif k == LOGIT_SCALE_KEY:
                logit_scale = t
            else:
                other.append(k)
        if other:
            raise ModelError(
                f"{self.spec.path}: unexpected checkpoint keys {sorted(other)[:8]} (projection layers and other "
                "heads are not supported; expected text_model.transformer.*, vision_model.*, logit_scale)"
            )
        if not text:
            raise ModelError(f"{self.spec.path}: no {TEXT_PREFIX}* tensors; not a jina-clip checkpoint")
        if not vision:
            raise ModelError(f"{self.spec.path}: no {VISION_PREFIX}* tensors; not a jina-clip checkpoint")
        return text, vision, logit_scale

    # -- ModelFamily ---------------------------------------------------------------------------
    def check_task(self, task: str | None) -> None:
        _check_task(task, self.task)

    def query_task_for(self, task: str | None) -> str | None:
        """Symmetric: queries use the index's task (the one LoRA runs on both sides)."""
        return task

    def info(self) -> ModelInfo:
        return ModelInfo(
            family=self.name,
            dim=self.dim,
            max_length=self.max_length,
            pooling="mean",
            tasks=[self.task],
            matryoshka_dims=self.matryoshka_dims,
            prefixes={"query": self.instruction, "document": ""},
            extra={
                "multi_vector": False,
                "default_lora_task": self.task,
                "lora_rank": self.lora_rank,
                "lora_alpha": self.lora_alpha,
                "image_size": self.image_size,
                "patch_size": self.vcfg.patch_size,
                "image_pooling": "cls",
            },
            modalities=["text", "image"],
        )

    def load_tokenizer(self) -> JinaClipV2Tokenizer:
        tok = load_tokenizer_json(self.spec.path)
        pad_name = "<pad>"
        for file in ("special_tokens_map.json", "tokenizer_config.json"):
            v = (read_json(os.path.join(self.spec.path, file)) or {}).get("pad_token")
            if isinstance(v, dict):
                v = v.get("content")
            if isinstance(v, str):
                pad_name = v
                break
        pad = tok.token_to_id(pad_name)
        return JinaClipV2Tokenizer(self.spec.path, self.max_length, self.instruction,
                                   self.cfg.pad_token_id if pad is None else pad, self.task)

    def load_image_processor(self) -> JinaClipV2ImageProcessor:
        return JinaClipV2ImageProcessor(self.image_size, self.vcfg.patch_size, self.interpolation)

    def load_encoder(self, device: str | torch.device | None = None) -> JinaClipV2Encoder:
        dev = pick_device(device)
        dtype = resolve_dtype(self.spec.dtype, dev)
        text, vision_t, logit_scale = self._split(load_safetensors(self.spec.path))
        backbone, _ = build_backbone(self.spec.path, self.cfg, dev, dtype, tensors=text, **self._lora_kwargs())
        vision = build_eva02(self.vcfg, vision_t, dev, dtype, f"{self.spec.path}: vision_model")
        return JinaClipV2Encoder(backbone, vision, self.task, self.mean, self.std, logit_scale, dev, dtype)
