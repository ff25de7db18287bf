import pytest
from pydantic import ValidationError

from embindex.config import load_config, parse_override


def base():
    return {"source": {"uri": "corpus/"}, "index": {"uri": "idx/"}}


def test_defaults_and_overrides():
    cfg = load_config(base(), {"index.tiers": [64, "full"], "model.dtype": "bfloat16", "resources.actors": 2})
    assert cfg.index.tiers == [64, "full"]
    assert cfg.model.dtype == "bfloat16" and cfg.resources.actors == 2
    assert cfg.model.path == "builtin:all-MiniLM-L6-v2" and cfg.source.id_column == "id"


def test_parse_override_yaml_values():
    assert parse_override("index.tiers=[64,128]") == ("index.tiers", [64, 128])
    assert parse_override("source.uri=s3://b/x") == ("source.uri", "s3://b/x")
    with pytest.raises(ValueError):
        parse_override("no-equals")


@pytest.mark.parametrize(
    "override",
    [
        {"index.tiers": []},
        {"index.tiers": [0]},
        {"model.dtype": "int3"},
        {"source.format": "xml"},
        {"resources.actors": 0},
        {"source.unknown_key": 1},
        {"outputs.single": False},  # every mode stores one vector per row; false would do nothing
    ],
)
def test_invalid_configs_fail_before_any_worker(override):
    with pytest.raises(ValidationError):
        load_config(base(), override)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_config(tmp_path / "nope.yaml")


def test_quickstart_config_is_valid():
    cfg = load_config("configs/quickstart.yaml")
    assert cfg.source.uri == "builtin:sample-corpus"


def test_chunking_that_needs_token_offsets_is_refused_for_a_tokenizer_without_them():
    """jina-code-embeddings' tokenizer gives no offsets: refused when the job is planned, not in a Ray task."""
    from pathlib import Path

    from embindex.pipeline import Job

    fixture = Path(__file__).parent / "fixtures" / "jina-code-embeddings-tiny"
    cfg = load_config(base(), {"model.name": "jina-code-embeddings", "model.path": str(fixture),
                               "model.task": "nl2code", "index.tiers": ["full"],
                               "outputs": {"chunking": {"chunker": "tokens", "chunk_size": 64}}})
    with pytest.raises(ValueError, match="chunker: tokens needs token offsets"):
        Job(cfg, log=lambda _m: None)
    ok = load_config(base(), {"model.name": "jina-code-embeddings", "model.path": str(fixture),
                              "model.task": "nl2code", "index.tiers": ["full"],
                              "outputs": {"chunking": {"chunker": "sentences"}}})
    Job(ok, log=lambda _m: None)
