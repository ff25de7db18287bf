"""Late chunking: run the whole document through the model once, then mean-pool each chunk's token span.

Documents longer than the model window go through "long late chunking": macro windows over the raw
token ids (no special tokens added) that overlap by `overlap` tokens; from every window after the
first the first `overlap` outputs are dropped, so exactly one token vector per input token remains.
Windows go through the model `batch_tokens // window` at a time (`windows_per_forward`), the same token
budget as every other forward.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from .base import TextEncoder


def window_starts(n: int, window: int, overlap: int) -> list[int]:
    if not 0 <= overlap < window:
        raise ValueError(f"late chunking needs 0 <= window_overlap < window (got {overlap}, {window})")
    if n <= window:
        return [0]
    step = window - overlap
    return list(range(0, max(n - overlap, 1), step))


def windows_per_forward(batch_tokens: int, window: int, n_windows: int | None = None) -> int:
    """Macro windows in one forward within the token budget: `batch_tokens // window`, at least 1 (and at
    most `n_windows`, the document's windows, when given)."""
    fit = max(1, batch_tokens // window)
    return fit if n_windows is None else max(1, min(fit, n_windows))


def token_states(encoder: TextEncoder, ids: np.ndarray, task: str | None, window: int, overlap: int,
                 max_windows: int = 8) -> torch.Tensor:
    """[n] ids -> [n, H] fp32 token states, windowed when n > window (up to `max_windows` per forward;
    see `windows_per_forward`)."""
    n = len(ids)
    starts = window_starts(n, window, overlap)
    if len(starts) == 1:
        t = torch.from_numpy(np.asarray(ids, dtype=np.int64))[None]
        return encoder.forward_token_states(t, torch.ones_like(t), task)[0].float()
    parts = []
    for g in range(0, len(starts), max_windows):
        group = starts[g : g + max_windows]
        batch = torch.zeros((len(group), min(window, n)), dtype=torch.long)
        mask = torch.zeros_like(batch)
        for row, s in enumerate(group):
            piece = torch.from_numpy(np.asarray(ids[s : s + window], dtype=np.int64))
            batch[row, : len(piece)] = piece
            mask[row, : len(piece)] = 1
        states = encoder.forward_token_states(batch, mask, task).float()
        for row, s in enumerate(group):
            skip = 0 if s == 0 else overlap
            parts.append(states[row, skip : int(mask[row].sum())])
    out = torch.cat(parts)[:n]
    assert out.shape[0] == n, (out.shape, n)
    return out


def pool_spans(states: torch.Tensor, spans: Sequence[tuple[int, int]]) -> np.ndarray:
    """Plain mean of the token states over each [start, end) span, L2-normalized; [n_spans, H] fp32."""
    vecs = torch.stack([states[s:e].mean(0) for s, e in spans])
    vecs = torch.nn.functional.normalize(vecs, p=2, dim=-1)
    return vecs.cpu().numpy().astype(np.float32)


def late_chunk(encoder: TextEncoder, ids: np.ndarray, spans: Sequence[tuple[int, int]], task: str | None,
               window: int, overlap: int, batch_tokens: int = 16384) -> np.ndarray:
    """One normalized vector per non-empty span of one document; windows per forward within `batch_tokens`."""
    states = token_states(encoder, ids, task, window, overlap, windows_per_forward(batch_tokens, window))
    return pool_spans(states, [sp for sp in spans if sp[1] > sp[0]])
