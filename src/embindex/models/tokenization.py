"""Tokenizer helpers shared by families: character offsets of tokens, batched ids from a
`tokenizers.Tokenizer`, and `PrefixTokenizer` (a role/task prefix before the text)."""

from __future__ import annotations

from abc import abstractmethod
from typing import Any, Sequence

import numpy as np

from .base import Role, TextTokenizer, TokenizedText


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
