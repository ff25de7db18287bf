"""The reranker interface: a query and its candidates -> one relevance score per candidate.

Pure torch/transformers like the encoder families: nothing here knows about Ray, storage or the index.
A family implements `_score` for valid inputs; `score` handles what is common to every family:
candidates without content, images that do not decode, modalities the model does not take. Those
become per-candidate rejects (NaN score + reason), never an exception that loses the other
candidates. A query the model cannot take (empty, wrong modality) raises `RerankInputError`.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar, Sequence

import numpy as np
import torch

from .base import ModelError
from .checkpoint_files import checkpoint_hash
from .device import pick_device, resolve_dtype
from .images import load_upright_rgb


class RerankInputError(ValueError):
    """A query the reranker cannot score (the caller reports it per query)."""


@dataclass(frozen=True)
class RerankDoc:
    """A query or a candidate: text, or an image (PIL image, encoded bytes, or a local path)."""

    text: str | None = None
    image: Any = None

    @property
    def modality(self) -> str:
        return "image" if self.image is not None else "text"


@dataclass
class RerankScores:
    """Scores of one query's candidates, in input order; NaN where `rejects[i]` gives the reason."""

    scores: np.ndarray  # float64 [n]
    rejects: list[str | None]

    def ranking(self) -> np.ndarray:
        """Candidate positions by descending score; rejected candidates last (in input order)."""
        s = np.where(np.isnan(self.scores), -np.inf, self.scores)
        return np.argsort(-s, kind="stable")


@dataclass
class RerankerInfo:
    family: str
    checkpoint: str  # sha256 of config, tokenizer and weights
    max_length: int
    modalities: list[str]
    score: str  # what the score is, e.g. "sigmoid(logit)", "cosine"
    extra: dict[str, Any] = field(default_factory=dict)


def as_doc(x: str | RerankDoc | Any) -> RerankDoc:
    """A text string, a RerankDoc, or an image (PIL image / bytes) -> RerankDoc."""
    if isinstance(x, RerankDoc):
        return x
    if isinstance(x, str):
        return RerankDoc(text=x)
    return RerankDoc(image=x)


class Reranker(ABC):
    """A registered reranker family loaded from a local checkpoint directory."""

    name: ClassVar[str]
    modalities: ClassVar[tuple[str, ...]] = ("text",)
    fp16_safe: ClassVar[bool] = True  # False: activations overflow float16's range (Qwen-based decoders)

    def __init__(self, path: str, device: str | torch.device | None = None, dtype: str = "auto",
                 force_dtype: bool = False):
        if not os.path.isdir(path):
            raise ModelError(f"reranker path {path!r} is not a directory")
        if dtype == "float16" and not self.fp16_safe and not force_dtype:
            raise ModelError(f"reranker {self.name!r} overflows in float16; use bfloat16 or float32, or set "
                             "force_dtype: true")
        self.path = path
        self.device = pick_device(device)
        self.dtype = resolve_dtype(dtype, self.device)

    def check_options(self, options: dict[str, Any], known: Any) -> None:
        """ModelError for options the family does not take."""
        unknown = sorted(set(options) - set(known))
        if unknown:
            raise ModelError(f"{self.name}: unknown options {unknown}; known: {sorted(known)}")

    @abstractmethod
    def info(self) -> RerankerInfo: ...

    @abstractmethod
    def _score(self, query: RerankDoc, docs: list[RerankDoc]) -> np.ndarray:
        """Scores (float64 [n]) of valid candidates: non-empty text, or a decoded RGB PIL image."""

    def _checkpoint_hash(self) -> str:
        return checkpoint_hash(self.path)

    def _prepare(self, doc: RerankDoc) -> RerankDoc | str:
        """The candidate ready for `_score`, or the reason it cannot be scored."""
        if doc.image is not None:
            if "image" not in self.modalities:
                return f"unsupported_modality: {self.name} takes no images"
            try:
                return RerankDoc(image=load_upright_rgb(doc.image))
            except Exception as e:  # noqa: BLE001 - any decoder failure is this candidate's reject
                return f"image_decode_error: {type(e).__name__}: {e}"[:300]
        if doc.text is None or not doc.text.strip():
            return "empty_content"
        return doc

    def score(self, query: str | RerankDoc | Any, docs: Sequence[str | RerankDoc | Any]) -> RerankScores:
        """One query against its candidates. Raises RerankInputError for a query it cannot take."""
        q = self._prepare(as_doc(query))
        if isinstance(q, str):
            raise RerankInputError(f"query: {q}")
        prepared = [self._prepare(as_doc(d)) for d in docs]
        valid = [i for i, d in enumerate(prepared) if not isinstance(d, str)]
        scores = np.full(len(prepared), np.nan)
        if valid:
            scores[valid] = self._score(q, [prepared[i] for i in valid])
        return RerankScores(scores, [d if isinstance(d, str) else None for d in prepared])

    def score_many(self, requests: Sequence[tuple[Any, Sequence[Any]]]) -> list[RerankScores | RerankInputError]:
        """Several queries with their candidates; a query that cannot be scored gives its error in place.
        Families that batch across queries override this."""
        out: list[RerankScores | RerankInputError] = []
        for query, docs in requests:
            try:
                out.append(self.score(query, docs))
            except RerankInputError as e:
                out.append(e)
        return out
