"""Token-budget batching: sort by length, cut batches whose padded size fits a token budget."""

from __future__ import annotations

from typing import Callable, Iterator, Sequence

import numpy as np


def token_budget_batches(lengths: Sequence[int], batch_tokens: int | Callable[[], int],
                         max_rows: int = 4096) -> Iterator[np.ndarray]:
    """Yield index arrays, longest first; each batch's rows x longest row <= batch_tokens (a callable is
    read again for every batch: a budget that changes while the batches run).

    A row longer than the budget forms a batch of its own (it still has to be embedded).
    """
    budget = batch_tokens if callable(batch_tokens) else (lambda: batch_tokens)
    lengths = np.asarray(lengths, dtype=np.int64)
    if lengths.size == 0:
        return
    order = np.argsort(-lengths, kind="stable")
    start = 0
    n = len(order)
    while start < n:
        longest = max(int(lengths[order[start]]), 1)
        rows = max(1, min(budget() // longest, max_rows))
        yield order[start : start + rows]
        start += rows


def pad_batch(ids: Sequence[np.ndarray], pad_id: int, side: str = "right") -> tuple[np.ndarray, np.ndarray]:
    """Pad token id arrays to [B, L] int64 ids and mask."""
    longest = max((len(x) for x in ids), default=0)
    out = np.full((len(ids), longest), pad_id, dtype=np.int64)
    mask = np.zeros((len(ids), longest), dtype=np.int64)
    for i, x in enumerate(ids):
        n = len(x)
        if side == "right":
            out[i, :n] = x
            mask[i, :n] = 1
        else:
            out[i, longest - n :] = x
            mask[i, longest - n :] = 1
    return out, mask
