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
