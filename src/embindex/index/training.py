"""Train one tier's empty index on a sample (once per tier), on a GPU when faiss-gpu sees one."""

from __future__ import annotations

import logging

from .faiss_lib import faiss
import numpy as np

from .factories import ivf_of, make_index

log = logging.getLogger(__name__)


def gpu_count() -> int:
    """GPUs visible to FAISS (0 with faiss-cpu)."""
    get = getattr(faiss, "get_num_gpus", None)
    try:
        return int(get()) if get is not None else 0
    except Exception:  # pragma: no cover - broken CUDA setups
        return 0


def _train_on_gpu(index: faiss.Index, x: np.ndarray) -> faiss.Index:
    """Train a copy on all GPUs and bring the trained index back; falls back to CPU on any error."""
    try:  # pragma: no cover - needs faiss-gpu and a device
        gpu_index = faiss.index_cpu_to_all_gpus(index)
        gpu_index.train(x)
        return faiss.index_gpu_to_cpu(gpu_index)
    except Exception as e:  # pragma: no cover
        log.warning("GPU training failed (%s); training on CPU", e)
        index.train(x)
        return index


def train_index(factory: str, dim: int, sample: np.ndarray, use_gpu: bool | None = None) -> faiss.Index:
    """An empty index of `factory` trained on `sample` ([m, dim] float32, already truncated and normalized).

    Indexes that need no training (Flat, HNSW, binary) come back untrained-as-is. IVF indexes train on
    the GPU(s) when faiss-gpu sees one (or `use_gpu`); the result is always a CPU index."""
    index = make_index(factory, dim)
    if index.is_trained:
        return index
    if len(sample) == 0:
        raise ValueError(f"tier {dim} ({factory}) needs training but the sample is empty")
    x = np.ascontiguousarray(sample, dtype=np.float32)
    gpu = gpu_count() > 0 if use_gpu is None else use_gpu
    if gpu and ivf_of(index) is not None:
        index = _train_on_gpu(index, x)
    else:
        index.train(x)
    return index
