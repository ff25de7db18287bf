"""The generator interface: a document (HTML text, an image) -> generated text, for the preprocessing
stages that run before embedding (HTML -> Markdown with ReaderLM-v2, image captions with jina-vlm).

Pure torch/transformers like the encoder and reranker families: nothing here knows about Ray, storage or the
index. A family implements `_generate` for valid, prepared inputs; `generate` handles what is common to every
family: inputs it cannot take become per-input rejects (a `Generation` with `reject` set), never an exception
that loses the other inputs of the batch.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Sequence

import torch

from .base import ModelError
from .checkpoint_files import checkpoint_hash
from .device import pick_device, resolve_dtype


@dataclass(frozen=True)
class GenerationInput:
    """One document for a generator: text (e.g. HTML) or an image (PIL image, encoded bytes or a local path)."""

    text: str | None = None
    image: Any = None


@dataclass
class Generation:
    """What a generator made of one input.

    `reject` set: nothing was generated and the reason says why (e.g. `empty_after_cleaning`,
    `image_decode_error: ...`). Otherwise `text` is the decoded output (special tokens skipped), `ids` the
    generated ids (the stop id included when one was emitted), `finished` False when generation hit
    `max_new_tokens` before a stop id, and `truncated` True when the input was cut to fit the context.
    """

    text: str | None = None
    ids: list[int] = field(default_factory=list)
    finished: bool = False
    prompt_tokens: int = 0
    truncated: bool = False
    reject: str | None = None


@dataclass
class GeneratorInfo:
    family: str
    checkpoint: str  # sha256 of config, tokenizer and weights
    context_length: int  # prompt + generated tokens the model takes
    modalities: list[str]  # inputs it takes: "text" (HTML), "image"
    output: str  # what it writes: "markdown", "json", "caption"
    extra: dict[str, Any] = field(default_factory=dict)


class Generator(ABC):
    """A registered generator family loaded from a local checkpoint directory.

    `options` are the family's settings (e.g. ReaderLM-v2's `instruction`, `schema`, `clean_svg`; jina-vlm's
    `prompt`); an unknown option is a ModelError at load time."""

    name: ClassVar[str]
    modalities: ClassVar[tuple[str, ...]] = ("text",)
    fp16_safe: ClassVar[bool] = True  # False: activations overflow float16's range (Qwen-based decoders)
    options: ClassVar[tuple[str, ...]] = ()

    def __init__(self, path: str, device: str | torch.device | None = None, dtype: str = "auto",
                 force_dtype: bool = False, **options: Any):
        if not os.path.isdir(path):
            raise ModelError(f"generator path {path!r} is not a directory")
        if dtype == "float16" and not self.fp16_safe and not force_dtype:
            raise ModelError(f"generator {self.name!r} overflows in float16; use bfloat16 or float32, or set "
                             "force_dtype: true")
        unknown = sorted(set(options) - set(self.options))
        if unknown:
            raise ModelError(f"{self.name}: unknown options {unknown}; known: {sorted(self.options)}")
        self.path = path
        self.device = pick_device(device)
        self.dtype = resolve_dtype(dtype, self.device)

    @abstractmethod
    def info(self) -> GeneratorInfo: ...

    def _checkpoint_hash(self) -> str:
        return checkpoint_hash(self.path)

    @abstractmethod
    def generate(self, inputs: Sequence[GenerationInput], max_new_tokens: int,
                 batch_tokens: int | None = None) -> list[Generation]:
        """One Generation per input, in input order. Inputs are grouped into length-bucketed batches whose
        padded prompt + `max_new_tokens` tokens stay within `batch_tokens` (None: one input per batch);
        an input the family cannot take becomes a Generation with `reject` set."""


def length_batches(lengths: Sequence[int], max_new_tokens: int, batch_tokens: int | None) -> list[list[int]]:
    """Input positions grouped into batches of similar prompt length: sorted by length, a batch closes before
    its padded size `rows * (longest prompt + max_new_tokens)` would pass `batch_tokens` (a longer input gets a
    batch of its own). None: one input per batch."""
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    if batch_tokens is None:
        return [[i] for i in order]
    batches: list[list[int]] = []
    current: list[int] = []
    for i in order:
        longest = max([lengths[j] for j in current] + [lengths[i]])
        if current and (len(current) + 1) * (longest + max_new_tokens) > batch_tokens:
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches


def greedy_decode(logits: torch.Tensor, step: Callable[[torch.Tensor], torch.Tensor], stop_ids: Sequence[int],
                  pad_id: int, max_new_tokens: int, adjust: Callable[[torch.Tensor], torch.Tensor] | None = None,
                  chosen: Callable[[torch.Tensor], None] | None = None) -> list[tuple[list[int], bool]]:
    """Greedy decoding of a batch from its prefill logits `[B, vocab]`: `step(next_ids [B])` runs one cached
    forward and returns the next logits. `adjust(logits)` turns logits into scores before the argmax (e.g. a
    repetition penalty) and `chosen(ids)` sees each step's ids. A row that emitted a stop id continues with
    `pad_id` until every row has stopped or `max_new_tokens` ids were chosen. Returns per row (new ids up to
    and including its first stop id, whether it stopped)."""
    stop = torch.as_tensor(list(stop_ids), device=logits.device)
    done = torch.zeros(logits.shape[0], dtype=torch.bool, device=logits.device)
    steps: list[torch.Tensor] = []
    for k in range(max_new_tokens):
        scores = adjust(logits) if adjust is not None else logits
        nxt = torch.where(done, torch.full_like(done, pad_id, dtype=torch.long), scores.argmax(-1))
        steps.append(nxt)
        if chosen is not None:
            chosen(nxt)
        done = done | torch.isin(nxt, stop)
        if bool(done.all()) or k == max_new_tokens - 1:
            break
        logits = step(nxt)
    rows = torch.stack(steps, 1).tolist() if steps else [[] for _ in range(logits.shape[0])]
    out = []
    for row in rows:
        cut = next((j + 1 for j, t in enumerate(row) if t in stop_ids), None)
        out.append((row[:cut] if cut else row, cut is not None))
    return out
