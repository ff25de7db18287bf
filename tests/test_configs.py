"""Every job config in configs/ validates, is commented, and names a family/task the model code accepts."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from embindex.config import load_config
from embindex.models.base import ModelSpec
from embindex.models.registry import FAMILIES, family_class

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
FIXTURES = Path(__file__).parent / "fixtures"
RETRIEVE = sorted(CONFIGS.glob("retrieve-*.yaml"))  # `embindex retrieve` configs
ALL = sorted(set(CONFIGS.glob("*.yaml")) - set(RETRIEVE))  # job configs

# full width of the checkpoint each family config names, and its published Matryoshka widths (None: the
# model is not Matryoshka-trained, any width below full is allowed but loses recall)
REAL_MODELS = {
    "hf-encoder": (768, None),  # BAAI/bge-base-en-v1.5
    "jina-embeddings-v3": (1024, {32, 64, 128, 256, 512, 768, 1024}),
    "jina-code-embeddings": (896, {64, 128, 256, 512, 896}),  # -0.5b
    "jina-embeddings-v2": (768, None),  # -base-en
    "jina-colbert-v2": (128, None),
    "jina-clip-v2": (1024, {32, 64, 128, 256, 512, 768, 1024}),
    "jina-embeddings-v4": (2048, {128, 256, 512, 1024, 2048}),
}

# a local checkpoint of each family to construct it with the config's task / pooling / dtype
LOCAL_CHECKPOINTS = {
    "hf-encoder": "builtin:all-MiniLM-L6-v2",
    "jina-embeddings-v3": str(FIXTURES / "jina-embeddings-v3-tiny"),
    "jina-code-embeddings": str(FIXTURES / "jina-code-embeddings-tiny"),
    "jina-colbert-v2": str(FIXTURES / "jina-colbert-v2-tiny"),
    "jina-clip-v2": str(FIXTURES / "jina-clip-v2-tiny"),
    "jina-embeddings-v4": str(FIXTURES / "jina-embeddings-v4-tiny"),
}


def _load(path: Path):
    try:
        return load_config(path)
    except ValueError as e:
        raise AssertionError(f"{path.name} does not load: {e}") from e


def test_configs_exist_for_every_family():
    names = {yaml.safe_load(p.read_text())["model"]["name"] for p in ALL}
    assert set(FAMILIES) <= names, f"no config for {sorted(set(FAMILIES) - names)}"
    assert (CONFIGS / "quickstart.yaml").exists()


@pytest.mark.parametrize("path", ALL + RETRIEVE, ids=lambda p: p.name)
def test_config_is_commented(path: Path):
    text = path.read_text()
    assert text.startswith("#"), "a config opens with a comment saying what it is for"
    assert sum(1 for line in text.splitlines() if "#" in line) >= 8


@pytest.mark.parametrize("path", ALL, ids=lambda p: p.name)
def test_config_validates(path: Path):
    cfg = _load(path)
    assert cfg.model.name in FAMILIES
    assert cfg.source.uri and cfg.index.uri
    if cfg.model.name == "jina-colbert-v2":
        assert cfg.outputs.mode == "multivector"
    ints = [t for t in cfg.index.tiers if t != "full"]
    assert ints == sorted(ints) and len(set(ints)) == len(ints), "tiers ascending, no repeats"
    if path.name == "quickstart.yaml":
        return
    full, matryoshka = REAL_MODELS[cfg.model.name]
    assert all(t < full for t in ints), f"tiers {ints} must be narrower than the model's {full} dims"
    if matryoshka:
        assert set(ints) <= matryoshka, f"tiers {ints} are not Matryoshka widths {sorted(matryoshka)}"
    # overrides work the way `ray job submit ... --set` passes them
    over = load_config(cfg, {"source.uri": "s3://b/c/", "index.uri": "s3://b/i"})
    assert over.source.uri == "s3://b/c/" and over.model == cfg.model


@pytest.mark.parametrize("path", ALL, ids=lambda p: p.name)
def test_config_model_section_fits_its_family(path: Path, tmp_path: Path):
    """The family accepts the config's task, pooling and dtype (constructed on a small local checkpoint)."""
    from embindex.checkpoints import resolve_model_path

    raw = yaml.safe_load(path.read_text())["model"]
    name = raw.get("name", "hf-encoder")
    local = LOCAL_CHECKPOINTS.get(name) if path.name != "quickstart.yaml" else raw["path"]
    if name == "jina-embeddings-v2":  # no fixture: the tiny JinaBERT checkpoint its model tests generate
        from test_model_jina_v2 import make_checkpoint

        local = make_checkpoint(tmp_path / "v2")
    spec = ModelSpec(name=name, path=resolve_model_path(local), dtype=raw.get("dtype", "auto"),
                     max_length=None, task=raw.get("task"), pooling=raw.get("pooling", "auto"))
    family = family_class(name)(spec)
    family.check_task(spec.task)
    info = family.info()
    assert info.dim > 0 and info.pooling  # mean / cls / last, or the family's own (ColBERT: multi_vector)


@pytest.mark.parametrize("path", RETRIEVE, ids=lambda p: p.name)
def test_retrieve_config_validates(path: Path):
    from embindex.config import load_retrieve_config

    cfg = load_retrieve_config(path)
    assert cfg.index.uri and cfg.queries.uri and cfg.output
    over = load_retrieve_config(path, {"index.uri": "s3://b/i", "rerank.depth": 20})
    assert over.index.uri == "s3://b/i" and (over.rerank is None or over.rerank.depth == 20)
