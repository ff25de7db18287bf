"""Model families by name (`model.name` in a job config). Imports are lazy: a family's module loads
only when it is asked for."""

from __future__ import annotations

import importlib

from .base import ModelError, ModelFamily, ModelSpec

# name -> "module:Class" under embindex.models
FAMILIES: dict[str, str] = {
    "hf-encoder": "hf_encoder:HFEncoderFamily",
    "jina-embeddings-v3": "jina_embeddings_v3:JinaEmbeddingsV3Family",
    "jina-colbert-v2": "jina_colbert_v2:JinaColbertV2Family",
    "jina-code-embeddings": "jina_code_embeddings:JinaCodeEmbeddingsFamily",
    "jina-embeddings-v2": "jina_embeddings_v2:JinaEmbeddingsV2Family",
    "jina-clip-v2": "jina_clip_v2:JinaClipV2Family",
    "jina-embeddings-v4": "jina_embeddings_v4:JinaEmbeddingsV4Family",
}


def family_class(name: str) -> type[ModelFamily]:
    try:
        target = FAMILIES[name]
    except KeyError:
        raise ModelError(f"unknown model family {name!r}; registered: {sorted(FAMILIES)}") from None
    module, cls = target.split(":")
    return getattr(importlib.import_module(f"embindex.models.{module}"), cls)


def load_family(spec: ModelSpec) -> ModelFamily:
    """Validate the checkpoint at `spec.path` for the family `spec.name` and return the family."""
    return family_class(spec.name)(spec)


# reranker name -> "module:Class" under embindex.models
RERANKERS: dict[str, str] = {
    "jina-reranker-v2": "jina_reranker_v2:JinaRerankerV2",
    "jina-reranker-v3": "jina_reranker_v3:JinaRerankerV3",
    "jina-reranker-m0": "jina_reranker_m0:JinaRerankerM0",
}


# the `architectures` of a reranker checkpoint's config.json -> its family
RERANKER_ARCHITECTURES: dict[str, str] = {
    "XLMRobertaForSequenceClassification": "jina-reranker-v2",
    "JinaForRanking": "jina-reranker-v3",
    "JinaVLForRanking": "jina-reranker-m0",
}


def infer_reranker(path: str) -> str:
    """The reranker family of the checkpoint at `path`, from its config.json `architectures`."""
    from .checkpoint_files import read_config

    archs = read_config(path).get("architectures") or []
    for arch in archs:
        if arch in RERANKER_ARCHITECTURES:
            return RERANKER_ARCHITECTURES[arch]
    raise ModelError(f"{path}: architectures {archs} name no known reranker; set the reranker's name "
                     f"(one of {sorted(RERANKERS)})")


def load_reranker(name: str | None, path: str, device: str | None = None, dtype: str = "auto", **options):
    """The reranker family `name` (None: inferred from config.json) loaded from the local directory `path`."""
    name = name or infer_reranker(path)
    try:
        target = RERANKERS[name]
    except KeyError:
        raise ModelError(f"unknown reranker {name!r}; registered: {sorted(RERANKERS)}") from None
    module, cls = target.split(":")
    return getattr(importlib.import_module(f"embindex.models.{module}"), cls)(path, device=device, dtype=dtype,
                                                                              **options)


# generator name -> "module:Class" under embindex.models (the preprocessing stages' models)
GENERATORS: dict[str, str] = {
    "readerlm-v2": "readerlm_v2:ReaderLMV2",
    "jina-vlm": "jina_vlm:JinaVLM",
}


def load_generator(name: str, path: str, device: str | None = None, dtype: str = "auto", force_dtype: bool = False,
                   **options):
    """The generator family `name` loaded from the local directory `path`."""
    try:
        target = GENERATORS[name]
    except KeyError:
        raise ModelError(f"unknown generator {name!r}; registered: {sorted(GENERATORS)}") from None
    module, cls = target.split(":")
    return getattr(importlib.import_module(f"embindex.models.{module}"), cls)(
        path, device=device, dtype=dtype, force_dtype=force_dtype, **options)
