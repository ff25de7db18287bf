"""IndexReader: open a published version and search it.

Funnel: ANN on the chosen tier (default: the narrowest whose build-time rescored recall@10 reaches
`search.recall_target`) -> shortlist of k * rescore -> rescored with the full-width vectors of only the
shortlisted rows, read by row offset from each part's float16 row matrix -> top k hits. A search reads what its hits need: ids,
metadata and chunk offsets (and MaxSim's token vectors) of the hit / candidate rows only, from the row
groups holding them (`ShardRows`: ordinal -> (shard, row) from the manifest's row counts, each
Parquet footer read once). Tombstoned rows and rows of another modality are skipped inside the FAISS
search (search-time selectors, see index/selectors.py); tiers FAISS cannot filter are over-fetched instead.
Tier files of a remote index come from a persistent local cache shared by readers (index/tier_io.py).
Queries are encoded in-process through `models/` with the query role (and query task) the manifest records.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Sequence

from ..index.faiss_lib import faiss
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ..config import SearchConfig
from ..index.manifest import Manifest
from ..index.multivector import maxsim_scores, open_token_index, shard_token_vectors
from ..index.publish import latest_version, read_manifest
from ..index.quality import narrowest_tier_reaching
from ..index.shards import CONTENT_COLUMN, CONTENT_IMAGE_COLUMN, read_table, vectors_of
from ..index.tier_io import TierCache
from ..index.tombstones import read_tombstones, tombstone_mask
from ..index.vector_io import ShardRows
from ..storage import Storage, StorageOptions
from ..index import funnel, rescore_vectors, tier_search
from ..index.selectors import RowFilter, search_parameters, supports_filter

DOC_COLUMNS = ["id", "meta", "chunk", "start", "end", "modality"]
DOC_CACHE_ROWS = 4096  # decoded hit rows a reader keeps (warm queries share many hits)


@dataclass
class Hit:
    id: str
    score: float
    meta: dict[str, Any] = field(default_factory=dict)
    chunk: dict[str, Any] | None = None  # chunk index and char offsets, for chunked outputs
    modality: str | None = None  # "text" | "image"
    row: int | None = None  # row ordinal in the version (what content lookups use)
    retrieval_score: float | None = None  # set when reranked: the funnel's score (`score` is the reranker's)
    rerank_score: float | None = None
    rerank_reject: str | None = None  # why the reranker could not score this candidate

    def to_dict(self) -> dict[str, Any]:
        out = {"id": self.id, "score": self.score, "chunk": self.chunk, "modality": self.modality,
               "meta": self.meta}
        if self.retrieval_score is not None:
            out.update(retrieval_score=self.retrieval_score, rerank_score=self.rerank_score,
                       rerank_reject=self.rerank_reject)
        return out


def recall_target_of(manifest: Manifest) -> float:
    """`search.recall_target` of the config the version was built with, else the default."""
    stored = (manifest.config or {}).get("search") or {}
    return float(stored.get("recall_target", SearchConfig().recall_target))


def default_tier(manifest: Manifest, recall_target: float) -> int:
    """Width of the narrowest tier whose build-time rescored recall@k (manifest.quality) reaches
    `recall_target`; the widest tier when none does (or the manifest has no quality numbers)."""
    found = narrowest_tier_reaching(manifest, recall_target, rescored=True)
    return found if found is not None else max(t.dim for t in manifest.tiers)


class IndexReader:
    """A read-only view of one version of an index (default: the latest published).

    `recall_target`: default-tier choice (see `default_tier`; default: the version's
    `search.recall_target`, else 0.99). `cache_dir` / `cache_max_bytes`: the local tier-file cache of
    remote indexes (default $EMBINDEX_CACHE or ~/.cache/embindex, $EMBINDEX_CACHE_MAX_MB or 10 GiB)."""

    def __init__(self, uri: str, version: str | None = None, storage: dict[str, Any] | None = None,
                 model_path: str | None = None, device: str | None = None, recall_target: float | None = None,
                 cache_dir: str | None = None, cache_max_bytes: int | None = None):
        self.storage = Storage(uri, StorageOptions.from_dict(storage))
        self.version = version or latest_version(self.storage)
        self.manifest: Manifest = read_manifest(self.storage, self.version)
        self.recall_target = recall_target_of(self.manifest) if recall_target is None else float(recall_target)
        self.tier_cache = TierCache(cache_dir, cache_max_bytes)
        m = self.manifest
        self.rows = ShardRows(self.storage, [s.path for s in m.shards], [s.rows for s in m.shards])
        self._model_path = model_path
        self._device = device
        self._embedder = None
        self._tiers: dict[int, Any] = {}
        self._full: rescore_vectors.VectorSource | None = None  # full-width rows of the shortlists (row-group cache)
        self._doc_rows: OrderedDict[int, dict[str, Any]] = OrderedDict()
        self._docs = None  # (ids, meta) of all rows, only when `ids` is asked for
        self._chunks: list[dict | None] = []
        self._modalities: np.ndarray | None = None
        self._is_image: np.ndarray | None = None
        self._hidden: dict[str, np.ndarray] = {}  # modality -> rows a search with that filter skips
        self._filters: dict[str | None, RowFilter] = {}
        self._rerankers: dict[str, Any] = {}
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
                             max_length=cfg.get("max_length"), task=m.task, pooling=cfg.get("pooling", "auto"),
                             force_dtype=bool(cfg.get("force_dtype", False)))
            self._embedder = Embedder(load_family(spec), device=self._device)
        return self._embedder

    @property
    def default_tier(self) -> int:
        """The tier a search without `tier=` uses (see `default_tier`)."""
        return default_tier(self.manifest, self.recall_target)

    def _tier_dim(self, tier: int | None) -> int:
        return self.default_tier if tier is None else int(tier)

    def tier_index(self, dim: int):
        """The tier's FAISS index (a `faiss.IndexShards` for a tier of several files, see tier_search.open_tier)."""
        if dim not in self._tiers:
            self._tiers[dim] = tier_search.open_tier(self.storage, self.manifest.tier(dim), self.tier_cache)
        return self._tiers[dim]

    def _load_docs(self) -> None:
        """ids, metadata and chunk offsets of every row (for `ids`; searches never need it)."""
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
        """Full-width vectors of every row, in ordinal order (loaded on first use; searches read only
        their shortlists' rows)."""
        if self._vectors is None:
            vecs = [vectors_of(read_table(self.storage, s.path, columns=["vector"])) for s in self.manifest.shards]
            self._vectors = np.concatenate(vecs) if vecs else np.zeros((0, self.manifest.dim), np.float32)
        return self._vectors

    @property
    def ids(self) -> list[str]:
        """Ids of every row in ordinal order (reads every shard's id and metadata; searches do not)."""
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

    def token_vectors_of(self, ordinals: np.ndarray) -> list[np.ndarray]:
        """Token vectors of some rows (in the order given), read from the row groups holding them."""
        if self._token_vectors is not None:
            return [self._token_vectors[i] for i in ordinals]
        return self.rows.gather(ordinals, ["token_vectors"], shard_token_vectors)

    @property
    def full_width(self) -> rescore_vectors.VectorSource:
        """What rescoring reads: vectors already in memory, else only the shortlisted rows: from each
        part's row matrix by offset, or (parts written without one) from Parquet, their row groups kept
        in an LRU cache of READER_GROUP_CACHE_BYTES."""
        if self._vectors is not None:
            return rescore_vectors.ArrayVectors(self._vectors)
        if self._full is None:
            m = self.manifest
            self._full = rescore_vectors.ParquetVectors(
                self.storage, self.rows.paths, [s.rows for s in m.shards], m.dim,
                group_cache_bytes=rescore_vectors.READER_GROUP_CACHE_BYTES, rows=self.rows,
                vector_files=[s.vectors for s in m.shards])
        return self._full

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
               rescore: int | None = None, modality: str | None = None, rerank: Any = None,
               rerank_depth: int | None = None) -> list[list[Hit]]:
        """Hits per text query. `tier`: width of the ANN tier (default `default_tier`); `rescore`: shortlist
        factor (default from the manifest's build config; 0 or 1 disables full-width rescoring);
        `modality`: only "text" or only "image" rows of a mixed index. Chunked indexes return documents
        scored by their best chunk; multi-vector indexes rank by MaxSim. `rerank`: a reranker (a Reranker,
        RerankConfig, dict, YAML file or checkpoint path) that reorders the top `rerank_depth` hits
        (default: its configured depth) by their stored content (see search/rerank.py)."""
        if isinstance(queries, str):
            queries = [queries]
        if rerank is not None:
            return self._reranked(list(queries), rerank, rerank_depth, k,
                                  lambda n: self.search(queries, n, tier, rescore, modality))
        return self.search_encoded(self.encode(queries), k, tier, rescore, modality)

    def encode(self, queries: Sequence[str]) -> Any:
        """Text queries encoded for `search_encoded` (encode once, search several tiers)."""
        if self.manifest.outputs.get("mode", "document") == "multivector":
            return self.embedder.encode_multi(list(queries), role="query", task=self.manifest.model.query_task)
        return self.encode_queries(queries)

    def search_encoded(self, encoded: Any, k: int = 10, tier: int | None = None, rescore: int | None = None,
                       modality: str | None = None) -> list[list[Hit]]:
        """Hits for queries from `encode`; the other arguments as in `search`."""
        if self.manifest.outputs.get("mode", "document") == "multivector":
            return self._search_multivector(*encoded, k=k, tier=tier, rescore=rescore, modality=modality)
        return self._search_single(encoded, k, tier, rescore, modality)

    def search_images(self, images: Sequence[Any] | Any, k: int = 10, tier: int | None = None,
                      rescore: int | None = None, modality: str | None = None, rerank: Any = None,
                      rerank_depth: int | None = None) -> list[list[Hit]]:
        """Hits per query image (PIL image, encoded bytes or local path): image -> image search over an
        image index, or image -> text over a text index of the same multimodal model. `rerank` as in
        `search` (with a reranker that takes image queries, e.g. jina-reranker-m0)."""
        if not isinstance(images, (list, tuple)):
            images = [images]
        if rerank is not None:
            from ..models.reranker import RerankDoc

            return self._reranked([RerankDoc(image=i) for i in images], rerank, rerank_depth, k,
                                  lambda n: self.search_images(images, n, tier, rescore, modality))
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

    # -- rerank ---------------------------------------------------------------------------------
    def reranker(self, spec: Any, depth: int | None = None) -> tuple[Any, int]:
        """(loaded reranker, depth) for a search's `rerank` argument; loaded rerankers are kept."""
        from ..models.reranker import Reranker
        from . import rerank as rr

        if isinstance(spec, Reranker):
            return spec, depth or rr.RerankConfig.model_fields["depth"].default
        cfg = rr.rerank_config(spec, depth)
        key = cfg.model_dump_json(exclude={"depth"})
        if key not in self._rerankers:
            self._rerankers[key] = rr.load_reranker(cfg)
        return self._rerankers[key], cfg.depth

    def contents(self, hits: Sequence[Hit]) -> list[Any]:
        """The stored content of hits' rows as reranker candidates (text, a chunk's span, or image bytes)."""
        from ..models.reranker import RerankDoc

        if not (self.manifest.config.get("index") or {}).get("store_content"):
            raise ValueError(f"index {self.storage.root} stores no content to rerank: build it with "
                             "index.store_content: true (or use `embindex retrieve`, which can join content "
                             "from the source)")
        ordinals = np.asarray([h.row for h in hits], dtype=np.int64)
        rows = self.rows.take(ordinals, [CONTENT_COLUMN, CONTENT_IMAGE_COLUMN]) if len(ordinals) else []
        return [RerankDoc(image=r.get(CONTENT_IMAGE_COLUMN)) if r.get(CONTENT_IMAGE_COLUMN) is not None
                else RerankDoc(text=r.get(CONTENT_COLUMN)) for r in rows]

    def _reranked(self, queries: list[Any], spec: Any, depth: int | None, k: int, retrieve) -> list[list[Hit]]:
        from .rerank import apply_scores

        reranker, depth = self.reranker(spec, depth)
        results = retrieve(max(k, depth))
        scored = reranker.score_many([(q, self.contents(hits)) for q, hits in zip(queries, results)])
        return [apply_scores(hits, r, k) for hits, r in zip(results, scored)]

    def search_rows(self, query_vectors: np.ndarray, k: int = 10, tier: int | None = None,
                    rescore: int | None = None, skip: RowFilter | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(scores, row ordinals) per query: ANN on the tier, then full-width rescoring of k * rescore.
        `skip`: rows the ANN search leaves out (tiers whose index `supports_filter`)."""
        entry = self.manifest.tier(self._tier_dim(tier))
        if rescore is None:
            rescore = int(self.manifest.config.get("index", {}).get("rescore", 10))
        q = np.ascontiguousarray(query_vectors, dtype=np.float32)
        index = self.tier_index(entry.dim)
        return funnel.tier_funnel(index, entry, self.manifest.dim, rescore, self.full_width).search(q, k, skip=skip)

    def hits(self, scores: np.ndarray, ordinals: np.ndarray) -> list[Hit]:
        """Hits for row ordinals (-1 entries skipped); reads only those rows' ids and metadata."""
        return self._hits_many([(scores, ordinals)])[0]

    def _hits_many(self, results: Sequence[tuple[np.ndarray, np.ndarray]]) -> list[list[Hit]]:
        """Hits of several queries, their rows fetched together (each row group read once)."""
        wanted = [np.asarray(i)[np.asarray(i) >= 0] for _, i in results]
        docs = self._doc_fields(np.unique(np.concatenate(wanted)) if wanted else np.zeros(0, np.int64))
        return [[Hit(score=float(s), **docs[int(i)]) for s, i in zip(scores, ords) if i >= 0]
                for scores, ords in results]

    def _doc_fields(self, ordinals: np.ndarray) -> dict[int, dict[str, Any]]:
        """Hit fields (id, meta, chunk, modality) of rows, through a small LRU of decoded rows."""
        missing = np.array([i for i in ordinals.tolist() if i not in self._doc_rows], dtype=np.int64)
        for i, row in zip(missing.tolist(), self.rows.take(missing, DOC_COLUMNS) if len(missing) else []):
            self._doc_rows[i] = {
                "id": row["id"], "meta": json.loads(row["meta"]) if row["meta"] else {},
                "chunk": None if row["chunk"] is None else {"index": row["chunk"], "start": row["start"],
                                                            "end": row["end"]},
                "modality": row["modality"] or "text",  # shards written before image support: text
                "row": i}
        out = {}
        for i in ordinals.tolist():
            self._doc_rows.move_to_end(i)
            out[i] = self._doc_rows[i]
        while len(self._doc_rows) > max(DOC_CACHE_ROWS, len(ordinals)):
            self._doc_rows.popitem(last=False)
        return out

    @property
    def tombstones(self) -> np.ndarray:
        """Sorted ordinals of rows this version hides (replaced or deleted documents)."""
        if self._tombstones is None:
            self._tombstones = read_tombstones(self.storage, self.manifest)
        return self._tombstones

    @property
    def stored_rows(self) -> int:
        """Rows in the shards, tombstoned ones included (FAISS ids run over all of them)."""
        return self.rows.n

    def _image_rows(self) -> np.ndarray:
        """Whether each row is an image, from the `modality` column alone (shards without it: text)."""
        if self._is_image is None:
            parts = []
            for s, shard in enumerate(self.manifest.shards):
                col = self.rows.read_column(s, "modality")
                parts.append(np.zeros(shard.rows, dtype=bool) if col is None else
                             pc.fill_null(pc.equal(col, "image"), False).to_numpy(zero_copy_only=False))
            self._is_image = np.concatenate(parts) if parts else np.zeros(0, dtype=bool)
        return self._is_image

    def hidden_rows(self, modality: str | None = None) -> np.ndarray:
        """Sorted ordinals that searches skip: tombstoned rows, and rows of another modality. The modality
        column is read only for a mixed-input model (a text-only model's rows are all text)."""
        if modality is None:
            return self.tombstones
        if modality not in ("text", "image"):
            raise ValueError(f"modality must be 'text' or 'image', got {modality!r}")
        if modality not in self._hidden:  # computed once per reader, not per query
            if "image" in self.manifest.model.modalities:
                other = np.flatnonzero(self._image_rows() != (modality == "image"))
            else:
                other = np.arange(self.stored_rows) if modality == "image" else np.zeros(0, np.int64)
            self._hidden[modality] = np.union1d(self.tombstones, other).astype(np.int64)
        return self._hidden[modality]

    def _skip(self, modality: str | None, index: Any) -> RowFilter | None:
        """The FAISS filter of the rows a search skips, when there are any and `index` can apply it."""
        if self.hidden_rows(modality).size == 0 or not supports_filter(index):
            return None
        if modality not in self._filters:
            self._filters[modality] = RowFilter(self.hidden_rows(modality), self.stored_rows)
        return self._filters[modality]

    def search_vectors(self, query_vectors: np.ndarray, k: int = 10, tier: int | None = None,
                       rescore: int | None = None, modality: str | None = None) -> list[list[Hit]]:
        """Row hits for unit query vectors. Hidden rows are skipped inside FAISS where the tier supports
        selectors, else over-fetched and dropped; the shortlist widens until k visible rows are found."""
        total = self.stored_rows
        hidden = self.hidden_rows(modality)
        need = min(k, total - int(hidden.size))
        if need <= 0:
            return [[] for _ in range(len(query_vectors))]
        dim = self._tier_dim(tier)
        skip = self._skip(modality, self.tier_index(dim))
        fetch = k if skip is not None else min(total, k + min(int(hidden.size), 10 * k))
        while True:
            scores, ids = self.search_rows(query_vectors, k=fetch, tier=dim, rescore=rescore, skip=skip)
            visible = [~tombstone_mask(i, hidden) & (i >= 0) for i in ids]
            if fetch >= total or all(int(v.sum()) >= need for v in visible):
                return self._hits_many([(s[v][:k], i[v][:k]) for s, i, v in zip(scores, ids, visible)])
            fetch = min(total, fetch * 4)

    def search_multivector(self, queries: Sequence[str], k: int = 10, tier: int | None = None,
                           rescore: int | None = None, token_k: int | None = None,
                           modality: str | None = None) -> list[list[Hit]]:
        """Text queries against a multi-vector index (see `_search_multivector`)."""
        q = self.embedder.encode_multi(list(queries), role="query", task=self.manifest.model.query_task)
        return self._search_multivector(*q, k=k, tier=tier, rescore=rescore, token_k=token_k, modality=modality)

    def token_index(self) -> faiss.Index:
        """The token-level index of a multi-vector index (from the tier cache for a remote index)."""
        if self._token_index is None:
            entry = self.manifest.outputs["multivector"]["token_index"]
            self._token_index = open_token_index(self.storage, entry, self.tier_cache)
        return self._token_index

    def _token_candidates(self, query: np.ndarray, token_k: int, modality: str | None, need: int) -> np.ndarray:
        """Visible rows whose tokens are among the `token_k` nearest of any query token, widened until
        `need` rows are candidates (or every token was fetched)."""
        index = self.token_index()
        hidden = self.hidden_rows(modality)
        skip = self._skip(modality, index)
        q = np.ascontiguousarray(query, dtype=np.float32)
        tk = token_k
        while True:
            params = None if skip is None else search_parameters(index, {}, tk, skip)
            _, ids = index.search(q, min(tk, index.ntotal), params=params)
            cand = np.unique(ids[ids >= 0])
            cand = cand[~tombstone_mask(cand, hidden)]
            if len(cand) >= need or tk >= index.ntotal:
                return cand
            tk *= 4

    def _search_multivector(self, single: np.ndarray, q_tokens: list[np.ndarray], k: int = 10,
                            tier: int | None = None, rescore: int | None = None, token_k: int | None = None,
                            modality: str | None = None) -> list[list[Hit]]:
        """Candidates from the token index (`token_k` nearest stored tokens per query token; default from
        the manifest) or the single-vector tier (k * rescore), ranked by MaxSim over the candidates'
        token vectors (read for those rows only)."""
        mv = self.manifest.outputs["multivector"]
        if rescore is None:
            rescore = int(self.manifest.config.get("index", {}).get("rescore", 10))
        token_k = token_k or int(mv.get("token_k", 64))
        hidden = self.hidden_rows(modality)
        need = min(k, self.stored_rows - int(hidden.size))
        if need <= 0:
            return [[] for _ in range(len(single))]
        ranked = []
        for s, q in zip(single, q_tokens):
            if mv.get("token_index"):
                cand = self._token_candidates(q, token_k, modality, need)
            else:
                dim = self._tier_dim(tier)
                skip = self._skip(modality, self.tier_index(dim))
                fetch = k * max(rescore, 1) + (0 if skip is not None else int(hidden.size))
                _, rows = self.search_rows(s[None, :], k=min(self.stored_rows, fetch), tier=dim, rescore=1, skip=skip)
                cand = rows[0][rows[0] >= 0]
                cand = cand[~tombstone_mask(cand, hidden)]
            scores = maxsim_scores(q, self.token_vectors_of(cand))
            order = np.argsort(-scores, kind="stable")[:k]
            ranked.append((scores[order], cand[order]))
        return self._hits_many(ranked)


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
    """Open the latest published version of the index at `uri` (local path or s3:// URI); keyword
    arguments go to IndexReader (model_path, device, recall_target, cache_dir, cache_max_bytes)."""
    return IndexReader(uri, version=version, storage=storage, **kwargs)
