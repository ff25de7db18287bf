"""The embed actor in process under injected faults: a forward out of device memory is split down to one
row, a row that alone does not fit and a row with a non-finite vector become rejects, in every mode."""

from __future__ import annotations

import io
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import pytest
import torch
from PIL import Image

from conftest import FIXTURES, sample_docs
from embindex.config import ModelConfig, OutputsConfig
from embindex.embed.actor import EmbedActor
from embindex.embed.faults import NAN_ENV, OOM_ENV
from embindex.embed.tokenize import tokenize_batch
from embindex.models.embedder import TokenBudget
from embindex.sources.normalize import Reasons, RowRules, normalize_record, reject_row, to_table

MINILM = ModelConfig(path="builtin:all-MiniLM-L6-v2", dtype="float32", max_length=128)
COLBERT = ModelConfig(name="jina-colbert-v2", path=str(FIXTURES / "jina-colbert-v2-tiny"), dtype="float32",
                      max_length=128)
CLIP = ModelConfig(name="jina-clip-v2", path=str(FIXTURES / "jina-clip-v2-tiny"), dtype="float32", max_length=128)
LATE = OutputsConfig(late_chunking={"chunker": "sentences", "n_sentences": 2})
NAIVE = OutputsConfig(chunking={"chunker": "tokens", "chunk_size": 24, "overlap": 0})
MULTI = OutputsConfig(multivector=True)
_ACTORS: dict[tuple, EmbedActor] = {}


def actor(model: ModelConfig, outputs: OutputsConfig = OutputsConfig(), **kw: Any) -> EmbedActor:
    """One in-process actor per (model, outputs, kwargs) for the module (model loads are the slow part)."""
    key = (model.model_dump_json(), outputs.model_dump_json(), tuple(sorted(kw.items())))
    if key not in _ACTORS:
        _ACTORS[key] = EmbedActor(key[0], key[1], None, batch_tokens=8192, torch_threads=1, **kw)
    _ACTORS[key].embedder.budget = TokenBudget(8192)  # each test starts with the configured budget
    return _ACTORS[key]


def tokenized(rows: list[dict], model: ModelConfig, outputs: OutputsConfig = OutputsConfig()) -> pa.Table:
    """Normalized rows (plus a reject) as the tokenize stage hands them to the actor."""
    rules = RowRules(id_column="id", text_column="text", image_column="image")
    norm = [normalize_record(r, rules, "docs.jsonl", i + 1) for i, r in enumerate(rows)]
    norm.insert(1, reject_row("bad", Reasons.MISSING_TEXT, "no text", "docs.jsonl", 99))
    table = to_table(norm).append_column("fragment", [["f0"] * len(norm)])
    return tokenize_batch(table, model.model_dump_json(), outputs.model_dump_json(), "document", None, 128)


def docs(n: int) -> list[dict]:
    return [{"id": d["id"], "text": d["text"]} for d in sample_docs(n)]


def oom(message: str = "CUDA out of memory. Tried to allocate 2.00 GiB") -> Exception:
    return torch.cuda.OutOfMemoryError(message)


def patch_forward(monkeypatch, encoder: Any, name: str, wrap: Callable[..., Any]) -> list[tuple]:
    """Replace `encoder.<name>` by `wrap(original, *args)`; returns the recorded input shapes."""
    original, calls = getattr(encoder, name), []

    def forward(*args, **kwargs):
        calls.append(tuple(args[0].shape) if isinstance(args[0], torch.Tensor) else (len(args[0]),))
        return wrap(original, *args, **kwargs)

    monkeypatch.setattr(encoder, name, forward)
    return calls


def by_key(out: pa.Table) -> dict[tuple, Any]:
    """(id, chunk) -> (vector, reject, detail)."""
    cols = [out.column(c).to_pylist() for c in ("id", "chunk", "vector", "reject", "reject_detail")]
    return {(i, c): (np.asarray(v, np.float32) if v is not None else None, r, d) for i, c, v, r, d in zip(*cols)}


def lengths(table: pa.Table) -> dict[str, int]:
    return dict(zip(table.column("id").to_pylist(), (len(x) for x in table.column("input_ids").to_pylist())))


def assert_same_vectors(got: dict, ref: dict, keys) -> None:
    for k in keys:
        assert got[k][1] is None, (k, got[k][1:])
        np.testing.assert_allclose(got[k][0], ref[k][0], atol=1e-3)


# -- out of memory: split, then reject -----------------------------------------------------------------
def test_oom_lowers_the_budget_once_and_later_batches_remember_it(monkeypatch):
    """The device fits 2 rows of the longest document: the batch of 8 fails, its first half fails, then
    every forward fits, and the next batch does not fail at all (the lower budget is remembered)."""
    a = actor(MINILM)
    batch = tokenized(docs(8), MINILM)
    ref = by_key(a(batch))
    longest = max(lengths(batch).values())
    freed = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: freed.append(1))

    def over_two_longest_rows(original, input_ids, mask, *rest):
        if input_ids.numel() > 2 * longest:
            raise oom()
        return original(input_ids, mask, *rest)

    calls = patch_forward(monkeypatch, a.embedder.encoder, "forward_pooled", over_two_longest_rows)
    got = by_key(a(batch))
    sizes = [rows * width for rows, width in calls]
    assert sizes[0] == 8 * longest and sizes[1] == 4 * longest and len(freed) == 2  # each failure freed the cache
    assert all(t <= 2 * longest for t in sizes[2:]) and sum(rows for rows, _ in calls[2:]) == 8
    assert got.keys() == ref.keys() and got[("bad", None)][1] == Reasons.MISSING_TEXT
    assert_same_vectors(got, ref, [k for k in ref if k[0] != "bad"])
    assert a.embedder.budget.tokens == 2 * longest
    calls.clear()
    again = by_key(a(batch))  # within the remembered budget from its first forward: no failure
    assert len(freed) == 2 and all(rows * width <= 2 * longest for rows, width in calls)
    assert_same_vectors(again, ref, [k for k in ref if k[0] != "bad"])


def test_token_budget_grows_back_after_a_run_of_forwards_that_fit():
    budget = TokenBudget(8192, grow_after=3)
    budget.failed(6000)
    assert budget.tokens == 3000
    budget.failed(5000)  # a larger failure never raises the budget
    assert budget.tokens == 2500
    for _ in range(3):
        budget.fitted()
    assert budget.tokens == 5000
    for _ in range(6):
        budget.fitted()
    assert budget.tokens == 8192  # never above the configured limit


def test_rows_that_alone_do_not_fit_are_rejected_with_a_detail(monkeypatch):
    a = actor(MINILM)
    batch = tokenized(docs(30), MINILM)
    ref = by_key(a(batch))
    n_tokens = lengths(batch)

    def over_100_tokens(original, input_ids, mask, *rest):
        if input_ids.shape[1] > 100:  # the message form some CUDA errors take
            raise RuntimeError("CUDA error: out of memory\nCUDA kernel errors might be asynchronously reported")
        return original(input_ids, mask, *rest)

    patch_forward(monkeypatch, a.embedder.encoder, "forward_pooled", over_100_tokens)
    out = a(batch)
    got = by_key(out)
    big = {i for i, n in n_tokens.items() if n > 100 and i != "bad"}
    assert 3 <= len(big) < 25 and out.num_rows == batch.num_rows
    for i in big:
        vec, reason, detail = got[(i, None)]
        assert vec is None and reason == Reasons.TOO_LARGE_FOR_DEVICE
        assert f"{n_tokens[i]} tokens" in detail and "float32" in detail and "cpu" in detail
        assert "out of memory" in detail
    assert_same_vectors(got, ref, [k for k in ref if k[0] not in big | {"bad"}])


def test_other_errors_still_fail_the_batch(monkeypatch):
    a = actor(MINILM)

    def broken(original, *args, **kwargs):
        raise ValueError("not a memory problem")

    patch_forward(monkeypatch, a.embedder.encoder, "forward_pooled", broken)
    with pytest.raises(ValueError, match="not a memory problem"):
        a(tokenized(docs(4), MINILM))


def test_late_chunking_fewer_windows_then_whole_document_rejects(monkeypatch):
    a = actor(MINILM, LATE, window=64, window_overlap=8)
    batch = tokenized(docs(16), MINILM, LATE)
    n_tokens = lengths(batch)
    ref = by_key(a(batch))
    limit = {"tokens": 128}

    def over_limit(original, input_ids, mask, task=None):
        if input_ids.numel() > limit["tokens"]:
            raise oom()
        return original(input_ids, mask, task)

    calls = patch_forward(monkeypatch, a.embedder.encoder, "forward_token_states", over_limit)
    got = by_key(a(batch))  # 2 rows of 64 fit: the first long document's 3 windows do not
    sizes = [rows * width for rows, width in calls]
    assert calls[0] == (3, 64) and a.embedder.budget.tokens == 96  # at most half of what failed, remembered
    assert all(t <= 96 for t in sizes[1:]) and any(t > 64 for t in sizes)  # short documents still batched
    assert got.keys() == ref.keys()
    assert_same_vectors(got, ref, [k for k in ref if k[0] != "bad"])

    limit["tokens"] = 50  # one window (64 tokens) never fits; documents up to 50 tokens do
    out = a(batch)
    got = by_key(out)
    big = {i for i, n in n_tokens.items() if n > 50 and i != "bad"}
    assert any(n_tokens[i] > 64 for i in big) and any(n_tokens[i] <= 64 for i in big) and len(big) < 14
    for i in big:  # one reject row per document, no chunk rows
        assert [k for k in got if k[0] == i] == [(i, None)]
        assert got[(i, None)][1] == Reasons.TOO_LARGE_FOR_DEVICE and f"{n_tokens[i]} tokens" in got[(i, None)][2]
    assert_same_vectors(got, ref, [k for k in ref if k[0] not in big | {"bad"}])
    assert out.num_rows == len(got) == sum(1 for k in ref if k[0] not in big) + len(big)


def image_rows(n: int) -> list[dict]:
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (40 + 7 * i, 50, 3), dtype=np.uint8)).save(buf, "PNG")
        out.append({"id": f"img-{i}", "image": buf.getvalue()})
    return out


def test_images_split_and_reject(monkeypatch):
    a = actor(CLIP)
    batch = tokenized(image_rows(5) + docs(2), CLIP)
    ref = by_key(a(batch))
    target = np.frombuffer(batch.column("pixels")[3].as_py(), np.uint8)  # img-2 (the reject is row 1)

    def faulty(original, pixels, task=None, tokens=False):
        if len(pixels) > 1 or any(np.array_equal(p.reshape(-1), target) for p in pixels):
            raise oom()
        return original(pixels, task, tokens=tokens)

    calls = patch_forward(monkeypatch, a.embedder.encoder, "forward_images", faulty)
    got = by_key(a(batch))
    assert calls[0] == (5,) and [c for c in calls if c == (1,)] == [(1,)] * 5  # halved down to single images
    vec, reason, detail = got[("img-2", None)]
    assert vec is None and reason == Reasons.TOO_LARGE_FOR_DEVICE and detail.startswith("image ")
    assert "tokens" in detail and "float32" in detail
    assert_same_vectors(got, ref, [k for k in ref if k[0] not in ("img-2", "bad")])


# -- non-finite vectors ------------------------------------------------------------------------------------
def nan_rows(targets: list[np.ndarray], value: float = float("nan"), token: int | None = None):
    """A forward wrapper that sets `value` in the outputs of rows whose ids are one of `targets`: the whole
    row, or only its `token`-th token (multi-vector: its `token`-th kept token)."""

    def wrap(original, input_ids, mask, *rest):  # rest: task (and role, for forward_pooled)
        out = original(input_ids, mask, *rest)
        parts = list(out) if isinstance(out, tuple) else [out]
        t = parts[-2 if isinstance(out, tuple) else -1].clone()  # token vectors / states, or the pooled vector
        for b in range(input_ids.shape[0]):
            row = input_ids[b][mask[b].bool()].numpy()
            if not any(len(x) == len(row) and (x == row).all() for x in targets):
                continue
            if token is None:
                t[b] = value
            else:
                pos = int(torch.nonzero(parts[-1][b])[token]) if isinstance(out, tuple) else token
                t[b, pos] = value
        if not isinstance(out, tuple):
            return t
        return (*parts[:-2], t, parts[-1])

    return wrap


def ids_of(batch: pa.Table, doc_id: str, chunk: int | None = None) -> np.ndarray:
    rows = [i for i, (d, c) in enumerate(zip(batch.column("id").to_pylist(), batch.column("chunk").to_pylist()))
            if d == doc_id and (chunk is None or c == chunk)] if "chunk" in batch.column_names else \
        [i for i, d in enumerate(batch.column("id").to_pylist()) if d == doc_id]
    return np.asarray(batch.column("input_ids")[rows[0]].as_py())


def test_non_finite_single_vectors_are_rejected(monkeypatch):
    a = actor(MINILM)
    batch = tokenized(docs(10), MINILM)
    ref = by_key(a(batch))
    ids = [d["id"] for d in docs(10)]
    patch_forward(monkeypatch, a.embedder.encoder, "forward_pooled", nan_rows([ids_of(batch, ids[2])]))
    got = by_key(a(batch))
    assert got[(ids[2], None)][0] is None and got[(ids[2], None)][1] == Reasons.NON_FINITE
    assert "NaN" in got[(ids[2], None)][2]
    assert_same_vectors(got, ref, [k for k in ref if k[0] not in (ids[2], "bad")])

    monkeypatch.undo()
    patch_forward(monkeypatch, a.embedder.encoder, "forward_pooled", nan_rows([ids_of(batch, ids[5])], np.inf))
    got = by_key(a(batch))
    assert got[(ids[5], None)][1] == Reasons.NON_FINITE and "0 NaN and 384 infinite" in got[(ids[5], None)][2]


def test_naive_chunk_non_finite_rejects_the_whole_document(monkeypatch):
    a = actor(MINILM, NAIVE)
    batch = tokenized(docs(10), MINILM, NAIVE)
    ref = by_key(a(batch))
    chunked = [d for d, c in ref if c == 2]
    target = chunked[0]
    patch_forward(monkeypatch, a.embedder.encoder, "forward_pooled", nan_rows([ids_of(batch, target, 1)]))
    out = a(batch)
    got = by_key(out)
    assert [k for k in got if k[0] == target] == [(target, 0)]  # one row for the document
    assert got[(target, 0)][0] is None and got[(target, 0)][1] == Reasons.NON_FINITE
    assert out.num_rows == batch.num_rows - sum(1 for k in ref if k[0] == target) + 1
    assert_same_vectors(got, ref, [k for k in ref if k[0] not in (target, "bad")])


def test_late_chunk_non_finite_rejects_the_whole_document(monkeypatch):
    a = actor(MINILM, LATE, window=64, window_overlap=8)
    batch = tokenized(docs(16), MINILM, LATE)
    ref = by_key(a(batch))
    short = next(i for i, n in lengths(batch).items() if 10 < n <= 64 and sum(k[0] == i for k in ref) > 1)
    patch_forward(monkeypatch, a.embedder.encoder, "forward_token_states",
                  nan_rows([ids_of(batch, short)], token=3))
    got = by_key(a(batch))
    assert [k for k in got if k[0] == short] == [(short, None)] and got[(short, None)][1] == Reasons.NON_FINITE
    assert_same_vectors(got, ref, [k for k in ref if k[0] not in (short, "bad")])


def test_multivector_non_finite_token_vector_rejects_the_row(monkeypatch):
    a = actor(COLBERT, MULTI)
    batch = tokenized(docs(8), COLBERT, MULTI)
    ref_out = a(batch)
    ref = by_key(ref_out)
    target = docs(8)[4]["id"]

    def with_oom(original, input_ids, mask, task=None):
        if input_ids.shape[0] > 3:
            raise oom()
        return nan_rows([ids_of(batch, target)], token=5)(original, input_ids, mask, task)

    calls = patch_forward(monkeypatch, a.embedder.encoder, "forward_multi", with_oom)
    out = a(batch)
    assert calls[0][0] == 8 and max(c[0] for c in calls[1:]) <= 4
    got = by_key(out)
    assert got[(target, None)][0] is None and got[(target, None)][1] == Reasons.NON_FINITE
    tokens = dict(zip(out.column("id").to_pylist(), out.column("token_vectors").to_pylist()))
    ref_tokens = dict(zip(ref_out.column("id").to_pylist(), ref_out.column("token_vectors").to_pylist()))
    assert tokens[target] is None
    keep = [k for k in ref if k[0] not in (target, "bad")]
    assert_same_vectors(got, ref, keep)
    for doc, _ in keep:
        np.testing.assert_allclose(np.asarray(tokens[doc], np.float32), np.asarray(ref_tokens[doc], np.float32),
                                   atol=1e-3)


# -- the environment switch (what the end-to-end test sets for the Ray workers) ----------------------------
def test_fault_switches_from_the_environment(monkeypatch):
    batch = tokenized(docs(12), MINILM)
    ref = by_key(actor(MINILM)(batch))
    ids = [d["id"] for d in docs(12)]
    monkeypatch.setenv(OOM_ENV, "100")
    monkeypatch.setenv(NAN_ENV, f"{ids[1]},{ids[2]}")
    a = EmbedActor(MINILM.model_dump_json(), OutputsConfig().model_dump_json(), None, batch_tokens=8192,
                   torch_threads=1)
    got = by_key(a(batch))
    big = {i for i, n in lengths(batch).items() if n > 100 and i != "bad"}
    assert big and not big & {ids[1], ids[2]}
    assert {k[0] for k, v in got.items() if v[1] == Reasons.TOO_LARGE_FOR_DEVICE} == big
    assert {k[0] for k, v in got.items() if v[1] == Reasons.NON_FINITE} == {ids[1], ids[2]}
    assert "injected" in got[(next(iter(big)), None)][2]
    assert_same_vectors(got, ref, [k for k in ref if k[0] not in big | {ids[1], ids[2], "bad"}])
