"""The two actor pools of `embindex retrieve`.

`SearchActor` holds an IndexReader (query encoder + tiers): per batch of queries it encodes them once,
runs every evaluated stage (each tier alone and rescored) and the final search, and emits the final
candidates (with their stored content when the index has it). `RerankActor` holds one reranker and
scores each query's top `depth` candidates; listwise families (jina-reranker-v3) pack a query's
candidates into one forward, pairwise ones pack the pairs of the whole batch.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pyarrow as pa

from ..config import RetrieveConfig
from ..ray_runtime import ComputeThread

CANDIDATE_FIELDS = {
    "cand_id": pa.list_(pa.string()),
    "cand_chunk": pa.list_(pa.int32()),
    "cand_start": pa.list_(pa.int32()),
    "cand_end": pa.list_(pa.int32()),
    "cand_score": pa.list_(pa.float64()),
    "cand_text": pa.list_(pa.string()),
    "cand_image": pa.list_(pa.binary()),
}
RERANK_FIELDS = {"rerank_score": pa.list_(pa.float64()), "rerank_reject": pa.list_(pa.string()),
                 "rerank_error": pa.string()}


def stage_name(dim: int, full: int, rescored: bool) -> str:
    if dim >= full:
        return f"tier {dim} (full)"
    return f"tier {dim} + rescore" if rescored else f"tier {dim}"


def search_stages(manifest: Any, cfg: RetrieveConfig, tier: int) -> tuple[list[tuple[str, int, int | None]], str]:
    """([(name, tier, rescore)] of the evaluated stages, name of the final stage). Rescore 0 is ANN alone,
    None the index's shortlist factor; the full-width tier is exact already and runs once."""
    full = manifest.dim
    final = (stage_name(tier, full, cfg.search.rescore != 0), tier, cfg.search.rescore)
    stages = {final[0]: final}
    if cfg.qrels is not None and cfg.search.evaluate_tiers:
        for t in manifest.tiers:
            stages.setdefault(stage_name(t.dim, full, False), (stage_name(t.dim, full, False), t.dim, 0))
            if t.dim < full:
                stages.setdefault(stage_name(t.dim, full, True), (stage_name(t.dim, full, True), t.dim, None))
    # narrow to wide, each tier alone before rescored
    return sorted(stages.values(), key=lambda s: (s[1], s[2] != 0)), final[0]


class SearchActor:
    """Encode queries and search them at every stage; emit the final candidates."""

    def __init__(self, cfg_json: str, version: str, stages: list[tuple[str, int, int | None]], final: str,
                 content: str, depth: int, torch_threads: int | None = None):
        self._compute = ComputeThread()
        self._compute.setup(self._setup, cfg_json, version, content, depth, torch_threads)
        self.stages, self.final = stages, final  # from `search_stages`, computed once by the driver

    def _setup(self, cfg_json: str, version: str, content: str, depth: int, torch_threads: int | None) -> None:
        import torch

        from ..search import open_index

        if torch_threads:
            torch.set_num_threads(torch_threads)
        self.cfg = RetrieveConfig.model_validate_json(cfg_json)
        ix = self.cfg.index
        self.reader = open_index(ix.uri, version=version, storage=ix.storage, model_path=ix.model_path)
        self.content = content
        self.depth = depth

    def __call__(self, batch: pa.Table) -> pa.Table:
        return self._compute.run(self._search, batch)

    def _search(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        todo = [i for i, r in enumerate(rows) if r["reject"] is None]
        k = max(self.cfg.search.k, self.depth)
        runs: list[dict[str, list[str]]] = [{} for _ in rows]
        finals: list[list[Any]] = [[] for _ in rows]
        if todo:
            encoded = self.reader.encode([rows[i]["query"] for i in todo])
            for name, tier, rescore in self.stages:
                hits = self.reader.search_encoded(encoded, k=k if name == self.final else self.cfg.search.k,
                                                  tier=tier, rescore=rescore)
                for i, h in zip(todo, hits):
                    runs[i][name] = [x.id for x in h]
                    if name == self.final:
                        finals[i] = h
        cols: dict[str, list[Any]] = {c: [] for c in CANDIDATE_FIELDS}
        for hits in finals:
            texts: list[Any] = [None] * len(hits)
            images: list[Any] = [None] * len(hits)
            if hits and self.content == "index":
                for j, doc in enumerate(self.reader.contents(hits[: self.depth])):
                    texts[j], images[j] = doc.text, doc.image
            cols["cand_id"].append([h.id for h in hits])
            cols["cand_chunk"].append([h.chunk["index"] if h.chunk else None for h in hits])
            cols["cand_start"].append([h.chunk["start"] if h.chunk else None for h in hits])
            cols["cand_end"].append([h.chunk["end"] if h.chunk else None for h in hits])
            cols["cand_score"].append([h.score for h in hits])
            cols["cand_text"].append(texts)
            cols["cand_image"].append(images)
        out = batch.append_column("runs", pa.array([json.dumps(r) for r in runs], pa.string()))
        for name, typ in CANDIDATE_FIELDS.items():
            out = out.append_column(name, pa.array(cols[name], typ))
        return out


class RerankActor:
    """Score each query's top `depth` candidates with one reranker."""

    def __init__(self, rerank_json: str, depth: int, torch_threads: int | None = None):
        self._compute = ComputeThread()
        self._compute.setup(self._setup, rerank_json, depth, torch_threads)

    def _setup(self, rerank_json: str, depth: int, torch_threads: int | None) -> None:
        import torch

        from ..config import RerankConfig
        from ..search.rerank import load_reranker

        if torch_threads:
            torch.set_num_threads(torch_threads)
        self.reranker = load_reranker(RerankConfig.model_validate_json(rerank_json))
        self.depth = depth

    def __call__(self, batch: pa.Table) -> pa.Table:
        return self._compute.run(self._rerank, batch)

    def _rerank(self, batch: pa.Table) -> pa.Table:
        from ..models.reranker import RerankDoc, RerankInputError

        rows = batch.select(["query", "reject", "cand_text", "cand_image"]).to_pylist()
        todo = [i for i, r in enumerate(rows) if r["reject"] is None and r["cand_text"]]
        requests = [(rows[i]["query"], [RerankDoc(image=img) if img is not None else RerankDoc(text=t)
                                        for t, img in zip(rows[i]["cand_text"][: self.depth],
                                                          rows[i]["cand_image"][: self.depth])])
                    for i in todo]
        scores: list[Any] = [None] * len(rows)
        rejects: list[Any] = [None] * len(rows)
        errors: list[Any] = [None] * len(rows)
        for i, res in zip(todo, self.reranker.score_many(requests)):
            if isinstance(res, RerankInputError):
                errors[i] = str(res)
            else:
                scores[i] = [None if np.isnan(s) else float(s) for s in res.scores]
                rejects[i] = res.rejects
        out = batch.drop_columns(["cand_text", "cand_image"])  # content is not needed downstream
        for name, values in (("rerank_score", scores), ("rerank_reject", rejects), ("rerank_error", errors)):
            out = out.append_column(name, pa.array(values, RERANK_FIELDS[name]))
        return out
