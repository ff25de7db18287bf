"""Poolers: per-token hidden states and the attention mask -> one fp32 vector per row."""

from __future__ import annotations

import torch


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
