"""The model-family interface: a light tokenizer (CPU tasks) and a torch encoder (embed actors).

Pure torch/transformers: nothing here knows about Ray, storage or the index. A family is given a
local checkpoint directory and a `ModelSpec`; it validates the checkpoint and fails early with a
clear message when it does not support it.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, Sequence

import numpy as np
import torch

Role = Literal["query", "document"]
ROLES: tuple[Role, ...] = ("query", "document")


@dataclass(frozen=True)
class ModelSpec:
    """What the caller asks of a model (a subset of the job's `model` config)."""

    name: str
    path: str  # local directory of the checkpoint
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16
    max_length: int | None = None
    task: str | None = None
    pooling: str = "auto"
    force_dtype: bool = False  # run a dtype the family refuses by default (float16 on Qwen-based families)


@dataclass
class ModelInfo:
    """Facts the index manifest records about a loaded model."""

    family: str
    dim: int
    max_length: int
    pooling: str
    tasks: list[str] = field(default_factory=list)
    matryoshka_dims: list[int] | None = None
    prefixes: dict[str, str] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    modalities: list[str] = field(default_factory=lambda: ["text"])  # "text", "image"
    token_dim: int | None = None  # width of multi-vector token vectors when it differs from `dim`


class ModelError(ValueError):
    """A checkpoint or request the model code does not support."""


class ImageNotSupported(ModelError):
    """An image the model's processor cannot take (e.g. an extreme aspect ratio): a reject, not a failure."""


MAX_ASPECT_RATIO = 200  # Qwen2-VL's limit; also bounds the resize memory of shortest-side processors


def check_image_size(width: int, height: int) -> None:
    """ImageNotSupported for an image without pixels or with an aspect ratio over MAX_ASPECT_RATIO."""
    if min(width, height) <= 0:
        raise ImageNotSupported(f"image of size {width}x{height} has no pixels")
    ratio = max(width, height) / min(width, height)
    if ratio > MAX_ASPECT_RATIO:
        raise ImageNotSupported(f"image aspect ratio {ratio:.1f} exceeds {MAX_ASPECT_RATIO}")


@dataclass
class TokenizedText:
    """One text's model input with each token's character span in the text (without the prefix).

    `offsets[i] = (start, end)`; special and instruction-prefix tokens have (-1, -1).
    `n_prefix_tokens` counts the leading special + prefix tokens."""

    ids: np.ndarray
    offsets: np.ndarray  # [n, 2] int64
    n_prefix_tokens: int


class TextTokenizer(ABC):
    """Turns texts into token ids (prefixes, special tokens and truncation included)."""

    pad_token_id: int

    @abstractmethod
    def __call__(self, texts: Sequence[str], role: Role, task: str | None = None) -> list[np.ndarray]:
        """One int array of token ids per text."""

    def encode_with_offsets(self, text: str, role: Role, task: str | None = None,
                            truncate: bool = True) -> TokenizedText:
        """Ids as `__call__` gives them plus character offsets (for chunk spans / late chunking).
        `truncate=False` keeps every token (long late chunking windows them later)."""
        raise NotImplementedError(f"{type(self).__name__} gives no token offsets (no late chunking)")

    @property
    def has_offsets(self) -> bool:
        """Whether `encode_with_offsets` is implemented (late chunking and the "tokens" chunker need it)."""
        return type(self).encode_with_offsets is not TextTokenizer.encode_with_offsets


class ImageProcessor(ABC):
    """CPU side of image inputs (runs in Ray CPU tasks): a decoded RGB PIL image -> the uint8 pixels
    the model sees (resized / cropped, not yet normalized). Normalization and patching happen in the
    encoder, so blocks carry 1 byte per pixel instead of 4."""

    @abstractmethod
    def __call__(self, image: Any) -> np.ndarray:
        """PIL.Image (any mode) -> [H, W, 3] uint8 RGB array."""

    @abstractmethod
    def sequence_length(self, height: int, width: int) -> int:
        """Tokens the encoder runs for prepared pixels of this size (for token-budget batches)."""


class TextEncoder(ABC):
    """A torch model that maps padded token ids to one pooled fp32 vector per row (and, for
    multimodal families, prepared images to vectors)."""

    device: torch.device
    dtype: torch.dtype

    @abstractmethod
    def forward_pooled(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, task: str | None = None,
        role: Role | None = None,
    ) -> torch.Tensor:
        """[B, L] ids and mask -> [B, D] fp32, not normalized. `role`: what every row is (its tokenizer
        prefix / prompt), for encoders whose pooling depends on it (sentence-transformers' Pooling with
        include_prompt=false); None where unknown."""

    def forward_token_states(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, task: str | None = None
    ) -> torch.Tensor:
        """Mean-pooling families: [B, L] -> [B, L, H] last hidden states (what `forward_pooled` pools),
        used by late chunking."""
        raise NotImplementedError(f"{type(self).__name__} gives no token states (no late chunking)")

    def forward_tokens(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, task: str | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Multi-vector families: [B, L] -> ([B, L, d] fp32 per-token vectors, [B, L] bool keep mask).

        The keep mask says which token vectors are stored (padding and, e.g., ColBERT's punctuation
        skiplist are dropped). Single-vector families raise."""
        raise NotImplementedError(f"{type(self).__name__} has no multi-vector output")

    def forward_multi(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, task: str | None = None
    ) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
        """Multi-vector families: (single vector [B, D] fp32 not normalized, or None when the single
        vector is the mean of the token vectors; token vectors; keep mask) from one forward."""
        vecs, keep = self.forward_tokens(input_ids, attention_mask, task)
        return None, vecs, keep

    def forward_images(
        self, pixels: Sequence[np.ndarray], task: str | None = None, tokens: bool = False
    ) -> tuple[torch.Tensor, list[torch.Tensor] | None]:
        """Image families: [H_i, W_i, 3] uint8 arrays from the family's ImageProcessor ->
        ([B, D] fp32 single vectors, not normalized; with `tokens=True` also per image the
        [n_i, d] unit multi-vector token vectors, else None)."""
        raise NotImplementedError(f"{type(self).__name__} takes no images")


class ModelFamily(ABC):
    """A registered family: validates a checkpoint directory and builds its tokenizer and encoder."""

    name: ClassVar[str]
    fp16_safe: ClassVar[bool] = True  # False: activations overflow float16's range (Qwen-based decoders)

    def __init__(self, spec: ModelSpec):
        if not os.path.isdir(spec.path):
            raise ModelError(f"model path {spec.path!r} is not a directory")
        if spec.dtype == "float16" and not self.fp16_safe and not spec.force_dtype:
            raise ModelError(f"model family {self.name!r} overflows in float16 (its activations exceed float16's "
                             "range and become inf/NaN); use bfloat16 or float32, or set model.force_dtype: true")
        self.spec = spec

    @abstractmethod
    def info(self) -> ModelInfo: ...

    @abstractmethod
    def load_tokenizer(self) -> TextTokenizer: ...

    @abstractmethod
    def load_encoder(self, device: str | torch.device | None = None) -> TextEncoder: ...

    def load_image_processor(self) -> ImageProcessor:
        """Image families override; text-only families refuse images."""
        raise ModelError(f"model family {self.name!r} embeds text only; it takes no images")

    def check_task(self, task: str | None) -> None:
        tasks = self.info().tasks
        if task is not None and task not in tasks:
            raise ModelError(
                f"model family {self.name!r} has no task {task!r}; "
                + (f"choose one of {tasks}" if tasks else "it takes no task")
            )
