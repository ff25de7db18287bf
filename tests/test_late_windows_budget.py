"""Long late chunking puts as many macro windows into one forward as the token budget holds
(`resources.batch_tokens // window`, at least 1), and still halves that number on device OOM."""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import pytest
import torch

from conftest import sample_docs
from embindex.config import ModelConfig, OutputsConfig
from embindex.embed.actor import EmbedActor
from embindex.embed.tokenize import tokenize_batch
from embindex.models import ModelSpec, load_family
from embindex.models.late_chunking import late_chunk, window_starts, windows_per_forward
from embindex.sources.normalize import RowRules, normalize_record, to_table

MINILM = ModelConfig(path="builtin:all-MiniLM-L6-v2", dtype="float32", max_length=128)
LATE = OutputsConfig(late_chunking={"chunker": "sentences", "n_sentences": 2})
WINDOW, OVERLAP = 64, 8


class Recording:
    """Wraps a TextEncoder: records the [rows, tokens] shape of every `forward_token_states` call and raises
    a device OOM for batches over `oom_above` tokens."""

    def __init__(self, inner: Any, oom_above: int | None = None):
        self.inner, self.oom_above, self.shapes = inner, oom_above, []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def forward_token_states(self, input_ids: torch.Tensor, mask: torch.Tensor, task: str | None = None):
        self.shapes.append(tuple(input_ids.shape))
        if self.oom_above is not None and input_ids.numel() > self.oom_above:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.00 GiB")
        return self.inner.forward_token_states(input_ids, mask, task)


def long_docs(n: int) -> list[dict]:
    """Documents of several sample docstrings each: every one longer than the window."""
    docs = sample_docs(8 * n)
    return [{"id": f"long-{i}", "text": " ".join(d["text"] for d in docs[8 * i : 8 * i + 8])} for i in range(n)]


def tokenized(rows: list[dict]) -> pa.Table:
    rules = RowRules(id_column="id", text_column="text", image_column="image")
    table = to_table([normalize_record(r, rules, "docs.jsonl", i + 1) for i, r in enumerate(rows)])
    table = table.append_column("fragment", [["f0"] * table.num_rows])
    return tokenize_batch(table, MINILM.model_dump_json(), LATE.model_dump_json(), "document", None, 128)


@pytest.fixture(scope="module")
def actor() -> EmbedActor:
    return EmbedActor(MINILM.model_dump_json(), LATE.model_dump_json(), None, batch_tokens=8192, torch_threads=1,
                      window=WINDOW, window_overlap=OVERLAP)


@pytest.fixture(scope="module")
def batch() -> pa.Table:
    return tokenized(long_docs(2))


def vectors(out: pa.Table) -> dict[tuple, np.ndarray]:
    cols = [out.column(c).to_pylist() for c in ("id", "chunk", "vector")]
    return {(i, c): np.asarray(v, np.float32) for i, c, v in zip(*cols)}


def run(actor: EmbedActor, batch: pa.Table, batch_tokens: int, oom_above: int | None = None):
    """The batch through the actor with this token budget; (chunk vectors, forward shapes)."""
    encoder = actor.embedder.encoder
    actor.embedder.batch_tokens = batch_tokens
    actor.embedder.encoder = recording = Recording(encoder, oom_above)
    try:
        return vectors(actor(batch)), recording.shapes
    finally:
        actor.embedder.encoder, actor.embedder.batch_tokens = encoder, 8192


def expected_groups(batch: pa.Table, per_forward: int) -> list[tuple[int, int]]:
    """The forward shapes of the batch's documents (all over the window) at `per_forward` windows a forward."""
    shapes = []
    for ids in batch.column("input_ids").to_pylist():
        n = len(window_starts(len(ids), WINDOW, OVERLAP))
        shapes += [(min(per_forward, n - g), WINDOW) for g in range(0, n, per_forward)]
    return shapes


def test_windows_per_forward():
    assert windows_per_forward(16384, 512) == 32
    assert windows_per_forward(16384, 8192) == 2
    assert windows_per_forward(4096, 8192) == 1  # a window over the budget still runs, alone
    assert windows_per_forward(16384, 512, n_windows=5) == 5
    assert windows_per_forward(100, 512, n_windows=0) == 1


@pytest.mark.parametrize("batch_tokens,per_forward", [(192, 3), (200, 3), (128, 2), (64, 1), (10, 1), (1024, 16)])
def test_actor_windows_follow_the_token_budget(actor, batch, batch_tokens, per_forward):
    n_windows = [len(window_starts(len(ids), WINDOW, OVERLAP)) for ids in batch.column("input_ids").to_pylist()]
    assert min(n_windows) > 8  # more than the old fixed 8 windows a forward
    ref, _ = run(actor, batch, 8192)
    got, shapes = run(actor, batch, batch_tokens)
    assert shapes == expected_groups(batch, per_forward)
    assert max(rows * tokens for rows, tokens in shapes) <= max(batch_tokens, WINDOW)
    assert got.keys() == ref.keys() and len(got) > 2 * len(n_windows)
    for key in ref:
        np.testing.assert_allclose(got[key], ref[key], atol=1e-5)


def test_oom_still_halves_the_windows(actor, batch):
    """A budget of 8 windows (512 tokens) on a device that takes 128: 8 -> 4 -> 2 windows a forward for the
    first document; the next ones start at 2 (the lower budget is remembered)."""
    ref, _ = run(actor, batch, 8192)
    got, shapes = run(actor, batch, 512, oom_above=128)
    per_doc = [([(8, WINDOW), (4, WINDOW)] if i == 0 else []) + expected_groups(batch.slice(i, 1), 2)
               for i in range(batch.num_rows)]
    assert shapes == [s for doc in per_doc for s in doc]
    for key in ref:
        np.testing.assert_allclose(got[key], ref[key], atol=1e-5)


def test_late_chunk_takes_a_budget(minilm_path):
    """The library function: same vectors at any budget, forwards of `batch_tokens // window` windows."""
    fam = load_family(ModelSpec(name="hf-encoder", path=minilm_path, dtype="float32", max_length=128))
    tok, enc = fam.load_tokenizer(), Recording(fam.load_encoder("cpu"))
    ids = tok.encode_with_offsets(long_docs(1)[0]["text"], "document", truncate=False).ids
    spans = [(0, 50), (50, len(ids) // 2), (len(ids) // 2, len(ids))]
    one = late_chunk(enc, ids, spans, None, WINDOW, OVERLAP, batch_tokens=WINDOW)
    assert {s[0] for s in enc.shapes} == {1}
    enc.shapes.clear()
    five = late_chunk(enc, ids, spans, None, WINDOW, OVERLAP, batch_tokens=5 * WINDOW + 10)
    n = len(window_starts(len(ids), WINDOW, OVERLAP))
    assert [s[0] for s in enc.shapes] == [min(5, n - g) for g in range(0, n, 5)]
    np.testing.assert_allclose(five, one, atol=1e-5)
