"""The embed stage's actor: one model per actor, embedding tokenized batches in the configured output mode.

The actor resolves the checkpoint inside the worker (`checkpoints.model_spec`), so a model in object
storage is fetched once per node into the local cache, and the driver ships only the config.

Output modes (`OutputsConfig.mode`):
- document:    one pooled vector per document;
- naive:       documents split into chunks in the tokenize stage, each chunk embedded alone;
- late:        each document through the model once, one vector per chunk span (late chunking);
- multivector: per-token vectors per document (ColBERT style) plus their normalized mean.

Failures are handled in the actor, per row: a forward out of device memory is split (at most half its padded
tokens, down to one row; the lower budget is remembered: `models.embedder.split_on_oom`, `TokenBudget`), a
row that alone does not fit becomes a `too_large_for_device` reject, and a row with any non-finite vector a
`non_finite` reject (a chunked document is rejected whole, as one row), so the build goes on and rows in =
indexed + rejected still holds.
"""

from __future__ import annotations

import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ..checkpoints import model_spec
from ..config import ModelConfig, OutputsConfig
from ..index.shards import CONTENT_COLUMN, DTYPE_COLUMN, EMBED_SECONDS_COLUMN
from ..models import load_family
from ..models.dtype_probe import choose_cpu_dtype
from ..models.embedder import Embedder, Rejects, error_line, free_device_memory, is_device_oom
from ..models.late_chunking import pool_spans, token_states, window_starts, windows_per_forward
from ..sources.normalize import Reasons, with_rejects
from ..text.batching import pad_batch
from ..ray_runtime import ComputeThread
from .columns import (TOKEN_VECTORS_COLUMN, VECTOR_COLUMN, lists_of, token_vectors_to_arrow, vectors_to_arrow,
                      with_chunk_columns)
from .faults import Faults, FaultyEncoder
from .image_inputs import PIXEL_COLUMNS, pixels_of
from .progress import ProgressSink


class EmbedActor:
    """One model per actor; embeds each batch with token-budget sub-batches in the configured mode.

    The model is loaded, warmed up and run on one compute thread the actor owns (`ComputeThread`)."""

    def __init__(self, model_json: str, outputs_json: str, task: str | None, batch_tokens: int,
                 torch_threads: int | None = None, progress: str | None = None, window: int | None = None,
                 window_overlap: int = 0):
        self._compute = ComputeThread()
        self._compute.setup(self._setup, model_json, outputs_json, task, batch_tokens, torch_threads,
                          progress, window, window_overlap)

    def _setup(self, model_json: str, outputs_json: str, task: str | None, batch_tokens: int,
               torch_threads: int | None, progress: str | None, window: int | None, window_overlap: int) -> None:
        import torch

        if torch_threads:
            torch.set_num_threads(torch_threads)
        cfg = ModelConfig.model_validate_json(model_json)
        family = load_family(model_spec(cfg))
        self.embedder = Embedder(family, batch_tokens=batch_tokens)
        self.outputs = OutputsConfig.model_validate_json(outputs_json)
        self.mode = self.outputs.mode
        self.dtype_choice = None
        if cfg.dtype == "auto" and self.embedder.encoder.device.type == "cpu":  # bf16 where it runs like fp32
            self.dtype_choice = choose_cpu_dtype(self.embedder, task, multivector=self.mode == "multivector")
        self.task = task
        self.role = cfg.role  # what the tokenize stage tokenized the rows as
        self.dim = self.embedder.info.dim
        self.dtype = f"{self.embedder.dtype_name} ({self.embedder.encoder.device.type})"  # what `auto` became
        self.window = window or self.embedder.info.max_length
        self.window_overlap = window_overlap
        self.busy_s = 0.0
        self.rows = 0
        self.progress = ProgressSink(progress) if progress else None
        # first-call costs (kernel selection, allocator growth, CUDA context) now, while the first
        # fragment is still being read and tokenized, not inside the first fragment's call
        warm = ["warm-up " * 16] * 8
        if self.mode == "multivector":
            self.embedder.encode_tokens(warm, task=task)
        else:
            self.embedder.encode(warm, task=task)
        self.faulty = self._inject_faults(Faults.from_env())

    def _inject_faults(self, faults: Faults | None) -> FaultyEncoder | None:
        """Test-only fault injection from the environment (`embed/faults.py`); None when off."""
        if faults is None:
            return None
        emb = self.embedder

        def image_tokens(p: np.ndarray) -> int:
            return emb.image_processor.sequence_length(p.shape[0], p.shape[1])

        emb.encoder = FaultyEncoder(emb.encoder, faults, image_tokens)  # type: ignore[assignment]
        return emb.encoder  # type: ignore[return-value]

    def __call__(self, batch: pa.Table) -> pa.Table:
        return self._compute.run(self._embed_batch, batch)

    def _embed_batch(self, batch: pa.Table) -> pa.Table:
        start = time.perf_counter()
        if self.progress is not None:
            self.progress.started()
        if self.faulty is not None:
            self.faulty.watch(batch)
        rejected = pc.is_valid(batch.column("reject")).to_numpy(zero_copy_only=False)
        is_image = pc.fill_null(pc.is_valid(batch.column("pixels")), False).to_numpy(zero_copy_only=False) \
            & ~rejected
        texts, images = np.flatnonzero(~rejected & ~is_image), np.flatnonzero(is_image)
        if self.mode == "late":
            out = self._late(batch, texts, images)
        elif self.mode == "multivector":
            out = self._multivector(batch, texts, images, rejected)
        else:
            out = self._single(batch, texts, images, rejected)
        out = out.append_column(DTYPE_COLUMN, pa.array([self.dtype] * out.num_rows, pa.string()))
        busy = time.perf_counter() - start
        out = out.append_column(EMBED_SECONDS_COLUMN, pa.array([busy] * out.num_rows, pa.float64()))
        self.busy_s += busy
        self.rows += int(texts.size + images.size)
        if self.mode not in ("document", "naive"):  # other modes report once per fragment
            self._report(int(texts.size + images.size))
        self._flush()
        return out

    def _single(self, batch: pa.Table, texts: np.ndarray, images: np.ndarray, rejected: np.ndarray) -> pa.Table:
        """Document and naive modes: one vector per row."""
        vectors = np.zeros((batch.num_rows, self.dim), dtype=np.float32)
        rejects: Rejects = {}
        if texts.size:
            local: Rejects = {}
            vectors[texts] = self.embedder.embed_ids(lists_of(batch.column("input_ids"), texts), self.task,
                                                     on_batch=self._report, rejects=local, role=self.role)
            _add_rejects(rejects, local, texts)
        if images.size:
            vectors[images] = self._images(batch, images, rejects)[0]
        if rejects and self.mode == "naive":
            keep, rejects = _whole_documents(batch, rejected, rejects)
            batch, vectors, rejected = batch.take(pa.array(keep, pa.int64())), vectors[keep], rejected[keep]
        valid = ~rejected
        valid[list(rejects)] = False
        out = _drop_inputs(with_rejects(batch, rejects))
        return out.append_column(VECTOR_COLUMN, vectors_to_arrow(vectors, valid))

    def _images(self, batch: pa.Table, rows: np.ndarray, rejects: Rejects, tokens: bool = False):
        """Embed the image rows; rows it cannot embed go to `rejects` (by batch row)."""
        report = self._report if self.mode in ("document", "naive") else None
        local: Rejects = {}
        out = self.embedder.embed_images(pixels_of(batch, rows), self.task, tokens=tokens, on_batch=report,
                                         rejects=local)
        _add_rejects(rejects, local, rows)
        return out

    def _report(self, rows: int) -> None:
        if self.progress is not None:
            self.progress.add(rows)

    def _flush(self) -> None:
        if self.progress is not None:
            self.progress.flush()

    # -- late chunking -------------------------------------------------------------------------
    def _late(self, batch: pa.Table, todo: np.ndarray, images: np.ndarray) -> pa.Table:
        """Text documents: one vector per chunk span; images: one vector, no chunk. A document that does
        not fit the device or has a non-finite chunk vector is one reject row."""
        ids = lists_of(batch.column("input_ids"), np.arange(batch.num_rows))
        chars = lists_of(batch.column("chunk_chars"), np.arange(batch.num_rows))
        toks = lists_of(batch.column("chunk_tokens"), np.arange(batch.num_rows))
        spans = {int(i): [tuple(int(x) for x in s) for s in toks[i].reshape(-1, 2) if s[1] > s[0]] for i in todo}
        rejects: Rejects = {}
        per_doc: dict[int, np.ndarray] = {}
        short = [int(i) for i in todo if len(ids[i]) <= self.window]
        for i in todo:
            if len(ids[i]) > self.window:
                vecs = self._late_long(ids[i], spans[int(i)], int(i), rejects)
                if vecs is not None:
                    per_doc[int(i)] = vecs
        self._late_short(ids, short, spans, per_doc, rejects)
        for i in list(per_doc):
            if not self.embedder.check_finite(rejects, i, per_doc[i].reshape(-1)):
                del per_doc[i]
        whole = {}
        if images.size:
            vecs = self._images(batch, images, rejects)[0]
            whole = {i: v for i, v in zip(images.tolist(), vecs) if i not in rejects}
        batch = with_rejects(batch, rejects)
        take, chunk, start, end, vecs = [], [], [], [], []
        for i in range(batch.num_rows):
            if i not in per_doc:  # a reject (no vector) or an image (one vector): one row, no chunk
                take.append(i), chunk.append(None), start.append(None), end.append(None)
                vecs.append(whole.get(i))
                continue
            for k, ((s, e), v) in enumerate(zip(chars[i].reshape(-1, 2), per_doc[i])):
                take.append(i), chunk.append(k), start.append(int(s)), end.append(int(e)), vecs.append(v)
        out = _drop_inputs(batch.take(pa.array(take, pa.int64())))
        out = with_chunk_columns(out, chunk, start, end)
        if CONTENT_COLUMN in out.column_names:  # each chunk row keeps its own span of the document
            text = out.column(CONTENT_COLUMN).to_pylist()
            spans_ = [t if s is None or t is None else t[s:e] for t, s, e in zip(text, start, end)]
            out = out.set_column(out.schema.get_field_index(CONTENT_COLUMN), CONTENT_COLUMN,
                                 pa.array(spans_, pa.string()))
        valid = np.array([v is not None for v in vecs], dtype=bool)
        matrix = np.zeros((len(vecs), self.dim), dtype=np.float32)
        if valid.any():
            matrix[valid] = np.stack([v for v in vecs if v is not None])
        return out.append_column(VECTOR_COLUMN, vectors_to_arrow(matrix, valid))

    def _late_short(self, ids: list[np.ndarray], short: list[int], spans: dict[int, list[tuple[int, int]]],
                    per_doc: dict[int, np.ndarray], rejects: Rejects) -> None:
        """Documents within the window: token-budget batches, halved on device OOM."""
        import torch

        tok = self.embedder.tokenizer

        def forward(idx: np.ndarray) -> None:
            rows = [short[j] for j in idx]
            input_ids, mask = pad_batch([ids[r] for r in rows], tok.pad_token_id, self.embedder.padding_side)
            states = self.embedder.encoder.forward_token_states(torch.from_numpy(input_ids),
                                                                torch.from_numpy(mask), self.task).float()
            for b, r in enumerate(rows):
                per_doc[r] = pool_spans(states[b], spans[r])

        local: Rejects = {}
        self.embedder.run_batches([len(ids[i]) for i in short], forward, local, None,
                                  lambda j: f"{len(ids[short[j]])} tokens")
        _add_rejects(rejects, local, np.asarray(short, dtype=np.int64))

    def _late_long(self, ids: np.ndarray, spans: list[tuple[int, int]], row: int,
                   rejects: Rejects) -> np.ndarray | None:
        """A document over the window: its macro windows, as many per forward as the token budget holds (the
        embedder's, lowered to at most half after each device OOM and remembered); None (and a reject) when a
        single window does not fit."""
        n_windows = len(window_starts(len(ids), self.window, self.window_overlap))
        budget = self.embedder.budget
        max_windows = windows_per_forward(budget.tokens, self.window, n_windows)
        while True:
            try:
                states = token_states(self.embedder.encoder, ids, self.task, self.window, self.window_overlap,
                                      max_windows)
                budget.fitted()
                return pool_spans(states, spans)
            except Exception as e:  # noqa: BLE001 - only OOM is handled
                if not is_device_oom(e):
                    raise
                error = error_line(e)
            free_device_memory()
            if max_windows == 1:
                what = f"{len(ids)} tokens in windows of {self.window}"
                rejects[row] = (Reasons.TOO_LARGE_FOR_DEVICE, self.embedder.device_detail(what, error))
                return None
            budget.failed(max_windows * self.window)  # at most half: at most max_windows // 2 windows
            max_windows = windows_per_forward(budget.tokens, self.window, n_windows)

    # -- multi-vector --------------------------------------------------------------------------
    def _multivector(self, batch: pa.Table, texts: np.ndarray, images: np.ndarray, rejected: np.ndarray) -> pa.Table:
        single = np.zeros((batch.num_rows, self.dim), dtype=np.float32)
        per_row: list[np.ndarray | None] = [None] * batch.num_rows
        rejects: Rejects = {}
        if texts.size:
            local: Rejects = {}
            vecs, toks = self.embedder.embed_multi(lists_of(batch.column("input_ids"), texts), self.task,
                                                   rejects=local)
            _add_rejects(rejects, local, texts)
            single[texts] = vecs
            for i, t in zip(texts, toks):
                per_row[i] = t
        if images.size:
            vecs, toks = self._images(batch, images, rejects, tokens=True)
            single[images] = vecs
            for i, t in zip(images, toks or []):
                per_row[i] = t
        valid = ~rejected
        for i in rejects:
            valid[i], per_row[i] = False, None
        out = _drop_inputs(with_rejects(batch, rejects)).append_column(VECTOR_COLUMN, vectors_to_arrow(single, valid))
        return out.append_column(TOKEN_VECTORS_COLUMN, token_vectors_to_arrow(per_row, self.embedder.token_dim))


def _add_rejects(into: Rejects, local: Rejects, rows: np.ndarray) -> None:
    """Rejects keyed by position in `rows` -> keyed by batch row."""
    for j, value in local.items():
        into[int(rows[j])] = value


def _whole_documents(batch: pa.Table, rejected: np.ndarray, rejects: Rejects) -> tuple[list[int], Rejects]:
    """Naive chunking: a document with a rejected chunk is rejected whole, as one row (its first), so rows
    in = documents + rejects still holds. Returns (rows to keep, rejects keyed by kept position)."""
    ids = batch.column("id").to_pylist()
    failed: dict[str, tuple[str, str]] = {}
    for i in sorted(rejects):
        failed.setdefault(ids[i], rejects[i])
    keep: list[int] = []
    out: Rejects = {}
    done: set[str] = set()
    for i, doc in enumerate(ids):
        if rejected[i] or doc not in failed:
            keep.append(i)
        elif doc not in done:
            done.add(doc)
            out[len(keep)] = failed[doc]
            keep.append(i)
    return keep, out


def _drop_inputs(batch: pa.Table) -> pa.Table:
    """The row without its model inputs (token ids, chunk spans, prepared pixels)."""
    inputs = {"input_ids", "chunk_chars", "chunk_tokens", *PIXEL_COLUMNS}
    return batch.drop_columns([c for c in batch.column_names if c in inputs])
