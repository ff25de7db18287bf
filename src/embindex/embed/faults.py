"""Fault injection, to test the embed actor's recovery from device OOM and non-finite outputs.

Off unless one of these environment variables is set when an `EmbedActor` starts (a build run in a
subprocess starts its own local Ray, whose workers inherit the environment). Never set them otherwise:

- `EMBINDEX_FAULT_OOM_ABOVE_TOKENS=N`: a forward whose padded batch holds more than N tokens raises
  `torch.cuda.OutOfMemoryError` (images: images x the longest image sequence).
- `EMBINDEX_FAULT_NAN_IDS=id1,id2`: the model outputs of those documents are NaN (a text row is matched
  by its token ids; the first window of a windowed late-chunking document matches too; an image by its
  prepared pixels).

The switches act on the forward calls only, after the actor's warm-up.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import pyarrow as pa
import torch

from ..models.base import Role

OOM_ENV = "EMBINDEX_FAULT_OOM_ABOVE_TOKENS"
NAN_ENV = "EMBINDEX_FAULT_NAN_IDS"


@dataclass(frozen=True)
class Faults:
    oom_above_tokens: int | None = None
    nan_ids: frozenset[str] = frozenset()

    @classmethod
    def from_env(cls) -> "Faults | None":
        """The switches set in the environment, or None when there are none."""
        oom = os.environ.get(OOM_ENV, "").strip()
        nan = frozenset(x.strip() for x in os.environ.get(NAN_ENV, "").split(",") if x.strip())
        if not oom and not nan:
            return None
        return cls(int(oom) if oom else None, nan)


def _pixels_key(pixels: np.ndarray) -> str:
    return hashlib.sha1(np.ascontiguousarray(pixels).tobytes() + str(pixels.shape).encode()).hexdigest()


class FaultyEncoder:
    """Wraps a TextEncoder: raises OOM over the token limit, NaNs the outputs of the watched documents."""

    def __init__(self, inner: Any, faults: Faults, image_tokens: Callable[[np.ndarray], int] | None = None):
        self.inner, self.faults, self.image_tokens = inner, faults, image_tokens
        self._texts: list[tuple[int, ...]] = []
        self._images: set[str] = set()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def watch(self, batch: pa.Table) -> None:
        """Note the token ids / pixels of this batch's rows whose id is in `nan_ids`."""
        self._texts, self._images = [], set()
        if not self.faults.nan_ids:
            return
        ids = batch.column("id").to_pylist()
        tokens = batch.column("input_ids").to_pylist()
        pixels = batch.column("pixels").to_pylist() if "pixels" in batch.column_names else [None] * len(ids)
        hs = batch.column("height").to_pylist() if "height" in batch.column_names else [None] * len(ids)
        ws = batch.column("width").to_pylist() if "width" in batch.column_names else [None] * len(ids)
        for doc, toks, px, h, w in zip(ids, tokens, pixels, hs, ws):
            if doc not in self.faults.nan_ids:
                continue
            if px is not None:
                self._images.add(_pixels_key(np.frombuffer(px, np.uint8).reshape(h, w, 3)))
            elif toks:
                self._texts.append(tuple(toks))

    # -- the injected faults ---------------------------------------------------------------------
    def _check_tokens(self, tokens: int) -> None:
        limit = self.faults.oom_above_tokens
        if limit is not None and tokens > limit:
            raise torch.cuda.OutOfMemoryError(f"CUDA out of memory (injected by {OOM_ENV}: a batch of {tokens} "
                                              f"tokens > {limit})")

    def _text_rows(self, input_ids: torch.Tensor, mask: torch.Tensor) -> list[int]:
        rows = []
        for b in range(input_ids.shape[0]):
            row = tuple(input_ids[b][mask[b].bool()].tolist())
            if any(doc[: len(row)] == row for doc in self._texts):
                rows.append(b)
        return rows

    @staticmethod
    def _nan(t: torch.Tensor | None, rows: list[int]) -> torch.Tensor | None:
        if t is None or not rows:
            return t
        t = t.clone()  # outputs may be inference tensors (no in-place update outside inference mode)
        t[rows] = float("nan")
        return t

    def forward_pooled(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, task: str | None = None,
                       role: Role | None = None):
        self._check_tokens(input_ids.numel())
        out = self.inner.forward_pooled(input_ids, attention_mask, task, role)
        return self._nan(out, self._text_rows(input_ids, attention_mask))

    def forward_token_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, task: str | None = None):
        self._check_tokens(input_ids.numel())
        out = self.inner.forward_token_states(input_ids, attention_mask, task)
        return self._nan(out, self._text_rows(input_ids, attention_mask))

    def forward_multi(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, task: str | None = None):
        self._check_tokens(input_ids.numel())
        pooled, vecs, keep = self.inner.forward_multi(input_ids, attention_mask, task)
        rows = self._text_rows(input_ids, attention_mask)
        return self._nan(pooled, rows), self._nan(vecs, rows), keep

    def forward_images(self, pixels: Sequence[np.ndarray], task: str | None = None, tokens: bool = False):
        if self.image_tokens is not None and pixels:
            self._check_tokens(len(pixels) * max(self.image_tokens(p) for p in pixels))
        pooled, toks = self.inner.forward_images(pixels, task, tokens=tokens)
        rows = [b for b, p in enumerate(pixels) if _pixels_key(p) in self._images]
        if toks is not None:
            toks = [self._nan(t[None], [0])[0] if b in rows else t for b, t in enumerate(toks)]
        return self._nan(pooled, rows), toks
