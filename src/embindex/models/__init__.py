"""Model families: pure torch/transformers code that loads real checkpoints from a local directory."""

from .base import (
    ModelError,
    ModelFamily,
    ModelInfo,
    ModelSpec,
    Role,
    TextEncoder,
    TextTokenizer,
)
from .registry import FAMILIES, RERANKERS, family_class, load_family, load_reranker
from .reranker import Reranker, RerankDoc, RerankInputError, RerankScores

__all__ = [
    "FAMILIES",
    "RERANKERS",
    "Reranker",
    "RerankDoc",
    "RerankInputError",
    "RerankScores",
    "ModelError",
    "ModelFamily",
    "ModelInfo",
    "ModelSpec",
    "Role",
    "TextEncoder",
    "TextTokenizer",
    "family_class",
    "load_family",
    "load_reranker",
]
