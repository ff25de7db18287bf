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
import pyarrow as pa

from ..index import tiers
from ..index.manifest import Manifest
from ..index.publish import latest_version, read_manifest
from ..index.multivector import maxsim_scores, shard_token_vectors, token_candidates
from ..index.shards import read_table, vectors_of
from ..index.tombstones import read_tombstones, tombstone_mask
from ..storage import Storage, StorageOptions
from . import funnel


@dataclass
class Hit:
    id: str
    score: float
    meta: dict[str, Any] = field(default_factory=dict)
    chunk: dict[str, Any] | None = None  # chunk index and char offsets, for chunked outputs
    modality: str | None = None  # "text" | "image"

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "score": self.score, "chunk": self.chunk, "modality": self.modality,
                "meta": self.meta}


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
        self._chunks: list[dict | None] = []
        self._modalities: np.ndarray | None = None
        self._hidden: dict[str, np.ndarray] = {}  # modality -> rows a search with that filter skips
        self._token_vectors: list[np.ndarray] | None = None
        self._token_index = None
        self._tombstones: np.ndarray | None = None
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
        """The tier's search object: a FAISS index, or funnel.ShardedIndex (layout in the manifest)."""
        if dim not in self._tiers:
            self._tiers[dim] = funnel.open_tier(self.storage, self.manifest.tier(dim))
        return self._tiers[dim]

    def _load_docs(self) -> None:
        """ids, metadata and chunk offsets of every row (not the vectors: see `vectors`)."""
        ids: list[str] = []
        metas: list[str | None] = []
        chunks: list[dict | None] = []
        modalities: list[str | None] = []
        for shard in self.manifest.shards:
            try:
                t = read_table(self.storage, shard.path, columns=["id", "meta", "chunk", "start", "end", "modality"])
                modalities.extend(t.column("modality").to_pylist())
            except pa.ArrowInvalid:  # a shard written before image support: text rows
                t = read_table(self.storage, shard.path, columns=["id", "meta", "chunk", "start", "end"])
                modalities.extend(["text"] * t.num_rows)
            ids.extend(t.column("id").to_pylist())
            metas.extend(t.column("meta").to_pylist())
            chunks.extend(None if c is None else {"index": c, "start": s, "end": e} for c, s, e in
                          zip(*(t.column(n).to_pylist() for n in ("chunk", "start", "end"))))
        self._docs = (ids, metas)
        self._chunks = chunks
        self._modalities = np.array(modalities, dtype=object)

    @property
    def vectors(self) -> np.ndarray:
        """Full-width vectors of every row, in ordinal order (loaded on first use)."""
        if self._vectors is None:
            vecs = [vectors_of(read_table(self.storage, s.path, columns=["vector"])) for s in self.manifest.shards]
            self._vectors = np.concatenate(vecs) if vecs else np.zeros((0, self.manifest.dim), np.float32)
        return self._vectors

    @property
    def ids(self) -> list[str]:
        if self._docs is None:
            self._load_docs()
        return self._docs[0]

    def token_vectors(self) -> list[np.ndarray]:
        """Stored token vectors of every row (multi-vector indexes), in ordinal order."""
        if self._token_vectors is None:
            mats: list[np.ndarray] = []
            for shard in self.manifest.shards:
                mats.extend(shard_token_vectors(read_table(self.storage, shard.path, columns=["token_vectors"])))
            self._token_vectors = mats
        return self._token_vectors

    # -- search ---------------------------------------------------------------------------------
    def encode_queries(self, queries: Sequence[str]) -> np.ndarray:
        return self.embedder.encode(list(queries), role="query", task=self.manifest.model.query_task)

    def encode_image_queries(self, images: Sequence[Any]) -> np.ndarray:
        """Query images (PIL images, encoded bytes or local paths) -> unit vectors, with the query task."""
        self._check_images()
        return self.embedder.encode_images(list(images), task=self.manifest.model.query_task)

    def _check_images(self) -> None:
        if "image" not in self.manifest.model.modalities:
            raise ValueError(f"index model {self.manifest.model.name!r} takes no images; query with text")

    def search(self, queries: Sequence[str] | str, k: int = 10, tier: int | None = None,
               rescore: int | None = None, modality: str | None = None) -> list[list[Hit]]:
        """Hits per text query. `tier`: width of the ANN tier (default the narrowest); `rescore`: shortlist
        factor (default from the manifest's build config; 0 or 1 disables full-width rescoring);
        `modality`: only "text" or only "image" rows of a mixed index. Chunked indexes return documents
        scored by their best chunk; multi-vector indexes rank by MaxSim."""
        if isinstance(queries, str):
            queries = [queries]
        if self.manifest.outputs.get("mode", "document") == "multivector":
            q = self.embedder.encode_multi(list(queries), role="query", task=self.manifest.model.query_task)
            return self._search_multivector(*q, k=k, tier=tier, rescore=rescore, modality=modality)
        return self._search_single(self.encode_queries(queries), k, tier, rescore, modality)

    def search_images(self, images: Sequence[Any] | Any, k: int = 10, tier: int | None = None,
                      rescore: int | None = None, modality: str | None = None) -> list[list[Hit]]:
        """Hits per query image (PIL image, encoded bytes or local path): image -> image search over an
        image index, or image -> text over a text index of the same multimodal model."""
        if not isinstance(images, (list, tuple)):
            images = [images]
        self._check_images()
        if self.manifest.outputs.get("mode", "document") == "multivector":
            pixels = self.embedder.prepare_images(images)
            single, toks = self.embedder.embed_images(pixels, self.manifest.model.query_task, tokens=True)
            return self._search_multivector(single, toks or [], k=k, tier=tier, rescore=rescore, modality=modality)
        return self._search_single(self.encode_image_queries(images), k, tier, rescore, modality)

    def _search_single(self, vectors: np.ndarray, k: int, tier: int | None, rescore: int | None,
                       modality: str | None) -> list[list[Hit]]:
        if self.manifest.outputs.get("mode", "document") in ("late", "naive"):
            return self._search_chunks(vectors, k, tier, rescore, modality)
        return self.search_vectors(vectors, k=k, tier=tier, rescore=rescore, modality=modality)

    def _search_chunks(self, vectors: np.ndarray, k: int, tier: int | None, rescore: int | None,
                       modality: str | None = None) -> list[list[Hit]]:
        """Document-level hits over chunk rows: widen the row shortlist until every query has k distinct
        documents (or every row was fetched), so one long document cannot crowd the others out."""
        total = self.manifest.counts.vectors
        fetch = k * CHUNKS_PER_HIT
        while True:
            rows = self.search_vectors(vectors, k=min(fetch, total), tier=tier, rescore=rescore, modality=modality)
            docs = [best_chunk_per_document(r, k) for r in rows]
            if fetch >= total or all(len(d) >= k for d in docs):
                return docs
            fetch *= 4

    def search_rows(self, query_vectors: np.ndarray, k: int = 10, tier: int | None = None,
                    rescore: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(scores, row ordinals) per query: ANN on the tier, then full-width rescoring of k * rescore."""
        entry = self.manifest.tier(tier)
        if rescore is None:
            rescore = int(self.manifest.config.get("index", {}).get("rescore", 10))
        q = np.ascontiguousarray(query_vectors, dtype=np.float32)
        m = self.manifest
        # full-width vectors: in memory when loaded or small, else only the shortlisted rows from Parquet
        full = funnel.ArrayVectors(self._vectors) if self._vectors is not None else funnel.full_width_source(
            self.storage, [s.path for s in m.shards], [s.rows for s in m.shards], m.dim, load=lambda: self.vectors)
        return funnel.tier_funnel(self.tier_index(entry.dim), entry, m.dim, rescore, full).search(q, k)

    def hits(self, scores: np.ndarray, ordinals: np.ndarray) -> list[Hit]:
        """Hits for row ordinals (-1 entries skipped)."""
        self.ids  # noqa: B018 - make sure ids/meta are loaded
        doc_ids, metas = self._docs
        return [Hit(id=doc_ids[i], score=float(s), meta=json.loads(metas[i]) if metas[i] else {},
                    chunk=self._chunks[i], modality=self._modalities[i]) for s, i in zip(scores, ordinals) if i >= 0]

    @property
    def tombstones(self) -> np.ndarray:
        """Sorted ordinals of rows this version hides (replaced or deleted documents)."""
        if self._tombstones is None:
            self._tombstones = read_tombstones(self.storage, self.manifest)
        return self._tombstones

    @property
    def stored_rows(self) -> int:
        """Rows in the shards, tombstoned ones included (FAISS ids run over all of them)."""
        return sum(s.rows for s in self.manifest.shards)

    def hidden_rows(self, modality: str | None = None) -> np.ndarray:
        """Sorted ordinals that searches skip: tombstoned rows, and rows of another modality."""
        if modality is None:
            return self.tombstones
        if modality not in ("text", "image"):
            raise ValueError(f"modality must be 'text' or 'image', got {modality!r}")
        if modality not in self._hidden:  # computed once per reader, not per query
            self.ids  # noqa: B018 - modalities load with the ids
            other = np.flatnonzero(self._modalities != modality)
            self._hidden[modality] = np.union1d(self.tombstones, other).astype(np.int64)
        return self._hidden[modality]

    def search_vectors(self, query_vectors: np.ndarray, k: int = 10, tier: int | None = None,
                       rescore: int | None = None, modality: str | None = None) -> list[list[Hit]]:
        """Row hits for unit query vectors; the shortlist widens until k visible rows are found."""
        total = self.stored_rows
        if total == 0:
            return [[] for _ in range(len(query_vectors))]
        hidden = self.hidden_rows(modality)
        fetch = min(total, k + min(int(hidden.size), 10 * k))  # over-fetch, then drop hidden rows
        while True:
            scores, ids = self.search_rows(query_vectors, k=fetch, tier=tier, rescore=rescore)
            visible = [~tombstone_mask(i, hidden) & (i >= 0) for i in ids]
            if fetch >= total or all(int(v.sum()) >= k for v in visible):
                return [self.hits(s[v][:k], i[v][:k]) for s, i, v in zip(scores, ids, visible)]
            fetch = min(total, fetch * 4)

    def search_multivector(self, queries: Sequence[str], k: int = 10, tier: int | None = None,
                           rescore: int | None = None, token_k: int | None = None,
                           modality: str | None = None) -> list[list[Hit]]:
        """Text queries against a multi-vector index (see `_search_multivector`)."""
        q = self.embedder.encode_multi(list(queries), role="query", task=self.manifest.model.query_task)
        return self._search_multivector(*q, k=k, tier=tier, rescore=rescore, token_k=token_k, modality=modality)

    def _search_multivector(self, single: np.ndarray, q_tokens: list[np.ndarray], k: int = 10,
                            tier: int | None = None, rescore: int | None = None, token_k: int | None = None,
                            modality: str | None = None) -> list[list[Hit]]:
        """Candidates from the token index (`token_k` nearest stored tokens per query token; default from
        the manifest) or the single-vector tier (k * rescore), ranked by MaxSim."""
        mv = self.manifest.outputs["multivector"]
        stored = self.token_vectors()
        if rescore is None:
            rescore = int(self.manifest.config.get("index", {}).get("rescore", 10))
        token_k = token_k or int(mv.get("token_k", 64))
        hidden = self.hidden_rows(modality)
        out = []
        visible = self.stored_rows - int(hidden.size)
        for s, q in zip(single, q_tokens):
            if mv.get("token_index"):
                if self._token_index is None:
                    self._token_index = tiers.deserialize(self.storage.read_bytes(mv["token_index"]["file"]))
                tk = token_k
                while True:  # widen until k visible documents are candidates (or every token was fetched)
                    cand = token_candidates(self._token_index, q, tk)
                    cand = cand[~tombstone_mask(cand, hidden)]
                    if len(cand) >= min(k, visible) or tk >= self._token_index.ntotal:
                        break
                    tk *= 4
            else:
                fetch = min(self.stored_rows, k * max(rescore, 1) + int(hidden.size))
                _, rows = self.search_rows(s[None, :], k=fetch, tier=tier, rescore=1)
                cand = rows[0][rows[0] >= 0]
                cand = cand[~tombstone_mask(cand, hidden)]
            scores = maxsim_scores(q, [stored[i] for i in cand])
            order = np.argsort(-scores, kind="stable")[:k]
            out.append(self.hits(scores[order], cand[order]))
        return out


CHUNKS_PER_HIT = 8  # rows fetched per requested hit before grouping chunks by document


def best_chunk_per_document(hits: list[Hit], k: int) -> list[Hit]:
    """Document-level hits: each document scored by its best chunk, whose offsets the hit carries."""
    best: dict[str, Hit] = {}
    for h in hits:
        if h.id not in best or h.score > best[h.id].score:
            best[h.id] = h
    return sorted(best.values(), key=lambda h: -h.score)[:k]


def open_index(uri: str, version: str | None = None, storage: dict[str, Any] | None = None,
               **kwargs: Any) -> IndexReader:
    """Open the latest published version of the index at `uri` (local path or s3:// URI)."""
    return IndexReader(uri, version=version, storage=storage, **kwargs)
