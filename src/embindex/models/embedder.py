"""In-process embedding: token ids -> normalized vectors with token-budget batches.

Used inside the Ray embed actors, by search (query encoding), notebooks and benchmarks, so every
caller shares one code path for padding, pooling and normalization.

Device memory: a forward that runs out of memory frees the cache and retries its rows in batches of at
most half its padded tokens, down to one row. The smaller budget is remembered for the next batches
(`TokenBudget`), so a device that fits less than `batch_tokens` fails once, not on every batch; it is tried
larger again after a run of forwards that fit. Callers that pass `rejects` (the embed actor) get the rows
that do not fit even alone, and rows whose output is not finite, back as rejects instead of an exception.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np
import torch

from ..sources.normalize import Reasons
from ..text.batching import pad_batch, token_budget_batches
from .base import ImageProcessor, ModelFamily, ModelInfo, Role, TextEncoder, TextTokenizer

Rejects = dict[int, tuple[str, str]]  # row (position in the call's input) -> (reason, detail)
_OOM_TYPES = tuple({t for t in (getattr(torch, "OutOfMemoryError", None),
                                getattr(torch.cuda, "OutOfMemoryError", None)) if t is not None})


def l2_normalize(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.maximum(norms, 1e-12)


def is_device_oom(exc: BaseException) -> bool:
    """torch's (CUDA) OutOfMemoryError, or a RuntimeError saying "out of memory"."""
    if _OOM_TYPES and isinstance(exc, _OOM_TYPES):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def free_device_memory() -> None:
    """Return the CUDA caching allocator's free blocks (no-op without CUDA)."""
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def error_line(exc: BaseException) -> str:
    """The exception's type and first line, for a reject detail."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]


class TokenBudget:
    """The padded tokens per forward: `limit` (the configured `batch_tokens`) until a forward runs out of
    device memory, then at most half of what failed; doubled back (up to `limit`) after `grow_after`
    forwards in a row that fit, in case the shortage was passing (another process on the device)."""

    def __init__(self, limit: int, grow_after: int = 64):
        self.limit, self.grow_after = int(limit), grow_after
        self.tokens, self._fits = int(limit), 0

    def failed(self, tokens: int) -> None:
        self.tokens, self._fits = max(1, min(self.tokens, tokens // 2)), 0

    def fitted(self) -> None:
        self._fits += 1
        if self.tokens < self.limit and self._fits >= self.grow_after:
            self.tokens, self._fits = min(self.limit, self.tokens * 2), 0


def split_on_oom(idx: np.ndarray, lengths: np.ndarray, forward: Callable[[np.ndarray], None],
                 budget: TokenBudget, too_large: Callable[[int, str], None] | None = None) -> None:
    """`forward(idx)` (rows longest first, `lengths` per row); on device OOM free the cache, lower the
    budget to at most half the failed batch's padded tokens and retry the rows in batches within it,
    recursively down to one row. A row that alone does not fit goes to `too_large(row, error)`, or raises
    without it."""
    try:
        forward(idx)
        budget.fitted()
        return
    except Exception as e:  # noqa: BLE001 - only OOM is handled; the rest is re-raised
        if not is_device_oom(e) or (len(idx) == 1 and too_large is None):
            raise
        error = error_line(e)
    free_device_memory()  # outside the except block: the traceback no longer pins the batch's tensors
    if len(idx) == 1:
        too_large(int(idx[0]), error)  # type: ignore[misc]
        return
    budget.failed(padded_tokens(lengths, idx))
    for part in token_budget_batches(lengths[idx], lambda: budget.tokens):  # read again after each part
        split_on_oom(idx[part], lengths, forward, budget, too_large)


def padded_tokens(lengths: np.ndarray, idx: np.ndarray) -> int:
    return len(idx) * max(1, int(lengths[idx].max()))


def device_memory(device: Any) -> str:
    """", 1.2 GiB free of 80.0 GiB" for a CUDA device, "" otherwise."""
    try:
        dev = torch.device(device) if device is not None else None
        if dev is None or dev.type != "cuda" or not torch.cuda.is_available():
            return ""
        free, total = torch.cuda.mem_get_info(dev)
    except Exception:  # noqa: BLE001 - a detail string must never fail the build
        return ""
    return f", {free / 2**30:.1f} GiB free of {total / 2**30:.1f} GiB"


def _row_finite(*arrays: np.ndarray | None) -> bool:
    return all(a is None or bool(np.isfinite(a).all()) for a in arrays)


class Embedder:
    """A loaded tokenizer + encoder pair with the batching policy of the pipeline."""

    def __init__(
        self,
        family: ModelFamily,
        device: str | torch.device | None = None,
        batch_tokens: int = 16384,
        tokenizer: TextTokenizer | None = None,
        encoder: TextEncoder | None = None,
    ):
        self.family = family
        self.info: ModelInfo = family.info()
        self.tokenizer = tokenizer or family.load_tokenizer()
        self.encoder = encoder or family.load_encoder(device)
        self.budget = TokenBudget(batch_tokens)
        self.padding_side = getattr(self.tokenizer, "padding_side", "right")
        self._image_processor: ImageProcessor | None = None

    @property
    def batch_tokens(self) -> int:
        """The configured padded tokens per forward (the budget's ceiling)."""
        return self.budget.limit

    @batch_tokens.setter
    def batch_tokens(self, value: int) -> None:
        self.budget = TokenBudget(value)

    def tokenize(self, texts: Sequence[str], role: Role, task: str | None = None) -> list[np.ndarray]:
        return self.tokenizer(texts, role, task)

    def embed_ids(self, ids: Sequence[np.ndarray], task: str | None = None,
                  on_batch: Callable[[int], None] | None = None, rejects: Rejects | None = None,
                  role: Role | None = None) -> np.ndarray:
        """Token ids -> [N, dim] float32 L2-normalized, in input order. `on_batch(rows)` after each forward.
        `role`: what the ids were tokenized as (see `TextEncoder.forward_pooled`).
        With `rejects`, rows too large for the device or with a non-finite vector are recorded there
        (their vectors are zero) instead of raising."""
        out = np.zeros((len(ids), self.info.dim), dtype=np.float32)

        def forward(idx: np.ndarray) -> None:
            input_ids, mask = pad_batch([ids[i] for i in idx], self.tokenizer.pad_token_id, self.padding_side)
            pooled = self.encoder.forward_pooled(torch.from_numpy(input_ids), torch.from_numpy(mask), task, role)
            out[idx] = pooled.float().cpu().numpy()
            if on_batch is not None:
                on_batch(len(idx))

        self.run_batches([len(x) for x in ids], forward, rejects, on_batch, lambda i: f"{len(ids[i])} tokens")
        if rejects is not None:
            for i in range(len(ids)):
                self.check_finite(rejects, i, out[i])
        return l2_normalize(out)

    def encode(self, texts: Sequence[str], role: Role = "document", task: str | None = None) -> np.ndarray:
        return self.embed_ids(self.tokenize(texts, role, task), task, role=role)

    # -- rows the device cannot take, outputs that are not finite -------------------------------
    @property
    def dtype_name(self) -> str:
        """The encoder's dtype without the torch prefix, e.g. "bfloat16"."""
        return str(getattr(self.encoder, "dtype", "unknown")).replace("torch.", "")

    def run_batches(self, lengths: Sequence[int], forward: Callable[[np.ndarray], None], rejects: Rejects | None,
                    on_batch: Callable[[int], None] | None, what: Callable[[int], str]) -> None:
        """`forward(rows)` over batches of rows of these lengths within the token budget (`self.budget`,
        lowered on device OOM); a row that does not fit alone is a `too_large_for_device` reject (described
        by `what(row)`), or raises when `rejects` is None."""
        too_large = self._too_large(rejects, on_batch, what)
        lengths = np.asarray(lengths, dtype=np.int64)
        for idx in token_budget_batches(lengths, lambda: self.budget.tokens):
            split_on_oom(idx, lengths, forward, self.budget, too_large)

    def device_detail(self, what: str, error: str) -> str:
        """Why a row was not embedded: its size, the model's dtype and device, the device's memory."""
        device = getattr(self.encoder, "device", None)
        return f"{what} do not fit on {device} ({self.dtype_name}{device_memory(device)}) even alone: {error}"

    def _too_large(self, rejects: Rejects | None, on_batch: Callable[[int], None] | None,
                   what: Callable[[int], str]) -> Callable[[int, str], None] | None:
        """`split_on_oom`'s callback: record a `too_large_for_device` reject (None: raise instead)."""
        if rejects is None:
            return None

        def record(row: int, error: str) -> None:
            rejects[row] = (Reasons.TOO_LARGE_FOR_DEVICE, self.device_detail(what(row), error))
            if on_batch is not None:
                on_batch(1)

        return record

    def check_finite(self, rejects: Rejects, row: int, vector: np.ndarray,
                     tokens: np.ndarray | None = None) -> bool:
        """False (and a `non_finite` reject, the vector zeroed) when the row's vectors are not all finite."""
        if row in rejects:
            return False
        if _row_finite(vector, tokens):
            return True
        values = np.concatenate([vector.reshape(-1)] + ([] if tokens is None else [tokens.reshape(-1)]))
        n_nan, n_inf = int(np.isnan(values).sum()), int(np.isinf(values).sum())
        rejects[row] = (Reasons.NON_FINITE, f"the model output holds {n_nan} NaN and {n_inf} infinite values of "
                        f"{values.size} ({self.dtype_name} on {getattr(self.encoder, 'device', None)})")
        vector[:] = 0
        return False

    @property
    def token_dim(self) -> int:
        return self.info.token_dim or self.info.dim

    def embed_multi(self, ids: Sequence[np.ndarray], task: str | None = None,
                    on_batch: Callable[[int], None] | None = None,
                    rejects: Rejects | None = None) -> tuple[np.ndarray, list[np.ndarray]]:
        """Multi-vector families: token ids -> ([N, dim] unit single vectors, per row the kept [n_i, d]
        unit token vectors), in input order. The single vector is the model's own (e.g. v4's mean-pooled
        hidden state) or, where it has none, the normalized mean of the token vectors.
        `rejects` as in `embed_ids` (a row is rejected when any of its vectors is not finite)."""
        single = np.zeros((len(ids), self.info.dim), np.float32)
        out: list[np.ndarray] = [np.zeros((0, self.token_dim), np.float32)] * len(ids)

        def forward(idx: np.ndarray) -> None:
            input_ids, mask = pad_batch([ids[i] for i in idx], self.tokenizer.pad_token_id, self.padding_side)
            pooled, vecs, keep = self.encoder.forward_multi(torch.from_numpy(input_ids), torch.from_numpy(mask), task)
            vecs, keep = vecs.float().cpu().numpy(), keep.cpu().numpy()
            for b, i in enumerate(idx):
                out[i] = vecs[b][keep[b]]
            if pooled is not None:
                single[idx] = pooled.float().cpu().numpy()
            else:  # the model has no single vector of its own: the mean of the kept token vectors
                single[idx] = [out[i].mean(0) if len(out[i]) else single[i] for i in idx]
            if on_batch is not None:
                on_batch(len(idx))

        self.run_batches([len(x) for x in ids], forward, rejects, on_batch, lambda i: f"{len(ids[i])} tokens")
        if rejects is not None:
            for i in range(len(ids)):
                if not self.check_finite(rejects, i, single[i], out[i]):
                    out[i] = np.zeros((0, self.token_dim), np.float32)
        return l2_normalize(single), out

    def embed_tokens(self, ids: Sequence[np.ndarray], task: str | None = None) -> list[np.ndarray]:
        """Multi-vector families: token ids -> per row the kept [n_i, d] unit token vectors, in input order."""
        return self.embed_multi(ids, task)[1]

    def encode_tokens(self, texts: Sequence[str], role: Role = "document", task: str | None = None) -> list[np.ndarray]:
        return self.embed_tokens(self.tokenize(texts, role, task), task)

    def encode_multi(self, texts: Sequence[str], role: Role = "document",
                     task: str | None = None) -> tuple[np.ndarray, list[np.ndarray]]:
        return self.embed_multi(self.tokenize(texts, role, task), task)

    # -- images ----------------------------------------------------------------------------------
    @property
    def image_processor(self) -> ImageProcessor:
        if self._image_processor is None:
            self._image_processor = self.family.load_image_processor()
        return self._image_processor

    def embed_images(self, pixels: Sequence[np.ndarray], task: str | None = None, tokens: bool = False,
                     on_batch: Callable[[int], None] | None = None,
                     rejects: Rejects | None = None) -> tuple[np.ndarray, list[np.ndarray] | None]:
        """Prepared [H, W, 3] uint8 images -> ([N, dim] unit vectors, per image [n_i, d] token vectors
        when `tokens`), batched by the encoder's sequence length per image within the token budget.
        `rejects` as in `embed_ids`."""
        single = np.zeros((len(pixels), self.info.dim), np.float32)
        empty = np.zeros((0, self.token_dim), np.float32)
        per_image: list[np.ndarray] | None = [empty] * len(pixels) if tokens else None
        lengths = [self.image_processor.sequence_length(p.shape[0], p.shape[1]) for p in pixels]

        def forward(idx: np.ndarray) -> None:
            pooled, toks = self.encoder.forward_images([pixels[i] for i in idx], task, tokens=tokens)
            single[idx] = pooled.float().cpu().numpy()
            if per_image is not None and toks is not None:
                for i, t in zip(idx, toks):
                    per_image[i] = t.float().cpu().numpy()
            if on_batch is not None:
                on_batch(len(idx))

        self.run_batches(lengths, forward, rejects, on_batch,
                         lambda i: f"image {pixels[i].shape[0]}x{pixels[i].shape[1]} ({lengths[i]} tokens)")
        if rejects is not None:
            for i in range(len(pixels)):
                if not self.check_finite(rejects, i, single[i], None if per_image is None else per_image[i]) \
                        and per_image is not None:
                    per_image[i] = empty
        return l2_normalize(single), per_image

    def prepare_images(self, images: Sequence[Any]) -> list[np.ndarray]:
        """PIL images, encoded bytes or local paths -> the model's prepared uint8 pixels."""
        from .images import open_image

        return [self.image_processor(open_image(x)) for x in images]

    def encode_images(self, images: Sequence[Any], task: str | None = None) -> np.ndarray:
        return self.embed_images(self.prepare_images(images), task)[0]

    def encode_image_tokens(self, images: Sequence[Any], task: str | None = None) -> list[np.ndarray]:
        return self.embed_images(self.prepare_images(images), task, tokens=True)[1] or []
