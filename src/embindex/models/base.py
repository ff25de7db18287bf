"""The model-family interface: a light tokenizer (CPU tasks) and a torch encoder (embed actors).

Pure torch/transformers: nothing here knows about Ray, storage or the index. A family is given a
local checkpoint directory and a `ModelSpec`; it validates the checkpoint and fails early with a
clear message when it does not support it.
"""

from __future__ import annotations

import hashlib
import json
import os
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Literal, Sequence

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


def text_offsets(raw_offsets: Sequence[tuple[int, int]], special: Sequence[int], prefix_len: int) -> np.ndarray:
    """Offsets in `prefix + text` -> offsets in `text`; special and prefix tokens become (-1, -1)."""
    out = np.full((len(raw_offsets), 2), -1, dtype=np.int64)
    for i, ((s, e), sp) in enumerate(zip(raw_offsets, special)):
        if sp or e <= prefix_len:
            continue
        out[i] = (max(s, prefix_len) - prefix_len, e - prefix_len)
    return out


def leading_prefix_tokens(offsets: np.ndarray) -> int:
    """Number of (-1, -1) tokens before the first token of the text itself."""
    real = np.flatnonzero(offsets[:, 0] >= 0)
    return int(real[0]) if real.size else len(offsets)


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


def batch_ids(tok: Any, texts: Sequence[str], add_special_tokens: bool = True) -> list[np.ndarray]:
    """Token ids of each text from a `tokenizers.Tokenizer`: `encode_batch_fast` (no character offsets
    computed; the same ids as `encode_batch`, about 20% less CPU), int32 arrays."""
    encs = tok.encode_batch_fast(list(texts), add_special_tokens=add_special_tokens)
    return [np.asarray(e.ids, dtype=np.int32) for e in encs]


class PrefixTokenizer(TextTokenizer):
    """A `tokenizers.Tokenizer` (truncation on at `max_length`) behind a role/task-dependent text prefix:
    subclasses set `tok`, `max_length`, `pad_token_id` and define `prefix`."""

    tok: Any
    max_length: int
    add_special_tokens: bool = True

    @abstractmethod
    def prefix(self, role: Role, task: str | None = None) -> str: ...

    def __call__(self, texts: Sequence[str], role: Role, task: str | None = None) -> list[np.ndarray]:
        prefix = self.prefix(role, task)
        return batch_ids(self.tok, [prefix + t for t in texts], self.add_special_tokens)

    def encode_with_offsets(self, text: str, role: Role, task: str | None = None,
                            truncate: bool = True) -> TokenizedText:
        prefix = self.prefix(role, task)
        if not truncate:
            self.tok.no_truncation()
        try:
            enc = self.tok.encode(prefix + text, add_special_tokens=self.add_special_tokens)
        finally:
            self.tok.enable_truncation(self.max_length)
        offsets = text_offsets(enc.offsets, enc.special_tokens_mask, len(prefix))
        return TokenizedText(np.asarray(enc.ids, dtype=np.int32), offsets, leading_prefix_tokens(offsets))


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
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, task: str | None = None
    ) -> torch.Tensor:
        """[B, L] ids and mask -> [B, D] fp32, not normalized."""

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


def read_json(path: str) -> dict[str, Any] | None:
    """A checkpoint's JSON file, or None when it is absent."""
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def load_tokenizer_file(path: str, max_length: int) -> Any:
    """`<path>/tokenizer.json` as a `tokenizers.Tokenizer`, no padding, truncation at `max_length`."""
    from tokenizers import Tokenizer

    tok_file = os.path.join(path, "tokenizer.json")
    if not os.path.exists(tok_file):
        raise ModelError(f"{path}: no tokenizer.json")
    tok = Tokenizer.from_file(tok_file)
    tok.no_padding()
    tok.enable_truncation(max_length=max_length)
    return tok


def read_config(path: str) -> dict[str, Any]:
    """`<path>/config.json`, or a ModelError saying the directory is not a checkpoint."""
    cfg = read_json(os.path.join(path, "config.json"))
    if cfg is None:
        raise ModelError(f"{path}: no config.json; not a Hugging Face checkpoint directory")
    return cfg


def safetensors_files(path: str) -> list[str]:
    """The checkpoint's weight files: the sharded index's, else `model.safetensors`, else every
    .safetensors file. Pickled weights are refused, never loaded."""
    index = read_json(os.path.join(path, "model.safetensors.index.json"))
    if index is not None:
        return [os.path.join(path, f) for f in sorted(set(index["weight_map"].values()))]
    if os.path.exists(os.path.join(path, "model.safetensors")):
        return [os.path.join(path, "model.safetensors")]  # other files there (e.g. test data) are not weights
    found = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    if found:
        return [os.path.join(path, f) for f in found]
    pickles = [f for f in os.listdir(path) if f.endswith((".bin", ".pt", ".pth"))]
    hint = f" (found {pickles}; pickled weights are not loaded, convert them to safetensors)" if pickles else ""
    raise ModelError(f"{path}: no .safetensors weights{hint}")


def load_checked_state(path: str, expected: dict[str, torch.Tensor], rename: Callable[[str], str | None],
                       dtype: torch.dtype | None, device: torch.device | None, layout: str) -> dict[str, torch.Tensor]:
    """Read the checkpoint's safetensors into the model's key names and check them against `expected`:
    `rename(key)` gives the model name (None: an ignored tensor); shapes (from the file headers) must
    match; nothing may be missing or left over. Floating tensors are cast to `dtype`; with `dtype=None`
    only the headers are read (validation at load time) and an empty dict is returned."""
    from safetensors import safe_open

    state: dict[str, torch.Tensor] = {}
    seen: set[str] = set()
    unexpected: list[str] = []
    for file in safetensors_files(path):
        with safe_open(file, framework="pt", device="cpu") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is not iterable)
                name = rename(key)
                if name is None:
                    continue
                if name not in expected:
                    unexpected.append(key)
                    continue
                shape = tuple(f.get_slice(key).get_shape())
                if shape != tuple(expected[name].shape):
                    raise ModelError(
                        f"{path}: tensor {key} has shape {shape}, config.json implies {tuple(expected[name].shape)}"
                    )
                seen.add(name)
                if dtype is not None:
                    t = f.get_tensor(key)
                    state[name] = t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype)
    missing = sorted(set(expected) - seen)
    if missing or unexpected:
        raise ModelError(
            f"{path}: not a {layout} checkpoint in the expected layout; "
            f"missing {len(missing)} tensors {missing[:5]}, unexpected {len(unexpected)} {unexpected[:5]}"
        )
    return state


def pick_device(device: str | torch.device | None = None) -> torch.device:
    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def cpu_supports_bf16() -> bool:
    """True when this CPU has native bf16 matrix instructions (AVX512-BF16 or AMX)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """'auto': bf16 on CUDA (fp16 where bf16 is missing), fp32 on CPU (the embed actor may then switch to
    bf16 after a fidelity probe, dtype_probe.py)."""
    if dtype == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]


def loaded_files(paths: Sequence[str], patterns: Sequence[str]) -> list[str]:
    """The checkpoint files a family loads, in the given order: names ending in one of `patterns`, and a
    `pytorch_model.bin` only in a folder without safetensors (then it is what gets loaded, read with
    `torch.load(weights_only=True)`; beside safetensors it is a duplicate never read)."""
    has_safetensors = {os.path.dirname(p) for p in paths if p.endswith(".safetensors")}
    return [p for p in paths if p.endswith(tuple(patterns))
            or (os.path.basename(p) == "pytorch_model.bin" and os.path.dirname(p) not in has_safetensors)]


def checkpoint_hash(path: str, patterns: Sequence[str] = (".json", ".safetensors", ".txt", ".model")) -> str:
    """sha256 over the checkpoint's config, tokenizer and weight files (names and contents; `loaded_files`)."""
    h = hashlib.sha256()
    for root, dirs, files in os.walk(path):
        dirs.sort()
        for full in loaded_files([os.path.join(root, name) for name in sorted(files)], patterns):
            h.update(os.path.relpath(full, path).encode())
            with open(full, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
    return "sha256:" + h.hexdigest()


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Masked mean over the sequence, in fp32."""
    h = hidden.float()
    m = mask.to(h.dtype).unsqueeze(-1)
    return (h * m).sum(1) / m.sum(1).clamp(min=1e-9)


def cls_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return hidden[:, 0].float()


def last_token_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The last attended token of each row, correct for left or right padding."""
    if bool(mask[:, -1].all()):
        return hidden[:, -1].float()
    last = mask.long().cumsum(1).argmax(1)  # index of the last 1 in each row
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last].float()


POOLERS = {"mean": mean_pool, "cls": cls_pool, "last": last_token_pool}


def check_no_meta_tensors(module: torch.nn.Module, path: str) -> None:
    """After loading with `assign=True` into a meta-device module: every parameter and buffer is real."""
    left = [n for n, t in list(module.named_parameters()) + list(module.named_buffers()) if t.is_meta]
    if left:
        raise ModelError(f"{path}: tensors left uninitialised after loading: {left[:5]}")
