"""Chunkers, chunk -> token span mapping, late-chunk pooling and long late chunking (no Ray)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import FIXTURES, sample_docs
from embindex.models import ModelSpec, load_family
from embindex.models.late_chunking import late_chunk, pool_spans, token_states, window_starts
from embindex.text.chunking import ChunkSpec, chunk_spans, paragraph_spans, sentence_spans, token_spans

SPECS = [ChunkSpec("sentences", n_sentences=1), ChunkSpec("sentences", n_sentences=3),
         ChunkSpec("paragraphs", chunk_size=64), ChunkSpec("tokens", chunk_size=16)]


@pytest.fixture(scope="module")
def minilm(minilm_path):
    fam = load_family(ModelSpec(name="hf-encoder", path=minilm_path, dtype="float32"))
    return fam.load_tokenizer(), fam.load_encoder("cpu")


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s.chunker}")
def test_chunks_cover_text_without_gaps_beyond_whitespace(spec, minilm):
    tok, _ = minilm
    for doc in sample_docs(60):
        text = doc["text"]
        offsets = tok.encode_with_offsets(text, "document", truncate=False).offsets
        spans = chunk_spans(text, spec, offsets)
        assert spans, doc["id"]
        assert text[: spans[0][0]].strip() == "" and text[spans[-1][1]:].strip() == ""
        for (s0, e0), (s1, e1) in zip(spans, spans[1:]):
            assert s0 < e0 <= s1 < e1
            assert text[e0:s1].strip() == "", (doc["id"], text[e0:s1])
        for s, e in spans:
            assert not text[s].isspace() and not text[e - 1].isspace()


def test_overlap_shares_units():
    text = "One. Two. Three. Four. Five."
    assert [text[s:e] for s, e in chunk_spans(text, ChunkSpec("sentences", n_sentences=2, overlap=1))] == [
        "One. Two.", "Two. Three.", "Three. Four.", "Four. Five."]
    assert [text[s:e] for s, e in sentence_spans(text)] == ["One.", "Two.", "Three.", "Four.", "Five."]


def test_paragraphs_split_on_blank_lines_and_headings():
    text = "# Title\nintro line\n\nsecond para\n## Sub\nbody"
    assert [text[s:e] for s, e in paragraph_spans(text)] == ["# Title\nintro line", "second para", "## Sub\nbody"]


def test_token_spans_are_contiguous_and_own_their_characters(minilm):
    tok, _ = minilm
    text = sample_docs(10)[4]["text"]
    enc = tok.encode_with_offsets(text, "document", truncate=False)
    chars = chunk_spans(text, ChunkSpec("sentences", n_sentences=1))
    spans = token_spans(enc.offsets, chars)
    assert spans[0][0] == 0 and spans[-1][1] == len(enc.ids)  # [CLS] in the first, [SEP] in the last
    assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
    for (cs, ce), (ts, te), nxt in zip(chars, spans, [c[0] for c in chars[1:]] + [len(text)]):
        for t in range(ts, te):
            s, e = enc.offsets[t]
            if s >= 0:
                assert cs <= s < nxt


def test_late_chunk_is_the_mean_of_whole_document_token_states(minilm):
    tok, enc = minilm
    text = sample_docs(10)[4]["text"]
    t = tok.encode_with_offsets(text, "document")
    spans = token_spans(t.offsets, chunk_spans(text, ChunkSpec("sentences", n_sentences=2)))
    got = late_chunk(enc, t.ids, spans, None, window=512, overlap=64)
    ids = torch.from_numpy(t.ids.astype(np.int64))[None]
    states = enc.model(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state[0].detach()
    for v, (s, e) in zip(got, spans):
        ref = states[s:e].mean(0)
        ref = (ref / ref.norm()).numpy()
        np.testing.assert_allclose(v, ref, atol=1e-5)


def test_long_late_chunking_windows(minilm):
    tok, enc = minilm
    text = " ".join(d["text"] for d in sample_docs(8))
    ids = tok.encode_with_offsets(text, "document", truncate=False).ids
    n = len(ids)
    assert n > 300
    # a window larger than the document equals plain late chunking
    spans = [(0, 50), (50, n)]
    plain = late_chunk(enc, ids[:500], [(0, 50), (50, 500)], None, window=512, overlap=64)
    big = late_chunk(enc, ids[:500], [(0, 50), (50, 500)], None, window=4096, overlap=256)
    np.testing.assert_allclose(plain, big, atol=1e-6)
    # windowed: exactly one state per token, the first window's states equal a plain forward of it
    states = token_states(enc, ids, None, window=128, overlap=32)
    assert states.shape == (n, 384) and torch.isfinite(states).all()
    first = token_states(enc, ids[:128], None, window=128, overlap=32)
    torch.testing.assert_close(states[:128], first, atol=1e-5, rtol=0)
    assert late_chunk(enc, ids, spans, None, window=128, overlap=32).shape == (2, 384)
    assert window_starts(10, 4, 1) == [0, 3, 6] and window_starts(4, 4, 1) == [0]
    with pytest.raises(ValueError):
        window_starts(10, 4, 4)


def test_v3_golden_late_chunking_through_pool_spans():
    """The reference recipe's chunk vectors from its own token spans (fixture golden)."""
    fam = load_family(ModelSpec(name="jina-embeddings-v3", path=str(FIXTURES / "jina-embeddings-v3-tiny"),
                                dtype="float32", task="retrieval.passage"))
    enc = fam.load_encoder("cpu")
    g = json.loads((FIXTURES / "jina-embeddings-v3-tiny" / "golden.json").read_text())["late_chunking"]
    ids = torch.tensor(g["model_input_ids"])[None]
    states = enc.forward_token_states(ids, torch.ones_like(ids), "retrieval.passage")[0].float()
    got = pool_spans(states, [tuple(s) for s in g["token_spans_in_model_input"]])
    ref = g["chunk_embeddings"]
    ref = np.asarray(ref["values"] if isinstance(ref, dict) else ref, dtype=np.float32).reshape(got.shape)
    np.testing.assert_allclose(got, ref, atol=1e-5)
