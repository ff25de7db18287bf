"""The embed actor in process: its vectors, and that all its torch work runs on one thread."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from conftest import sample_docs
from embindex.config import ModelConfig, OutputsConfig
from embindex.embed.actor import EmbedActor
from embindex.embed.tokenize import tokenize_batch
from embindex.index.shards import EMBED_SECONDS_COLUMN
from embindex.models import embedder as embedder_module
from embindex.sources.normalize import RowRules, normalize_record, reject_row, to_table


@pytest.fixture()
def fragment():
    """A normalized fragment (documents and one reject), tokenized as the pipeline does."""
    rules = RowRules(id_column="id", text_column="text")
    rows = [normalize_record(d, rules, "docs.jsonl", i + 1) for i, d in enumerate(sample_docs(40))]
    rows.insert(5, reject_row("bad", "missing_text", "no text", "docs.jsonl", 99))
    table = to_table(rows).append_column("fragment", [["f0"] * len(rows)])
    model = ModelConfig(path="builtin:all-MiniLM-L6-v2", dtype="float32")
    outputs = OutputsConfig()
    tokenized = tokenize_batch(table, model.model_dump_json(), outputs.model_dump_json(), "document", None, 256)
    return table, tokenized, model, outputs


def test_actor_runs_load_warm_up_and_every_batch_on_one_compute_thread(fragment, monkeypatch):
    """Ray Data calls __init__ and __call__ on different threads; torch work on both would make two
    OpenMP teams (libgomp then sleeps at barriers instead of spinning). The actor keeps it on one."""
    table, tokenized, model, outputs = fragment
    threads: list[int] = []
    original = embedder_module.Embedder.embed_ids

    def recording(self, *args, **kwargs):
        threads.append(threading.get_ident())
        return original(self, *args, **kwargs)

    monkeypatch.setattr(embedder_module.Embedder, "embed_ids", recording)
    actor = EmbedActor(model.model_dump_json(), outputs.model_dump_json(), None, batch_tokens=512, torch_threads=1)
    assert threads, "the constructor warms the model up"
    callers = [ThreadPoolExecutor(1), ThreadPoolExecutor(1)]  # like Ray Data's per-call thread, twice
    outs = [ex.submit(actor, tokenized).result() for ex in callers]
    caller_ids = {ex.submit(threading.get_ident).result() for ex in callers}
    assert len(set(threads)) == 1 and not caller_ids & set(threads) and threading.get_ident() not in threads

    # and what it computes: the model's vectors for the documents, null for the reject
    out = outs[0]
    assert "input_ids" not in out.column_names and out.num_rows == table.num_rows
    vectors = out.column("vector").to_pylist()
    ids = out.column("id").to_pylist()
    assert vectors[ids.index("bad")] is None
    docs = [r for r in table.to_pylist() if r["reject"] is None]
    expected = actor.embedder.encode([d["text"] for d in docs])
    got = np.array([vectors[ids.index(d["id"])] for d in docs], dtype=np.float32)
    np.testing.assert_allclose(got, expected, atol=2e-3)  # stored as float16
    timing = [EMBED_SECONDS_COLUMN]  # the actor's busy seconds on the block: the one column that varies
    assert outs[1].drop_columns(timing).equals(out.drop_columns(timing))
    assert all(t.column(EMBED_SECONDS_COLUMN).to_pylist()[0] > 0 for t in (out, outs[1]))
