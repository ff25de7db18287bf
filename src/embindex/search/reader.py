"""IndexReader: open a published version and search it.

Funnel: ANN on the chosen tier -> shortlist of k * rescore -> rescored with the full-width vectors
from the Parquet shards -> top k hits with id, score and metadata. Queries are encoded in-process
through `models/` with the query role (and query task) the manifest records.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from ..index import tiers
from ..index.manifest import Manifest
from ..index.publish import latest_version, read_manifest
from ..index.shards import read_table, vectors_of
from ..storage import Storage, StorageOptions


@dataclass
class Hit:
    id: str
    score: float
    meta: dict[str, Any] = field(default_factory=dict)
    chunk: dict[str, Any] | None = None  # chunk index and char offsets, for chunked outputs

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "score": self.score, "chunk": self.chunk, "meta": self.meta}


class IndexReader:
    """A read-only view of one version of an index (default: the latest published)."""

    def __init__(self, uri: str, version: str | None = None, storage: dict[str, Any] | None = None,
                 model_path: str | None = None, device: str | None = None):
        self.storage = Storage(uri, StorageOptions.from_dict(storage))
        self.version = version or latest_version(self.storage)
        self.manifest: Manifest = read_manifest(self.storage, self.version)
        self._model_path = model_path
        self._device = device
        self._embedder = None
        self._tiers: dict[int, Any] = {}
        self._docs = None  # (ids, meta) of all rows in ordinal order
        self._vectors: np.ndarray | None = None

    # -- lazy loading ---------------------------------------------------------------------------
    @property
    def embedder(self):
        if self._embedder is None:
            from ..checkpoints import resolve_model_path
            from ..models import ModelSpec, load_family
            from ..models.embedder import Embedder

            m = self.manifest.model
            cfg = self.manifest.config.get("model", {})
            path = resolve_model_path(self._model_path or m.path, self.storage.options)
            spec = ModelSpec(name=m.name, path=path, dtype=cfg.get("dtype", "auto"),
                             max_length=cfg.get("max_length"), task=m.task, pooling=cfg.get("pooling", "auto"))
            self._embedder = Embedder(load_family(spec), device=self._device)
        return self._embedder

    def tier_index(self, dim: int):
        if dim not in self._tiers:
            entry = self.manifest.tier(dim)
            self._tiers[dim] = tiers.deserialize(self.storage.read_bytes(entry.files[0]))
        return self._tiers[dim]

    def _load_docs(self) -> None:
        ids: list[str] = []
        metas: list[str | None] = []
        vecs = []
        for shard in self.manifest.shards:
            t = read_table(self.storage, shard.path, columns=["id", "meta", "vector"])
            ids.extend(t.column("id").to_pylist())
            metas.extend(t.column("meta").to_pylist())
            vecs.append(vectors_of(t))
        self._docs = (ids, metas)
        self._vectors = np.concatenate(vecs) if vecs else np.zeros((0, self.manifest.dim), np.float32)

    @property
    def vectors(self) -> np.ndarray:
        """Full-width vectors of every row, in ordinal order."""
        if self._vectors is None:
            self._load_docs()
        return self._vectors

    @property
    def ids(self) -> list[str]:
        if self._docs is None:
            self._load_docs()
        return self._docs[0]

    # -- search ---------------------------------------------------------------------------------
    def encode_queries(self, queries: Sequence[str]) -> np.ndarray:
        return self.embedder.encode(list(queries), role="query", task=self.manifest.model.query_task)

    def search(self, queries: Sequence[str] | str, k: int = 10, tier: int | None = None,
               rescore: int | None = None) -> list[list[Hit]]:
        """Hits per query. `tier`: width of the ANN tier (default the narrowest); `rescore`: shortlist
        factor (default from the manifest's build config; 0 or 1 disables full-width rescoring)."""
        if isinstance(queries, str):
            queries = [queries]
        return self.search_vectors(self.encode_queries(queries), k=k, tier=tier, rescore=rescore)

    def search_vectors(self, query_vectors: np.ndarray, k: int = 10, tier: int | None = None,
                       rescore: int | None = None) -> list[list[Hit]]:
        if self.manifest.counts.vectors == 0:
            return [[] for _ in range(len(query_vectors))]
        entry = self.manifest.tier(tier)
        if rescore is None:
            rescore = int(self.manifest.config.get("index", {}).get("rescore", 10))
        index = self.tier_index(entry.dim)
        q = np.ascontiguousarray(query_vectors, dtype=np.float32)
        if rescore > 1 and entry.dim < self.manifest.dim:
            _, shortlist = tiers.search_tier(index, q, k * rescore)
            scores, ids = tiers.rescore(self.vectors, tiers.truncate(q, self.manifest.dim), shortlist, k)
        else:
            scores, ids = tiers.search_tier(index, q, k)
        self.ids  # noqa: B018 - make sure ids/meta are loaded
        doc_ids, metas = self._docs
        out = []
        for row_s, row_i in zip(scores, ids):
            hits = []
            for s, i in zip(row_s, row_i):
                if i < 0:
                    continue
                meta = json.loads(metas[i]) if metas[i] else {}
                hits.append(Hit(id=doc_ids[i], score=float(s), meta=meta))
            out.append(hits)
        return out


def open_index(uri: str, version: str | None = None, storage: dict[str, Any] | None = None,
               **kwargs: Any) -> IndexReader:
    """Open the latest published version of the index at `uri` (local path or s3:// URI)."""
    return IndexReader(uri, version=version, storage=storage, **kwargs)
