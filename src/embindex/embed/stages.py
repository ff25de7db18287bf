"""The Ray Data stages where models meet workers: tokenization (CPU tasks) and the embed actor.

Both resolve the checkpoint inside the worker (`checkpoints.model_spec`), so a model in object
storage is fetched once per node into the local cache, and the driver ships only the config.
"""

from __future__ import annotations

import os
import time
from functools import lru_cache
from typing import Any

import numpy as np
import pyarrow as pa

from ..checkpoints import model_spec
from ..config import ModelConfig
from ..models import load_family
from ..models.base import Role, TextTokenizer
from ..models.embedder import Embedder

VECTOR_COLUMN = "vector"


@lru_cache(maxsize=4)
def _tokenizer(model_json: str) -> TextTokenizer:
    cfg = ModelConfig.model_validate_json(model_json)
    return load_family(model_spec(cfg)).load_tokenizer()


def tokenize_batch(batch: pa.Table, model_json: str, role: Role, task: str | None) -> pa.Table:
    """Add `input_ids` (list<int32>) for documents; rejects get an empty list."""
    tok = _tokenizer(model_json)
    texts = batch.column("text").to_pylist()
    rejected = batch.column("reject").to_pylist()
    todo = [i for i, r in enumerate(rejected) if r is None]
    ids: list[Any] = [np.zeros(0, dtype=np.int32)] * batch.num_rows
    if todo:
        for i, arr in zip(todo, tok([texts[i] for i in todo], role, task)):
            ids[i] = arr
    lengths = np.fromiter((len(x) for x in ids), dtype=np.int64, count=len(ids))
    offsets = np.zeros(len(ids) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    flat = np.concatenate(ids).astype(np.int32) if len(ids) else np.zeros(0, dtype=np.int32)
    input_ids = pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat))
    return batch.drop_columns(["text"]).append_column("input_ids", input_ids)


def vectors_to_arrow(vectors: np.ndarray, valid: np.ndarray | None = None) -> pa.FixedSizeListArray:
    """[N, d] float -> fixed_size_list<float16>[d]; rows where `valid` is False are null."""
    n, d = vectors.shape
    values = pa.array(np.ascontiguousarray(vectors, dtype=np.float16).reshape(-1))
    mask = None if valid is None else pa.array(~valid)
    return pa.FixedSizeListArray.from_arrays(values, d, mask=mask)


class EmbedActor:
    """One model per actor; embeds the documents of each batch with token-budget sub-batches."""

    def __init__(self, model_json: str, task: str | None, batch_tokens: int, torch_threads: int | None = None,
                 progress: Any = None):
        import torch

        if torch_threads:
            torch.set_num_threads(torch_threads)
        cfg = ModelConfig.model_validate_json(model_json)
        family = load_family(model_spec(cfg))
        self.embedder = Embedder(family, batch_tokens=batch_tokens)
        self.task = task
        self.dim = self.embedder.info.dim
        self.busy_s = 0.0
        self.rows = 0
        self.progress = progress

    def __call__(self, batch: pa.Table) -> pa.Table:
        start = time.perf_counter()
        rejected = np.array([r is not None for r in batch.column("reject").to_pylist()], dtype=bool)
        vectors = np.zeros((batch.num_rows, self.dim), dtype=np.float32)
        todo = np.flatnonzero(~rejected)
        if todo.size:
            col = batch.column("input_ids").combine_chunks()
            offsets, values = col.offsets.to_numpy(), col.values.to_numpy()
            ids = [values[offsets[i] : offsets[i + 1]] for i in todo]
            vectors[todo] = self.embedder.embed_ids(ids, self.task)
        out = batch.drop_columns(["input_ids"]).append_column(VECTOR_COLUMN, vectors_to_arrow(vectors, ~rejected))
        self.busy_s += time.perf_counter() - start
        self.rows += int(todo.size)
        if self.progress is not None and todo.size:
            self.progress.add.remote(int(todo.size))
        return out


def default_torch_threads(cpus_per_actor: float | None) -> int:
    if cpus_per_actor:
        return max(1, int(cpus_per_actor))
    return max(1, os.cpu_count() or 1)
