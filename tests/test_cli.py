"""`embindex build | search | inspect` through the real CLI entry point."""

from __future__ import annotations

import json

import pytest
import yaml
from typer.testing import CliRunner

from conftest import job_config, sample_docs
from embindex.cli import app

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


def test_build_search_inspect(ray_cluster, tmp_path):
    docs = sample_docs(80)
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps(d) + "\n" for d in docs) + '{"id": "bad", "text": ""}\n')
    cfg_path = tmp_path / "job.yaml"
    cfg_path.write_text(yaml.safe_dump(job_config(str(corpus), str(tmp_path / "wrong"))))
    index = tmp_path / "index"
    runner = CliRunner()

    r = runner.invoke(app, ["build", str(cfg_path), "--set", f"index.uri={index}", "--set", "index.tiers=[64,full]"])
    assert r.exit_code == 0, r.output
    assert "published v000001" in r.output and "rows in 81: indexed 80, rejected 1" in r.output
    assert not (tmp_path / "wrong").exists()

    r = runner.invoke(app, ["search", str(index), docs[7]["text"], "-k", "3", "--tier", "64"])
    assert r.exit_code == 0, r.output
    ranked = [line.split() for line in r.output.splitlines() if line.startswith(("  1.", "  2.", "  3."))]
    assert [row[0] for row in ranked] == ["1.", "2.", "3."] and ranked[0][-1] == docs[7]["id"]

    r = runner.invoke(app, ["search", str(index), "gzip compressed files", "--json"])
    payload = json.loads(r.output.strip().splitlines()[-1])
    assert payload["query"] == "gzip compressed files" and len(payload["hits"]) == 10
    assert {"id", "score", "meta", "chunk"} <= set(payload["hits"][0])

    r = runner.invoke(app, ["inspect", str(index)])
    assert r.exit_code == 0, r.output
    for text in ("v000001 * parent -", "documents 80", "rejected 1", "empty_text=1", "recall"):
        assert text in r.output
    r = runner.invoke(app, ["inspect", str(index), "--json"])
    assert json.loads(r.output)["counts"]["documents"] == 80


def test_cli_errors_exit_nonzero(tmp_path):
    runner = CliRunner()
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"source": {"uri": "x"}, "index": {"uri": "y", "tiers": []}}))
    r = runner.invoke(app, ["build", str(bad)])
    assert r.exit_code == 1 and "tiers" in r.output
    r = runner.invoke(app, ["build", str(tmp_path / "missing.yaml")])
    assert r.exit_code == 1 and "not found" in r.output
    r = runner.invoke(app, ["inspect", str(tmp_path / "no-index")])
    assert r.exit_code == 1 and "no published version" in r.output


def test_config_schema_and_examples():
    """`embindex config` lists the shipped examples, prints each one, and the JSON schema of every key."""
    from pathlib import Path

    runner = CliRunner()
    listed = runner.invoke(app, ["config"])
    assert listed.exit_code == 0
    configs = Path(__file__).resolve().parents[1] / "configs"
    names = sorted(p.stem for p in configs.glob("*.yaml"))
    assert [line.strip() for line in listed.output.splitlines()[1:]] == names
    shown = runner.invoke(app, ["config", "--example", "jina-embeddings-v3"])
    assert shown.exit_code == 0 and shown.output == (configs / "jina-embeddings-v3.yaml").read_text()
    by_family = runner.invoke(app, ["config", "--example", "hf-encoder"])  # a family name finds its example
    assert by_family.output == (configs / "hf-encoder-bge-base-en-v1.5.yaml").read_text()
    missing = runner.invoke(app, ["config", "--example", "nope"])
    assert missing.exit_code == 1 and "quickstart" in missing.output
    schema = json.loads(runner.invoke(app, ["config", "--schema"]).output)
    assert set(schema["properties"]) >= {"source", "model", "outputs", "index", "resources", "run", "stages"}
    assert "config --schema" in runner.invoke(app, ["build", "--help"]).output
