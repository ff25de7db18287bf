"""Tombstones: row ordinals of a version that search must not return (deleted or replaced documents)."""

from __future__ import annotations

import numpy as np

from ..storage import Storage
from .manifest import Manifest
from .shards import read_table


def read_tombstones(store: Storage, manifest: Manifest) -> np.ndarray:
    """Sorted tombstoned ordinals of a version (empty when it has none)."""
    entry = manifest.tombstones or {}
    if not entry.get("path"):
        return np.zeros(0, dtype=np.int64)
    col = read_table(store, entry["path"], columns=["ordinal"]).column("ordinal")
    return np.sort(col.to_numpy().astype(np.int64, copy=False))


def tombstone_mask(ordinals: np.ndarray, tombstones: np.ndarray) -> np.ndarray:
    """True where an ordinal is tombstoned (`tombstones` sorted)."""
    if tombstones.size == 0:
        return np.zeros(np.shape(ordinals), dtype=bool)
    pos = np.clip(np.searchsorted(tombstones, ordinals), 0, len(tombstones) - 1)
    return tombstones[pos] == ordinals
