"""The tokenize stage's work (Ray CPU tasks): token ids of text documents, chunk rows (naive chunking) or
chunk spans (late chunking), and the prepared pixels of image rows.

The model's tokenizer and image processor are loaded inside the worker (`checkpoints.model_spec`), so a
model in object storage is fetched once per node into the local cache, and the driver ships only the config.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ..checkpoints import model_spec
from ..config import ModelConfig, OutputsConfig
from ..index.shards import CONTENT_COLUMN, CONTENT_IMAGE_COLUMN
from ..models import load_family
from ..models.base import ImageProcessor, ModelFamily, Role, TextTokenizer
from ..text.chunking import ChunkSpec, chunk_spans, token_spans
from .columns import list_array, with_chunk_columns
from .image_inputs import prepare_image_rows


@lru_cache(maxsize=4)
def _family(model_json: str) -> ModelFamily:
    return load_family(model_spec(ModelConfig.model_validate_json(model_json)))


@lru_cache(maxsize=4)
def _tokenizer(model_json: str) -> TextTokenizer:
    return _family(model_json).load_tokenizer()


@lru_cache(maxsize=4)
def _image_processor(model_json: str) -> ImageProcessor | None:
    family = _family(model_json)
    return family.load_image_processor() if "image" in family.info().modalities else None


def _text_rows(batch: pa.Table) -> list[bool]:
    """Rows whose text is embedded: documents (not rejects) that are not images."""
    ok = pc.and_(pc.is_null(batch.column("reject")), pc.equal(batch.column("modality"), "text"))
    return pc.fill_null(ok, False).to_pylist()


def _chunk_spec(c: Any) -> ChunkSpec:
    return ChunkSpec(chunker=c.chunker, chunk_size=c.chunk_size, n_sentences=c.n_sentences, overlap=c.overlap)


def _explode_chunks(batch: pa.Table, tok: TextTokenizer, spec: ChunkSpec, role: Role, task: str | None) -> pa.Table:
    """Naive chunking: one row per chunk, its text the chunk's characters; rejects stay one row."""
    texts = batch.column("text").to_pylist()
    take, chunk, start, end, chunk_texts = [], [], [], [], []
    for i, (text, is_text) in enumerate(zip(texts, _text_rows(batch))):
        if not is_text:  # rejects and images stay one row
            take.append(i), chunk.append(None), start.append(None), end.append(None), chunk_texts.append(None)
            continue
        offsets = tok.encode_with_offsets(text, role, task, truncate=False).offsets if spec.chunker == "tokens" \
            else None
        for k, (s, e) in enumerate(chunk_spans(text, spec, offsets) or [(0, len(text))]):
            take.append(i), chunk.append(k), start.append(s), end.append(e), chunk_texts.append(text[s:e])
    out = batch.take(pa.array(take, pa.int64())).drop_columns(["text"])
    out = out.append_column("text", pa.array(chunk_texts, pa.string()))
    return with_chunk_columns(out, chunk, start, end)


def tokenize_batch(batch: pa.Table, model_json: str, outputs_json: str, role: Role, task: str | None,
                   max_length: int, max_image_pixels: int = 64_000_000, store_content: bool = False) -> pa.Table:
    """Add `input_ids` (list<int32>) to text documents (rejects and images get an empty list), chunk
    columns, and the prepared pixels of image rows (`image_inputs.prepare_image_rows`).
    Late chunking also adds `chunk_chars` / `chunk_tokens` (flattened [start, end] pairs).
    `store_content` keeps each row's text (`content`; a chunk row's own span) and encoded image
    (`content_image`) for the shards, so rerankers can read candidates from the index."""
    tok = _tokenizer(model_json)
    encoded = batch.column("image") if store_content else None
    batch = prepare_image_rows(batch, _image_processor(model_json), _family(model_json).name, max_image_pixels)
    if encoded is not None:
        batch = batch.append_column(CONTENT_IMAGE_COLUMN, encoded)
    outputs = OutputsConfig.model_validate_json(outputs_json)
    mode = outputs.mode
    if mode == "naive":
        batch = _explode_chunks(batch, tok, _chunk_spec(outputs.chunking), role, task)
    elif mode != "late":
        batch = with_chunk_columns(batch)
    if store_content:
        batch = batch.append_column(CONTENT_COLUMN, batch.column("text"))
    texts = batch.column("text").to_pylist()
    todo = [i for i, ok in enumerate(_text_rows(batch)) if ok]
    empty = np.zeros(0, dtype=np.int32)
    ids: list[np.ndarray] = [empty] * batch.num_rows
    if mode != "late":
        if todo:
            for i, arr in zip(todo, tok([texts[i] for i in todo], role, task)):
                ids[i] = arr
        return batch.drop_columns(["text"]).append_column("input_ids", list_array(ids))

    lc = outputs.late_chunking
    spec = _chunk_spec(lc)
    chars: list[np.ndarray] = [empty] * batch.num_rows
    tokens: list[np.ndarray] = [empty] * batch.num_rows
    for i in todo:
        enc = tok.encode_with_offsets(texts[i], role, task, truncate=False)
        n = min(len(enc.ids), lc.max_doc_tokens)
        offsets = enc.offsets[:n]
        spans = chunk_spans(texts[i], spec, offsets) or [(0, len(texts[i]))]
        tspans = token_spans(offsets, spans)
        keep = [k for k, (s, e) in enumerate(tspans) if e > s]
        ids[i] = enc.ids[:n]
        chars[i] = np.asarray([spans[k] for k in keep], dtype=np.int32).reshape(-1)
        tokens[i] = np.asarray([tspans[k] for k in keep], dtype=np.int32).reshape(-1)
    out = batch.drop_columns(["text"]).append_column("input_ids", list_array(ids))
    return out.append_column("chunk_chars", list_array(chars)).append_column("chunk_tokens", list_array(tokens))
