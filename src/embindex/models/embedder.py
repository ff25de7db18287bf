"""In-process embedding: token ids -> normalized vectors with token-budget batches.

Used inside the Ray embed actors, by search (query encoding), notebooks and benchmarks, so every
caller shares one code path for padding, pooling and normalization.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np
import torch

from ..text.batching import pad_batch, token_budget_batches
from .base import ImageProcessor, ModelFamily, ModelInfo, Role, TextEncoder, TextTokenizer


def l2_normalize(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.maximum(norms, 1e-12)


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
        self.batch_tokens = batch_tokens
        self.padding_side = getattr(self.tokenizer, "padding_side", "right")
        self._image_processor: ImageProcessor | None = None

    def tokenize(self, texts: Sequence[str], role: Role, task: str | None = None) -> list[np.ndarray]:
        return self.tokenizer(texts, role, task)

    def embed_ids(self, ids: Sequence[np.ndarray], task: str | None = None,
                  on_batch: Callable[[int], None] | None = None) -> np.ndarray:
        """Token ids -> [N, dim] float32 L2-normalized, in input order. `on_batch(rows)` after each forward."""
        out = np.empty((len(ids), self.info.dim), dtype=np.float32)
        lengths = [len(x) for x in ids]
        for idx in token_budget_batches(lengths, self.batch_tokens):
            input_ids, mask = pad_batch([ids[i] for i in idx], self.tokenizer.pad_token_id, self.padding_side)
            pooled = self.encoder.forward_pooled(torch.from_numpy(input_ids), torch.from_numpy(mask), task)
            out[idx] = pooled.float().cpu().numpy()
            if on_batch is not None:
                on_batch(len(idx))
        return l2_normalize(out)

    def encode(self, texts: Sequence[str], role: Role = "document", task: str | None = None) -> np.ndarray:
        return self.embed_ids(self.tokenize(texts, role, task), task)

    @property
    def token_dim(self) -> int:
        return self.info.token_dim or self.info.dim

    def embed_multi(self, ids: Sequence[np.ndarray], task: str | None = None,
                    on_batch: Callable[[int], None] | None = None) -> tuple[np.ndarray, list[np.ndarray]]:
        """Multi-vector families: token ids -> ([N, dim] unit single vectors, per row the kept [n_i, d]
        unit token vectors), in input order. The single vector is the model's own (e.g. v4's mean-pooled
        hidden state) or, where it has none, the normalized mean of the token vectors."""
        single = np.zeros((len(ids), self.info.dim), np.float32)
        out: list[np.ndarray] = [np.zeros((0, self.token_dim), np.float32)] * len(ids)
        for idx in token_budget_batches([len(x) for x in ids], self.batch_tokens):
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
                     on_batch: Callable[[int], None] | None = None) -> tuple[np.ndarray, list[np.ndarray] | None]:
        """Prepared [H, W, 3] uint8 images -> ([N, dim] unit vectors, per image [n_i, d] token vectors
        when `tokens`), batched by the encoder's sequence length per image within the token budget."""
        single = np.zeros((len(pixels), self.info.dim), np.float32)
        per_image: list[np.ndarray] | None = [np.zeros((0, self.token_dim), np.float32)] * len(pixels) \
            if tokens else None
        lengths = [self.image_processor.sequence_length(p.shape[0], p.shape[1]) for p in pixels]
        for idx in token_budget_batches(lengths, self.batch_tokens):
            pooled, toks = self.encoder.forward_images([pixels[i] for i in idx], task, tokens=tokens)
            single[idx] = pooled.float().cpu().numpy()
            if per_image is not None and toks is not None:
                for i, t in zip(idx, toks):
                    per_image[i] = t.float().cpu().numpy()
            if on_batch is not None:
                on_batch(len(idx))
        return l2_normalize(single), per_image

    def prepare_images(self, images: Sequence[Any]) -> list[np.ndarray]:
        """PIL images, encoded bytes or local paths -> the model's prepared uint8 pixels."""
        from ..embed.image_inputs import open_image

        return [self.image_processor(open_image(x)) for x in images]

    def encode_images(self, images: Sequence[Any], task: str | None = None) -> np.ndarray:
        return self.embed_images(self.prepare_images(images), task)[0]

    def encode_image_tokens(self, images: Sequence[Any], task: str | None = None) -> list[np.ndarray]:
        return self.embed_images(self.prepare_images(images), task, tokens=True)[1] or []
