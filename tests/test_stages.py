"""The build as a list of stages: config validation, the plan, and stages run alone on a table."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import job_config
from embindex.config import load_config
from embindex.index.shards import generated_columns
from embindex.sources.normalize import NORMALIZED_SCHEMA, Reasons
from embindex.stages.normalize import Normalize
from embindex.stages.write import Write

STAGE = {"stage": "html_to_markdown", "model": {"path": "unused"}}


def _cfg(stages, tmp_path):
    return load_config(job_config(str(tmp_path / "c"), str(tmp_path / "i")), {"stages": stages})


def test_default_stages_and_a_generative_stage_in_its_place(tmp_path):
    assert _cfg(["read", "normalize", "tokenize", "embed", "write"], tmp_path).generative_stages() == []
    cfg = _cfg(["read", "normalize", STAGE, "tokenize", "embed", "write"], tmp_path)
    (gen,) = cfg.generative_stages()
    assert gen.stage == "html_to_markdown" and gen.resources.batch_tokens == 16384
    assert load_config(job_config("c", "i")).stages == ["read", "normalize", "tokenize", "embed", "write"]


@pytest.mark.parametrize("stages, message", [
    (["read", "tokenize", "normalize", "embed", "write"], "in that order"),
    (["read", "normalize", "tokenize", "embed"], "once each"),
    (["read", "normalize", "html_to_markdown", "tokenize", "embed", "write"], "needs its model"),
    ([STAGE, "read", "normalize", "tokenize", "embed", "write"], "after normalize and before tokenize"),
    (["read", "normalize", "translate", "tokenize", "embed", "write"], "unknown stage"),
    (["read", "normalize", STAGE, STAGE, "tokenize", "embed", "write"], "once"),
])
def test_bad_stage_lists_are_config_errors(stages, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        _cfg(stages, tmp_path)


def test_overrides_reach_into_the_stage_list(tmp_path):
    cfg = load_config(job_config("c", "i", ), {"stages": ["read", "normalize", STAGE, "tokenize", "embed", "write"]})
    over = load_config(cfg, {"stages.2.model.path": "s3://m/readerlm", "stages.2.resources.actors": 2})
    (gen,) = over.generative_stages()
    assert gen.model.path == "s3://m/readerlm" and gen.resources.actors == 2
    with pytest.raises(ValueError, match="not an index"):
        load_config(cfg, {"stages.9.model.path": "x"})


def _rows(ids, reject=None):
    n = len(ids)
    return pa.Table.from_pylist([{"id": i, "text": f"text {i}", "modality": "text", "content_hash": i,
                                  "reject": (reject or {}).get(i)} for i in ids], schema=NORMALIZED_SCHEMA) \
        .append_column("fragment", pa.array(["f"] * n))


def test_normalize_keeps_duplicates_as_rejects_even_outside_the_delta():
    table = _rows(["a", "b", "c", "d"], reject={"d": Reasons.EMPTY_TEXT})
    out = Normalize(frozenset({"b"}), embed_ids=["a"]).run(table)
    assert {r["id"]: r["reject"] for r in out.to_pylist()} == {"a": None, "b": Reasons.DUPLICATE_ID,
                                                               "d": Reasons.EMPTY_TEXT}
    assert Normalize().run(table).num_rows == 4


def _embedded(n_docs: int, chunks: int) -> pa.Table:
    """What reaches the write stage: rows with vectors, a generative stage's columns on every chunk row."""
    rows = []
    for d in range(n_docs):
        for c in range(chunks):
            rows.append({"id": f"d{d}", "chunk": c, "start": 0, "end": 1, "content_hash": "h", "meta": None,
                         "source": "s", "vector": [0.5, 0.5], "modality": "text", "reject": None,
                         "reject_detail": None, "line": None, "fragment": "frag",
                         "markdown": f"# doc {d}", "markdown_status": "ok" if d else "unfinished",
                         "markdown_model": "sha256:x", "markdown_tokens": 7})
    rows.append({"id": "bad", "reject": "empty_after_cleaning", "reject_detail": "x", "source": "s", "line": 3,
                 "fragment": "frag"})
    schema = pa.schema([("id", pa.string()), ("chunk", pa.int32()), ("start", pa.int32()), ("end", pa.int32()),
                        ("content_hash", pa.string()), ("meta", pa.string()), ("source", pa.string()),
                        ("vector", pa.list_(pa.float16(), 2)), ("modality", pa.string()), ("reject", pa.string()),
                        ("reject_detail", pa.string()), ("line", pa.int64()), ("fragment", pa.string()),
                        ("markdown", pa.string()), ("markdown_status", pa.string()),
                        ("markdown_model", pa.string()), ("markdown_tokens", pa.int32())])
    return pa.Table.from_pylist(rows, schema=schema)


def test_write_stores_generated_columns_once_per_document_and_counts_them(tmp_path):
    out = Write(str(tmp_path), {}, "run1", ["markdown"]).run(_embedded(3, chunks=2))
    part, rejects = sorted(out.to_pylist(), key=lambda r: r["kind"])
    assert part["rows"] == 6 and part["documents"] == 3 and rejects["rows"] == 1
    assert json.loads(part["stages"]) == {"markdown": {"documents": 3, "tokens": 21, "unfinished": 1}}
    stored = pq.read_table(tmp_path / part["path"]).to_pylist()
    assert set(generated_columns("markdown")) <= set(stored[0])
    first = [r for r in stored if r["chunk"] == 0]
    later = [r for r in stored if r["chunk"] > 0]
    assert all(r["markdown"] and r["markdown_model"] == "sha256:x" for r in first)
    assert all(r["markdown"] is None and r["markdown_status"] is None for r in later)
    # without generative stages nothing changes: no stage columns, no counts
    plain = Write(str(tmp_path / "plain"), {}, "run1").run(_embedded(1, 1).drop_columns(
        generated_columns("markdown")))
    assert plain.column("stages").to_pylist() == [None, None]
