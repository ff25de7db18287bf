"""Search-time reranking: the funnel's top-N candidates of each query reordered by a reranker.

A candidate is what the index stored for the hit's row (`index.store_content`): the text of a document,
the span of a chunk (late or naive chunking), or the encoded image of an image row. Hits keep the
retrieval score (`retrieval_score`) next to the reranker's (`rerank_score`, which becomes `score`);
candidates the reranker cannot score (`rerank_reject` says why) follow the scored ones in retrieval order.
"""

from __future__ import annotations

import os
from typing import Any, Sequence

import yaml

from ..config import RerankConfig
from ..models.reranker import Reranker, RerankInputError, RerankScores


def rerank_config(spec: str | dict[str, Any] | RerankConfig, depth: int | None = None) -> RerankConfig:
    """A RerankConfig from a YAML file (its fields, or a `rerank:` section), a checkpoint path/URI, or a dict;
    `depth` overrides the configured one."""
    if isinstance(spec, RerankConfig):
        cfg = spec
    elif isinstance(spec, dict):
        cfg = RerankConfig.model_validate(spec)
    elif spec.endswith((".yaml", ".yml")) and os.path.isfile(spec):
        with open(spec) as f:
            data = yaml.safe_load(f) or {}
        cfg = RerankConfig.model_validate(data.get("rerank", data))
    else:
        cfg = RerankConfig(path=spec)
    return cfg.model_copy(update={"depth": depth}) if depth else cfg


def load_reranker(cfg: RerankConfig) -> Reranker:
    """Resolve the checkpoint (local, builtin or object storage) and load the reranker family."""
    from ..checkpoints import resolve_model_path
    from ..models.registry import load_reranker as load

    local = resolve_model_path(cfg.path, cfg.storage_options(), cfg.cache_dir)
    return load(cfg.name, local, device=cfg.device, dtype=cfg.dtype, force_dtype=cfg.force_dtype, **cfg.options)


def apply_scores(hits: Sequence[Any], result: RerankScores | RerankInputError, k: int) -> list[Any]:
    """Reorder a query's hits by the reranker's result (or mark them all when the query failed)."""
    for h in hits:
        h.retrieval_score = h.score
    if isinstance(result, RerankInputError):
        for h in hits:
            h.rerank_reject = str(result)
        return list(hits[:k])
    out = []
    for i in result.ranking()[:k]:
        h = hits[int(i)]
        h.rerank_reject = result.rejects[int(i)]
        if h.rerank_reject is None:
            h.rerank_score = h.score = float(result.scores[int(i)])
        out.append(h)
    return out
