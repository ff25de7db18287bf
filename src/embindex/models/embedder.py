"""In-process embedding: token ids -> normalized vectors with token-budget batches.

Used inside the Ray embed actors, by search (query encoding), notebooks and benchmarks, so every
caller shares one code path for padding, pooling and normalization.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch

from ..text.batching import pad_batch, token_budget_batches
from .base import ModelFamily, ModelInfo, Role, TextEncoder, TextTokenizer


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

    def embed_tokens(self, ids: Sequence[np.ndarray], task: str | None = None) -> list[np.ndarray]:
        """Multi-vector families: token ids -> per row the kept [n_i, d] unit token vectors, in input order."""
        out: list[np.ndarray] = [np.zeros((0, self.info.dim), np.float32)] * len(ids)
        for idx in token_budget_batches([len(x) for x in ids], self.batch_tokens):
            input_ids, mask = pad_batch([ids[i] for i in idx], self.tokenizer.pad_token_id, self.padding_side)
            vecs, keep = self.encoder.forward_tokens(torch.from_numpy(input_ids), torch.from_numpy(mask), task)
            vecs, keep = vecs.float().cpu().numpy(), keep.cpu().numpy()
            for b, i in enumerate(idx):
                out[i] = vecs[b][keep[b]]
        return out

    def encode_tokens(self, texts: Sequence[str], role: Role = "document", task: str | None = None) -> list[np.ndarray]:
        return self.embed_tokens(self.tokenize(texts, role, task), task)
