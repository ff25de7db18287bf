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
from .registry import FAMILIES, family_class, load_family

__all__ = [
    "FAMILIES",
    "ModelError",
    "ModelFamily",
    "ModelInfo",
    "ModelSpec",
    "Role",
    "TextEncoder",
    "TextTokenizer",
    "family_class",
    "load_family",
]
