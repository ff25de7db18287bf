"""Qwen2-VL / Qwen2.5-VL image preprocessing without transformers' processors (no torchvision needed).

CPU side (`QwenVLImageProcessor`, runs in Ray CPU tasks): any PIL image -> RGB (transparency composited on
white, as transformers' `convert_to_rgb`; images decoded from files or bytes arrive already RGB, alpha
dropped, as the reference loads files) -> Qwen2-VL `smart_resize` (multiples of patch*merge = 28 px,
pixel count within [min_pixels, max_pixels]) with PIL bicubic -> [H, W, 3] uint8.

Encoder side (`flatten_patches`): rescale 1/255, normalise with the checkpoint's mean/std, then the Qwen2-VL
patch layout: the single frame repeated `temporal_patch_size` times, patches of `patch_size` px ordered by
merge window (grid_h/m, grid_w/m, m, m) and flattened as (C, T, p, p) -> [grid_h*grid_w, C*T*p*p], plus the
(t, h, w) patch grid. Matches transformers' `Qwen2VLImageProcessor(Pil)` (checked against the v4 fixture's
reference pixel values).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .base import ImageProcessor, ModelError, check_image_size
from .checkpoint_files import read_json

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def smart_resize(height: int, width: int, factor: int = 28, min_pixels: int = 56 * 56,
                 max_pixels: int = 14 * 14 * 4 * 1280) -> tuple[int, int]:
    """Qwen2-VL's target size: both sides multiples of `factor`, area within [min_pixels, max_pixels],
    aspect ratio kept as well as possible (the same rounding as transformers' `smart_resize`)."""
    check_image_size(width, height)
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


@dataclass(frozen=True)
class QwenVLImageConfig:
    """The preprocessor_config.json values the preprocessing uses."""

    min_pixels: int = 56 * 56
    max_pixels: int = 28 * 28 * 1280
    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    image_mean: tuple[float, float, float] = OPENAI_CLIP_MEAN
    image_std: tuple[float, float, float] = OPENAI_CLIP_STD
    rescale_factor: float = 1 / 255

    @property
    def factor(self) -> int:
        return self.patch_size * self.merge_size

    @classmethod
    def from_dir(cls, path: str, vision_config: dict[str, Any] | None = None) -> QwenVLImageConfig:
        """Read `<path>/preprocessor_config.json` (Qwen2-VL defaults for absent fields); patch sizes must
        agree with the model's `vision_config`."""
        raw = read_json(os.path.join(path, "preprocessor_config.json"))
        if raw is None:
            raise ModelError(f"{path}: no preprocessor_config.json (image preprocessing settings)")
        size = raw.get("size") or {}
        d = cls()
        cfg = cls(
            min_pixels=int(raw.get("min_pixels") or size.get("shortest_edge") or size.get("min_pixels") or d.min_pixels),
            max_pixels=int(raw.get("max_pixels") or size.get("longest_edge") or size.get("max_pixels") or d.max_pixels),
            patch_size=int(raw.get("patch_size", d.patch_size)),
            temporal_patch_size=int(raw.get("temporal_patch_size", d.temporal_patch_size)),
            merge_size=int(raw.get("merge_size", d.merge_size)),
            image_mean=tuple(float(x) for x in raw.get("image_mean", d.image_mean)),  # type: ignore[arg-type]
            image_std=tuple(float(x) for x in raw.get("image_std", d.image_std)),  # type: ignore[arg-type]
            rescale_factor=float(raw.get("rescale_factor", d.rescale_factor)) if raw.get("do_rescale", True) else 1.0,
        )
        if raw.get("do_normalize", True) is False:
            cfg = QwenVLImageConfig(**{**cfg.__dict__, "image_mean": (0.0, 0.0, 0.0), "image_std": (1.0, 1.0, 1.0)})
        if len(cfg.image_mean) != 3 or len(cfg.image_std) != 3:
            raise ModelError(f"{path}/preprocessor_config.json: image_mean/image_std need 3 values")
        if cfg.min_pixels > cfg.max_pixels:
            raise ModelError(f"{path}/preprocessor_config.json: min_pixels {cfg.min_pixels} > max_pixels {cfg.max_pixels}")
        for key, model_key in (("patch_size", "patch_size"), ("temporal_patch_size", "temporal_patch_size"),
                               ("merge_size", "spatial_merge_size")):
            if vision_config and model_key in vision_config and int(vision_config[model_key]) != getattr(cfg, key):
                raise ModelError(
                    f"{path}: preprocessor_config.json {key} {getattr(cfg, key)} != config.json "
                    f"vision_config.{model_key} {vision_config[model_key]}"
                )
        return cfg


def to_rgb(image: Any) -> Any:
    """PIL image of any mode -> RGB; transparency is composited on white (as transformers does)."""
    from PIL import Image

    if image.mode == "RGB":
        return image
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


class QwenVLImageProcessor(ImageProcessor):
    """PIL image -> smart-resized RGB uint8 [H, W, 3] (H, W multiples of 28).

    `sequence_length` = `text_tokens` (the prompt template around the image) + one token per merged
    28x28 patch."""

    def __init__(self, config: QwenVLImageConfig, text_tokens: int):
        self.config = config
        self.text_tokens = int(text_tokens)

    def target_size(self, height: int, width: int) -> tuple[int, int]:
        c = self.config
        return smart_resize(height, width, c.factor, c.min_pixels, c.max_pixels)

    def __call__(self, image: Any) -> np.ndarray:
        from PIL import Image

        if isinstance(image, np.ndarray):
            image = Image.fromarray(image)
        image = to_rgb(image)
        h, w = self.target_size(image.height, image.width)
        if (h, w) != (image.height, image.width):
            image = image.resize((w, h), resample=Image.Resampling.BICUBIC)
        return np.asarray(image, dtype=np.uint8).copy()

    def image_tokens(self, height: int, width: int) -> int:
        """LLM tokens of prepared pixels of this size (one per merge*merge patches)."""
        f = self.config.factor
        return (height // f) * (width // f)

    def sequence_length(self, height: int, width: int) -> int:
        return self.text_tokens + self.image_tokens(height, width)


def flatten_patches(pixels: np.ndarray | torch.Tensor, config: QwenVLImageConfig,
                    device: torch.device | str = "cpu") -> tuple[torch.Tensor, tuple[int, int, int]]:
    """[H, W, 3] uint8 (from `QwenVLImageProcessor`) -> (fp32 [grid_h*grid_w, 3*T*p*p] normalised patches
    in the Qwen2-VL order, (1, grid_h, grid_w))."""
    c = config
    x = torch.as_tensor(np.asarray(pixels), device=device)
    if x.ndim != 3 or x.shape[-1] != 3:
        raise ModelError(f"expected [H, W, 3] pixels, got shape {tuple(x.shape)}")
    h, w = int(x.shape[0]), int(x.shape[1])
    if h % c.factor or w % c.factor:
        raise ModelError(f"image of {h}x{w} px: sides must be multiples of {c.factor} (use the image processor)")
    mean = torch.tensor(c.image_mean, dtype=torch.float32, device=device)
    std = torch.tensor(c.image_std, dtype=torch.float32, device=device)
    x = (x.to(torch.float32) * c.rescale_factor - mean) / std  # [H, W, C]
    x = x.permute(2, 0, 1)  # [C, H, W]
    p, m, t = c.patch_size, c.merge_size, c.temporal_patch_size
    gh, gw = h // p, w // p
    x = x.reshape(3, gh // m, m, p, gw // m, m, p).permute(1, 4, 2, 5, 0, 3, 6)  # gh/m, gw/m, m, m, C, p, p
    x = x.unsqueeze(5).expand(*x.shape[:5], t, p, p)  # the frame repeated over the temporal patch
    return x.reshape(gh * gw, 3 * t * p * p).contiguous(), (1, gh, gw)


def load_vl_config(config_class: Any, path: str) -> Any:
    """A Qwen(2/2.5)-VL config class read from `<path>/config.json`, SDPA attention on every sub-config
    (transformers' rope_scaling / mrope_section notices silenced)."""
    import logging

    log = logging.getLogger("transformers")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        config = config_class.from_pretrained(path, local_files_only=True)
    finally:
        log.setLevel(level)
    for c in (config, config.text_config, config.vision_config):
        c._attn_implementation = "sdpa"
    return config
