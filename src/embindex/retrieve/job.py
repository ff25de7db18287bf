"""`embindex retrieve`: a query set -> search (every tier, alone and rescored) -> rerank -> results + metrics.

Ray Data: query files -> SearchActor pool (encode with the index's model and query role, search) ->
[content joined from the source, when the index stores none] -> RerankActor pool -> the driver, which
streams the rows out: `results.parquet` (query_id, rank, id, chunk, start, end, retrieval_score,
rerank_score, reject), `run.trec` (the final ranking) and, with qrels, `metrics.json` / `metrics.md`
(nDCG@10, MRR@10, Recall@10/100 per stage). The driver keeps per-stage sums and the evaluated query ids,
never the rankings: memory grows with the number of queries, not with k or the corpus.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..config import RetrieveConfig, load_retrieve_config
from ..index.publish import latest_version, read_manifest
from ..logs import Log, stderr_log
from ..models.reranker import RerankScores
from ..ray_runtime import cluster_can_have_gpus, quiet_ray_data, ray_session
from ..storage import Storage, StorageOptions, fsspec_filesystem, strip_scheme
from .metrics import DEFAULT_METRICS, evaluated_queries, query_metrics
from .trec import read_qrels, run_lines


RESULT_SCHEMA = pa.schema([
    ("query_id", pa.string()), ("rank", pa.int32()), ("id", pa.string()), ("chunk", pa.int32()),
    ("start", pa.int32()), ("end", pa.int32()), ("retrieval_score", pa.float64()),
    ("rerank_score", pa.float64()), ("reject", pa.string()),
])


@dataclass
class RetrieveResult:
    output: str
    queries: int
    rejected: int
    metrics: dict[str, dict[str, float]]  # stage -> metric -> mean (empty without qrels)
    timings: dict[str, float] = field(default_factory=dict)

    def table(self) -> str:
        return metrics_table(self.metrics)


def metrics_table(metrics: dict[str, dict[str, float]]) -> str:
    """A Markdown table: one row per stage, one column per metric."""
    if not metrics:
        return ""
    names = list(next(iter(metrics.values())))
    lines = ["| stage | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    lines += [f"| {stage} | " + " | ".join(f"{v[n]:.4f}" for n in names) + " |" for stage, v in metrics.items()]
    return "\n".join(lines)


def final_ranking(row: dict[str, Any], k: int, depth: int) -> list[dict[str, Any]]:
    """The query's result rows: the reranked top `depth` (scored first, then rejected candidates), then the
    remaining retrieved candidates in retrieval order, cut at k."""
    n = len(row["cand_id"])
    order = list(range(n))
    rerank = row.get("rerank_score")
    rejects = row.get("rerank_reject") or [None] * n
    if rerank is not None:
        head = min(depth, n)
        scored = RerankScores(np.array([np.nan if s is None else s for s in rerank[:head]]), rejects[:head])
        order = [int(j) for j in scored.ranking()] + order[head:]
    out = []
    for rank, j in enumerate(order[:k], 1):
        out.append({"query_id": row["query_id"], "rank": rank, "id": row["cand_id"][j],
                    "chunk": row["cand_chunk"][j], "start": row["cand_start"][j], "end": row["cand_end"][j],
                    "retrieval_score": row["cand_score"][j],
                    "rerank_score": rerank[j] if rerank is not None and j < len(rerank) else None,
                    "reject": rejects[j] if j < depth else None})
    return out


class _Metrics:
    """Per-stage metric sums over the evaluated queries, filled one query at a time."""

    def __init__(self, qrels: dict[str, dict[str, int]] | None):
        self.qrels = qrels or {}
        self.evaluated = set(evaluated_queries(self.qrels)) if qrels else set()
        self.sums: dict[str, dict[str, float]] = {}

    def add(self, query_id: str | None, stage: str, ranking: list[str]) -> None:
        if query_id not in self.evaluated:
            return
        sums = self.sums.setdefault(stage, dict.fromkeys(DEFAULT_METRICS, 0.0))
        for name, value in query_metrics(ranking, self.qrels[query_id]).items():
            sums[name] += value

    def means(self, stages: list[str]) -> dict[str, dict[str, float]]:
        """Means over every evaluated query (a query that failed or was not in the query set adds 0)."""
        n = len(self.evaluated)
        return {s: {m: v / n for m, v in self.sums.get(s, dict.fromkeys(DEFAULT_METRICS, 0.0)).items()}
                for s in stages} if n else {}


def _content_mode(cfg: RetrieveConfig, manifest: Any, log: Log) -> str:
    stored = bool((manifest.config.get("index") or {}).get("store_content"))
    if cfg.rerank is None:
        return "none"
    if cfg.content == "index" and not stored:
        raise ValueError(f"index {cfg.index.uri} stores no content (built without index.store_content); "
                         "set content: source (or auto) to join it from the source")
    if cfg.content == "source" or not stored:
        why = "content: source" if stored else "the index stores none"
        log(f"[embindex] candidates' content: joined by id from the build's source "
            f"{(manifest.config.get('source') or {}).get('uri')} ({why})")
        return "source"
    return "index"


def _search_plan(cfg: RetrieveConfig, manifest: Any, stages: list[tuple[str, int, int | None]], final: str,
                 content: str, depth: int) -> Any:
    """Queries -> search actors (-> content from the source) (-> rerank actors), as a lazy dataset."""
    import ray.data

    from .actors import RerankActor, SearchActor
    from .queries import query_dataset

    res = cfg.resources
    ds = query_dataset(cfg.queries)
    ds = ds.map_batches(SearchActor, batch_size=res.batch_queries, batch_format="pyarrow",
                        fn_constructor_kwargs={"cfg_json": cfg.model_dump_json(), "version": manifest.version,
                                               "stages": stages, "final": final,
                                               "content": "index" if content == "index" else "none",
                                               "depth": depth, "torch_threads": res.torch_threads},
                        compute=ray.data.ActorPoolStrategy(size=res.actors), num_cpus=res.cpus_per_actor,
                        num_gpus=res.gpus_per_actor)
    if cfg.rerank is None:
        return ds
    if content == "source":
        from .content import join_source_content

        storage = cfg.source_storage if cfg.source_storage is not None else cfg.index.storage
        ds = join_source_content(ds, manifest.config.get("source") or {}, storage, depth)
    gpus = res.rerank_gpus_per_actor
    if gpus is None:
        gpus = 1.0 if cluster_can_have_gpus() else 0.0
    return ds.map_batches(RerankActor, batch_size=res.batch_queries, batch_format="pyarrow",
                          fn_constructor_kwargs={"rerank_json": cfg.rerank.model_dump_json(), "depth": depth,
                                                 "torch_threads": res.torch_threads},
                          compute=ray.data.ActorPoolStrategy(size=res.rerank_actors),
                          num_cpus=res.rerank_cpus_per_actor, num_gpus=gpus)


def reranker_label(cfg: Any) -> str:
    """The reranker's family name, else its checkpoint folder's name."""
    return cfg.name or cfg.path.rstrip("/").rsplit("/", 1)[-1]


def retrieve(config: Any, overrides: dict[str, Any] | None = None, log: Log = stderr_log) -> RetrieveResult:
    """Run the offline retrieve(-and-rerank) job; see the module docstring for what it writes."""
    from .actors import search_stages

    cfg = config if isinstance(config, RetrieveConfig) else load_retrieve_config(config, overrides)
    started = time.perf_counter()
    store = Storage(cfg.index.uri, StorageOptions.from_dict(cfg.index.storage))
    version = cfg.index.version or latest_version(store)  # every actor reads this version
    manifest = read_manifest(store, version)
    content = _content_mode(cfg, manifest, log)
    depth = cfg.rerank.depth if cfg.rerank else 0
    qrels = read_qrels(cfg.qrels.uri, cfg.qrels.storage_options()) if cfg.qrels else None
    tier = cfg.search.tier or _default_tier(manifest)
    stages, final = search_stages(manifest, cfg, tier)
    reranked = f"{final} -> rerank {reranker_label(cfg.rerank)}@{depth}" if cfg.rerank else None
    metrics = _Metrics(qrels)
    fs = fsspec_filesystem(cfg.output, StorageOptions.from_dict(cfg.output_storage))
    out = strip_scheme(cfg.output)
    fs.makedirs(out, exist_ok=True)
    queries = rejected = 0
    with ray_session(cfg.resources), fs.open(f"{out}/results.parquet", "wb") as pf, \
            fs.open(f"{out}/run.trec", "wt", encoding="utf-8") as trec, \
            pq.ParquetWriter(pf, RESULT_SCHEMA, compression="zstd") as writer:
        quiet_ray_data(progress=True)
        ds = _search_plan(cfg, manifest, stages, final, content, depth)
        for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
            rows_out = []
            for row in batch.to_pylist():
                queries += 1
                if row["reject"]:
                    rejected += 1
                    rows_out.append({"query_id": row["query_id"], "reject": row["reject"]})
                    continue
                ranked = _evaluate(row, cfg, stages, reranked, depth, metrics)
                rows_out.extend(ranked)
                trec.write("".join(line + "\n" for line in run_lines(
                    row["query_id"], zip([r["id"] for r in ranked], trec_scores(ranked)), cfg.run_name)))
            if rows_out:
                writer.write_table(pa.Table.from_pylist(rows_out, schema=RESULT_SCHEMA))
    order = [name for name, _, _ in stages] + ([reranked] if reranked else [])
    result = RetrieveResult(cfg.output, queries, rejected, metrics.means(order),
                            {"total_s": round(time.perf_counter() - started, 3)})
    if result.metrics:
        with fs.open(f"{out}/metrics.json", "wt") as f:
            json.dump({"index": cfg.index.uri, "version": version, "queries": queries, "rejected": rejected,
                       "evaluated": len(metrics.evaluated), "metrics": result.metrics}, f, indent=2)
        with fs.open(f"{out}/metrics.md", "wt") as f:
            f.write(result.table() + "\n")
    return result


def _evaluate(row: dict[str, Any], cfg: RetrieveConfig, stages: list[tuple[str, int, int | None]],
              reranked: str | None, depth: int, metrics: _Metrics) -> list[dict[str, Any]]:
    """Add one query's stage rankings to the metrics; return its result rows."""
    runs = json.loads(row["runs"])
    for name, _, _ in stages:
        metrics.add(row["query_id"], name, runs.get(name, []))
    ranked = final_ranking(row, cfg.search.k, depth if row.get("rerank_score") else 0)
    if reranked:
        metrics.add(row["query_id"], reranked, [r["id"] for r in ranked])
    if row.get("rerank_error"):  # the reranker refused the query: retrieval order, the reason on every row
        for r in ranked:
            r["reject"] = row["rerank_error"]
    return ranked


def trec_scores(ranked: list[dict[str, Any]]) -> list[float]:
    """Non-increasing scores for a run file (trec_eval orders by score, not rank): the rerank score where
    there is one, else the retrieval score, each capped just below the one ranked before it."""
    out: list[float] = []
    for r in ranked:
        s = r["rerank_score"] if r["rerank_score"] is not None else r["retrieval_score"]
        s = float(s) if s is not None else float("-inf")
        out.append(min(s, out[-1] - 1e-6) if out else s)
    return [s if np.isfinite(s) else -1e6 - i for i, s in enumerate(out)]


def _default_tier(manifest: Any) -> int:
    from ..search.reader import default_tier, recall_target_of

    return default_tier(manifest, recall_target_of(manifest))
