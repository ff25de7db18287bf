"""jina-vlm preprocessing: image -> crops, token block and feature positions; prompt -> token ids.

Facts (the model repository's `processing_jvlm.py`, `image_processing_jvlm.py`, `chat_template.jinja`; the
tiny fixture's README), for `cropping_method "overlap-and-resize"` (Molmo), `normalization_method "minmax"`:

* Image: RGB (`convert("RGB")`: alpha dropped, grey replicated); Qwen2-VL `smart_resize` with factor
  `patch_size` (14) and `min_pixels` / `max_pixels` (aspect ratio over 200 refused); resized as **uint8**
  (bilinear, half-pixel centres, no antialias, computed in float32 and rounded) -> [0, 1] float.
* Tiling: margins `m = patch * (left + right)` px and window `w = (crop_patches - left - right) * patch` px;
  `(rows, cols)` = the Molmo choice among all `i * j <= max_crops` for an image of `(H - m, W - m)` px in
  tiles of `w` px (sorted by `(i * j, i)`; float32 scales; the least downscale when every tiling
  downscales, else the least upscale). The float image is resized (bilinear, clipped to [0, 1]) to
  `(rows * w + m, cols * w + m)`, mapped to `[image_min, image_max]` (-1, 1) and cut into crops of
  `crop_size` px at steps of `w`, row-major; a **global thumbnail** (the float image resized to the crop size)
  goes first. Each crop -> patches of `patch * patch * 3` values (patch grid row-major, inside a patch
  `(y, x, channel)`).
* Tokens per image: the thumbnail block `<im_start> ([<im_patch>] * tw <im_col>) * th <im_end>` (tw, th = the
  pooled crop size, 3 in the tiny checkpoint, 14 in the real one), then the crops' block with the same layout
  over the kept pooled cells of all tiles: per direction the first tile keeps `ceil((window + left) / pool)`
  cells from cell 0, a middle tile `ceil(window / pool)` and the last tile `ceil((window + right) / pool)`,
  both from cell `left / pool`; a single tile keeps all `ceil(crop_patches / pool)` cells.
* `image_input_idx [n_crops, th * tw]`: the position in `input_ids` of each pooled cell's `<im_patch>`
  (negative: a cell in a discarded margin). `image_masks [n_crops, n_patches]`: 1 everywhere (no padding with
  `preserve_aspect_ratio false`) except the **last crop, -1**: the reference appends its padding row after the
  tiles although the thumbnail comes first, so the last tile is flagged "partial padding" (kept: the
  goldens pin it).
* Prompt (chat template, `always_start_with_space`): `" User: " + "<|image|>" + T + " Assistant:"` (no image
  part for a text-only prompt); tokenized without special tokens, the `<|image|>` id replaced by the image's
  token block, then `<|endoftext|>` prepended (the tokenizer has no BOS; the reference uses the EOS id).
* Batches: left padding; `input_ids` padded with -1, `attention_mask = input_ids != -1`, crops padded with
  all -1 crops, masks with -1, `image_input_idx` rows with -1 and valid positions shifted by the padding.

Our choices: bilinear resizes run single-threaded (torch's float bilinear kernel rounds differently when its
work is split over threads, which flips exact .5 ties of the uint8 rounding; the goldens were made on one
thread); prompt texts are tokenized with special-token strings read as plain text (a text cannot inject image
or stop tokens); invalid `image_input_idx` entries are -1 (the reference writes other negative values).
"""

from __future__ import annotations

import contextlib
import os
import threading
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .base import ModelError
from .checkpoint_files import read_json
from .qwen2_vl_images import smart_resize

IMAGE_PROMPT = "<|image|>"
IMAGE_TOKENS = ("<im_start>", "<im_end>", "<im_patch>", "<im_col>")


@dataclass(frozen=True)
class JinaVLMImageConfig:
    """The preprocessor_config.json values the preprocessing uses (real jina-vlm defaults)."""

    crop_size: int = 378
    patch_size: int = 14
    overlap_margins: tuple[int, int] = (4, 4)
    max_crops: int = 12
    min_pixels: int = 3136
    max_pixels: int = 1003520
    pooling_h: int = 2
    pooling_w: int = 2
    use_column_tokens: bool = True
    image_min: float = -1.0
    image_max: float = 1.0

    @property
    def crop_patches(self) -> int:
        return self.crop_size // self.patch_size

    @property
    def window_patches(self) -> int:
        return self.crop_patches - sum(self.overlap_margins)

    @property
    def token_h(self) -> int:
        return -(-self.crop_patches // self.pooling_h)

    @property
    def token_w(self) -> int:
        return -(-self.crop_patches // self.pooling_w)

    @property
    def n_patches(self) -> int:
        return self.crop_patches ** 2

    @classmethod
    def from_dir(cls, path: str, **overrides: Any) -> JinaVLMImageConfig:
        """Read `<path>/preprocessor_config.json`; settings this implementation does not reproduce are a
        ModelError. `overrides` (max_crops, min_pixels, max_pixels) replace the file's values."""
        raw = read_json(os.path.join(path, "preprocessor_config.json"))
        if raw is None:
            raise ModelError(f"{path}: no preprocessor_config.json (image preprocessing settings)")
        where = f"{path}/preprocessor_config.json"
        required = {"cropping_method": "overlap-and-resize", "normalization_method": "minmax",
                    "interpolation": "bilinear", "antialias": False, "resize_in_float32": False,
                    "preserve_aspect_ratio": False, "random_interpolation": False, "do_resize": True,
                    "do_convert_rgb": True, "use_column_tokens": True}
        for key, want in required.items():
            if key in raw and raw[key] != want:
                raise ModelError(f"{where}: {key} {raw[key]!r} is not supported (expected {want!r})")
        base = raw.get("base_input_size") or [raw.get("crop_size", cls.crop_size)] * 2
        if isinstance(base, int):
            base = [base, base]
        if base[0] != base[1]:
            raise ModelError(f"{where}: base_input_size {base} must be square")
        size = raw.get("size") or {}
        d = cls()
        cfg = cls(
            crop_size=int(base[0]),
            patch_size=int(raw.get("patch_size", d.patch_size)),
            overlap_margins=tuple(int(m) for m in raw.get("overlap_margins", d.overlap_margins)),  # type: ignore
            max_crops=int(raw.get("max_crops", d.max_crops)),
            min_pixels=int(raw.get("min_pixels") or size.get("shortest_edge") or d.min_pixels),
            max_pixels=int(raw.get("max_pixels") or size.get("longest_edge") or d.max_pixels),
            pooling_h=int(raw.get("pooling_h", d.pooling_h)),
            pooling_w=int(raw.get("pooling_w", d.pooling_w)),
            image_min=float(raw.get("image_min", d.image_min)),
            image_max=float(raw.get("image_max", d.image_max)),
        )
        cfg = cls(**{**cfg.__dict__, **{k: int(v) for k, v in overrides.items() if v is not None}})
        cfg.check(where, raw)
        return cfg

    def check(self, where: str, raw: dict[str, Any] | None = None) -> None:
        left, right = self.overlap_margins
        if self.crop_size % self.patch_size or self.window_patches < 1:
            raise ModelError(f"{where}: crop size {self.crop_size} / patch {self.patch_size} / margins "
                             f"{self.overlap_margins} leave no window")
        if left % self.pooling_h or right % self.pooling_h or left % self.pooling_w or right % self.pooling_w:
            raise ModelError(f"{where}: overlap_margins {self.overlap_margins} must be multiples of the pooling")
        if self.max_crops < 1 or self.min_pixels > self.max_pixels:
            raise ModelError(f"{where}: max_crops must be >= 1 and min_pixels <= max_pixels")
        raw = raw or {}
        for key, value in (("token_length_h", self.token_h), ("token_length_w", self.token_w)):
            if key in raw and int(raw[key]) != value:
                raise ModelError(f"{where}: {key} {raw[key]} != ceil(crop patches / pooling) = {value}")


_RESIZE_LOCK = threading.Lock()


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """torch on one intra-op thread (for reproducible bilinear rounding), restored afterwards."""
    with _RESIZE_LOCK:
        n = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            yield
        finally:
            torch.set_num_threads(n)


def _bilinear(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """[C, H, W] float32 -> [C, h, w]: bilinear, half-pixel centres, no antialias (torchvision's tensor
    `Resize(antialias=False)`)."""
    return F.interpolate(x[None], size=size, mode="bilinear", align_corners=False, antialias=False)[0]


def resize_uint8(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """[H, W, 3] uint8 -> [h, w, 3] uint8 as torchvision resizes a uint8 tensor: float32 bilinear, rounded."""
    x = torch.from_numpy(np.array(image, dtype=np.float32)).permute(2, 0, 1)
    with _one_thread():
        y = _bilinear(x, size)
    return y.round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).contiguous().numpy()


def select_tiling(h: int, w: int, window: int, max_crops: int) -> tuple[int, int]:
    """Molmo's tiling (rows, cols) for an image of h x w px (margins removed) in tiles of `window` px."""
    tilings = sorted(((i, j) for i in range(1, max_crops + 1) for j in range(1, max_crops + 1) if i * j <= max_crops),
                     key=lambda t: (t[0] * t[1], t[0]))
    candidates = np.array(tilings, dtype=np.int32)
    with np.errstate(divide="ignore"):  # an image no larger than the margins: infinite scale on that side
        scales = (candidates * window).astype(np.float32) / np.array([h, w], dtype=np.float32)
    scale = scales.min(axis=-1)
    if np.all(scale < 1):
        ix = int(np.argmax(scale))  # forced to downscale: as little as possible
    else:
        ix = int(np.argmin(np.where(scale < 1.0, 10e9, scale)))  # the least upscale
    return int(candidates[ix, 0]), int(candidates[ix, 1])


def kept_cells(n_tiles: int, config: JinaVLMImageConfig, pool: int) -> list[tuple[int, int]]:
    """Per tile along one direction: (first kept pooled cell in the crop, number of kept cells)."""
    left, right = config.overlap_margins
    out = []
    for i in range(n_tiles):
        patches = config.window_patches + (left if i == 0 else 0) + (right if i == n_tiles - 1 else 0)
        out.append((0 if i == 0 else left // pool, -(-patches // pool)))
    return out


@dataclass
class ImageLayout:
    """An image's token block and, per crop (thumbnail first), where each pooled cell's feature goes."""

    tiling: tuple[int, int]
    tokens: np.ndarray  # int64 [n_tokens]: the thumbnail block then the crops' block
    patch_index: np.ndarray  # int64 [n_crops, token_h * token_w]: position in `tokens`, -1 = discarded
    image_masks: np.ndarray  # float32 [n_crops, n_patches]


def _block(rows: int, cols: int, ids: dict[str, int]) -> list[int]:
    """`<im_start> ([<im_patch>] * cols <im_col>) * rows <im_end>`."""
    row = [ids["<im_patch>"]] * cols + [ids["<im_col>"]]
    return [ids["<im_start>"]] + row * rows + [ids["<im_end>"]]


def image_layout(tiling: tuple[int, int], config: JinaVLMImageConfig, ids: dict[str, int]) -> ImageLayout:
    """Tokens, feature positions and masks of an image cut in `tiling` (rows, cols) tiles."""
    th, tw = config.token_h, config.token_w
    cells_y = kept_cells(tiling[0], config, config.pooling_h)
    cells_x = kept_cells(tiling[1], config, config.pooling_w)
    grid_h, grid_w = sum(n for _, n in cells_y), sum(n for _, n in cells_x)
    thumb = _block(th, tw, ids)
    tokens = thumb + _block(grid_h, grid_w, ids)
    index = np.full((1 + tiling[0] * tiling[1], th, tw), -1, dtype=np.int64)
    r, c = np.mgrid[0:th, 0:tw]
    index[0] = 1 + r * (tw + 1) + c
    crop, y_off = 1, 0
    for y0, ny in cells_y:
        x_off = 0
        for x0, nx in cells_x:
            rows, cols = np.mgrid[0:ny, 0:nx]
            index[crop, y0:y0 + ny, x0:x0 + nx] = len(thumb) + 1 + (y_off + rows) * (grid_w + 1) + x_off + cols
            crop, x_off = crop + 1, x_off + nx
        y_off += ny
    masks = np.ones((index.shape[0], config.n_patches), dtype=np.float32)
    masks[-1] = -1.0  # the reference's padding row lands on the last crop (see the module docstring)
    return ImageLayout(tiling, np.asarray(tokens, dtype=np.int64), index.reshape(index.shape[0], -1), masks)


def patchify(x: torch.Tensor, patch: int) -> torch.Tensor:
    """[n, C, S, S] -> [n, (S/p)^2, p * p * C]: patch grid row-major, inside a patch (y, x, channel)."""
    n, c, s, _ = x.shape
    g = s // patch
    x = x.reshape(n, c, g, patch, g, patch).permute(0, 2, 4, 3, 5, 1)
    return x.reshape(n, g * g, patch * patch * c)


class JinaVLMImageProcessor:
    """RGB PIL image -> smart-resized uint8 pixels (`prepare`) -> crops and layout (`crops`)."""

    def __init__(self, config: JinaVLMImageConfig, token_ids: dict[str, int]):
        self.config = config
        missing = [t for t in IMAGE_TOKENS if t not in token_ids]
        if missing:
            raise ModelError(f"jina-vlm image processor: no ids for {missing}")
        self.token_ids = dict(token_ids)

    def target_size(self, height: int, width: int) -> tuple[int, int]:
        """smart_resize's (h, w); ImageNotSupported for an image without pixels or over 200:1."""
        c = self.config
        return smart_resize(height, width, c.patch_size, c.min_pixels, c.max_pixels)

    def prepare(self, image: Any) -> np.ndarray:
        """RGB PIL image (or [H, W, 3] uint8) -> smart-resized [h, w, 3] uint8."""
        pixels = np.asarray(image.convert("RGB") if hasattr(image, "convert") else image, dtype=np.uint8)
        if pixels.ndim != 3 or pixels.shape[2] != 3:
            raise ModelError(f"expected [H, W, 3] RGB pixels, got shape {pixels.shape}")
        h, w = self.target_size(int(pixels.shape[0]), int(pixels.shape[1]))
        return resize_uint8(pixels, (h, w))

    def tiling(self, height: int, width: int) -> tuple[int, int]:
        """The tiling of prepared pixels of this size."""
        c = self.config
        margin = c.patch_size * sum(c.overlap_margins)
        return select_tiling(height - margin, width - margin, c.window_patches * c.patch_size, c.max_crops)

    def layout(self, height: int, width: int) -> ImageLayout:
        """Tokens and feature positions of prepared pixels of this size (no pixels computed)."""
        return image_layout(self.tiling(height, width), self.config, self.token_ids)

    def crops(self, pixels: np.ndarray) -> tuple[np.ndarray, ImageLayout]:
        """Prepared [h, w, 3] uint8 -> (float32 [n_crops, n_patches, p * p * 3] crops, thumbnail first; layout)."""
        c = self.config
        layout = self.layout(int(pixels.shape[0]), int(pixels.shape[1]))
        rows, cols = layout.tiling
        margin = c.patch_size * sum(c.overlap_margins)
        window = c.window_patches * c.patch_size
        x = torch.from_numpy(np.array(pixels, dtype=np.float32)).permute(2, 0, 1) / 255.0
        lo, span = c.image_min, c.image_max - c.image_min
        with _one_thread():
            tiled = lo + _bilinear(x, (rows * window + margin, cols * window + margin)).clamp(0.0, 1.0) * span
            thumb = lo + _bilinear(x, (c.crop_size, c.crop_size)).clamp(0.0, 1.0) * span
        s = c.crop_size
        tiles = [tiled[:, i * window:i * window + s, j * window:j * window + s]
                 for i in range(rows) for j in range(cols)]
        out = patchify(torch.stack([thumb] + tiles), c.patch_size)
        return out.numpy().astype(np.float32, copy=False), layout


def chat_prompt(text: str, image: bool, always_start_with_space: bool = True) -> str:
    """The chat template's rendering of one user turn (an image, then the text) with the generation prompt."""
    return (" " if always_start_with_space else "") + "User: " + (IMAGE_PROMPT if image else "") + text + " Assistant:"


@dataclass
class PromptInput:
    """One prompt as the model takes it (the reference processor's per-example output)."""

    input_ids: np.ndarray  # int64 [L]: BOS, text and image tokens
    images: np.ndarray | None = None  # float32 [n_crops, n_patches, p * p * 3]
    image_input_idx: np.ndarray | None = None  # int64 [n_crops, tokens per crop]; -1 = skipped
    image_masks: np.ndarray | None = None  # float32 [n_crops, n_patches]


def prompt_token_ids(tok: Any, text: str, image: bool, always_start_with_space: bool = True) -> tuple[list[int], int]:
    """(ids of the chat prompt without special tokens, position of the image placeholder or -1). Special-token
    strings in `text` stay plain text (the tokenizer's `encode_special_tokens` is set)."""
    prompt = chat_prompt(text, image, always_start_with_space)
    if not image:
        return list(tok.encode(prompt, add_special_tokens=False).ids), -1
    head, tail = prompt.split(IMAGE_PROMPT, 1)  # the placeholder splits the text, as an added token does
    head_ids = list(tok.encode(head, add_special_tokens=False).ids)
    tail_ids = list(tok.encode(tail, add_special_tokens=False).ids)
    return head_ids + [-2] + tail_ids, len(head_ids)


def build_prompt(text_ids: Sequence[int], placeholder: int, bos_id: int, layout: ImageLayout | None = None,
                 crops: np.ndarray | None = None) -> PromptInput:
    """Text ids (with the image placeholder at `placeholder`, -1: none) -> BOS + ids with the image's tokens."""
    ids = list(text_ids)
    if layout is None:
        return PromptInput(np.asarray([bos_id] + ids, dtype=np.int64))
    merged = ids[:placeholder] + layout.tokens.tolist() + ids[placeholder + 1:]
    shift = 1 + placeholder  # BOS + the text before the image
    idx = np.where(layout.patch_index >= 0, layout.patch_index + shift, -1)
    return PromptInput(np.asarray([bos_id] + merged, dtype=np.int64), crops, idx, layout.image_masks.copy())


@dataclass
class PromptBatch:
    """Left-padded prompts (the reference processor's `padding='longest'`, `padding_side='left'` output)."""

    input_ids: np.ndarray  # int64 [B, L], -1 = padding
    attention_mask: np.ndarray  # int64 [B, L]
    images: np.ndarray | None  # float32 [B, N, n_patches, D], all -1 = padding crop
    image_input_idx: np.ndarray | None  # int64 [B, N, T], -1 = skipped
    image_masks: np.ndarray | None  # float32 [B, N, n_patches], -1 = padding
    n_crops: list[int]


def collate(rows: Sequence[PromptInput]) -> PromptBatch:
    """Left-pad prompts and their image arrays into one batch."""
    length = max(len(r.input_ids) for r in rows)
    ids = np.full((len(rows), length), -1, dtype=np.int64)
    for i, r in enumerate(rows):
        ids[i, length - len(r.input_ids):] = r.input_ids
    n_crops = [0 if r.images is None else len(r.images) for r in rows]
    images = idx = masks = None
    if max(n_crops):
        ref = next(r for r in rows if r.images is not None)
        n = max(n_crops)
        images = np.full((len(rows), n) + ref.images.shape[1:], -1.0, dtype=np.float32)  # type: ignore[union-attr]
        idx = np.full((len(rows), n, ref.image_input_idx.shape[1]), -1, dtype=np.int64)  # type: ignore[union-attr]
        masks = np.full((len(rows), n, ref.image_masks.shape[1]), -1.0, dtype=np.float32)  # type: ignore[union-attr]
        for i, r in enumerate(rows):
            if r.images is None:
                continue
            pad = length - len(r.input_ids)
            images[i, :n_crops[i]] = r.images
            idx[i, :n_crops[i]] = np.where(r.image_input_idx >= 0, r.image_input_idx + pad, -1)
            masks[i, :n_crops[i]] = r.image_masks
    return PromptBatch(ids, (ids != -1).astype(np.int64), images, idx, masks, n_crops)


def image_token_count(layout: ImageLayout) -> int:
    """Tokens an image adds to the prompt (its block replaces the one placeholder token)."""
    return len(layout.tokens) - 1
