"""Quality report of the tiers and the funnel, measured at build time with bounded memory.

Queries are corpus rows held out of training (a random part of the training sample); each query's
own row is left out of both the ground truth and the results (leave-one-out), so the report measures
neighbours, not self-retrieval. Ground truth is exact full-width inner-product search streamed over
the Parquet shards. recall@k counts a returned id as correct when its exact full-width score reaches
the k-th true score (minus 1e-5), so exact ties cannot lower it.

Report (a compatible extension of the earlier one): {"k", "queries", "rescore_factor", "tiers":
{dim: {"recall@k", "recall@k_rescored", "ms_per_query", "ms_per_query_rescored", "bytes_per_vector",
"build_seconds", "factory"}}, "funnel": {...}, "method": ...}.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from .funnel import Funnel, Rescore, exact_topk

TIE_EPS = 1e-5


def _drop(ids: np.ndarray, scores: np.ndarray, exclude: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Remove each row's excluded id, keep the first k."""
    keep = ids != exclude[:, None]
    out_i = np.full((len(ids), k), -1, dtype=np.int64)
    out_s = np.full((len(ids), k), -np.inf, dtype=np.float32)
    for r in range(len(ids)):
        i, s = ids[r][keep[r]][:k], scores[r][keep[r]][:k]
        out_i[r, :len(i)], out_s[r, :len(s)] = i, s
    return out_s, out_i


def tolerant_recall(found: np.ndarray, found_exact: np.ndarray, truth_scores: np.ndarray) -> float:
    """Mean fraction of the k results whose exact score >= the k-th true score - TIE_EPS."""
    k = truth_scores.shape[1]
    if truth_scores.size == 0:
        return 1.0
    kth = truth_scores[:, -1:]
    valid = truth_scores > -np.inf
    ok = (found[:, :k] >= 0) & (found_exact[:, :k] >= kth - TIE_EPS)
    denom = np.maximum(valid.sum(axis=1), 1)
    return float(np.mean(np.minimum(ok.sum(axis=1), denom) / denom))


def quality_report(searchers: dict[int, Any], source: Any, queries: np.ndarray, query_ids: np.ndarray,
                   k: int, rescore: int, tier_info: dict[int, dict[str, Any]] | None = None) -> dict:
    """recall@k (alone and rescored at full width from `source`) and batch latency of each tier, plus
    the default funnel (narrowest tier -> full width). `searchers`: dim -> TierSearcher; `source`: a
    full-width vector source of rescore_vectors.py (ParquetVectors at build time)."""
    nq = len(queries)
    if nq == 0 or not searchers:
        return {"k": k, "queries": 0, "rescore_factor": rescore, "tiers": {}}
    q = np.ascontiguousarray(queries, dtype=np.float32)
    results: dict[str, np.ndarray] = {}
    timing: dict[str, float] = {}
    for dim, searcher in sorted(searchers.items()):
        t0 = time.perf_counter()
        s, i = searcher.search(q, k + 1)
        timing[f"{dim}"] = time.perf_counter() - t0
        results[f"{dim}"] = _drop(i, s, query_ids, k)[1]
        t0 = time.perf_counter()
        s, i = Funnel(searcher, [Rescore(source)], factor=rescore).search(q, k + 1)
        timing[f"{dim}_rescored"] = time.perf_counter() - t0
        results[f"{dim}_rescored"] = _drop(i, s, query_ids, k)[1]
    truth_s, _ = exact_topk(source, q, k, exclude=query_ids)
    found = np.concatenate(list(results.values()), axis=1)
    exact = source.score(q, found)
    tiers_out: dict[str, Any] = {}
    col = 0
    recall: dict[str, float] = {}
    for name in results:
        recall[name] = round(tolerant_recall(results[name], exact[:, col:col + k], truth_s), 4)
        col += k
    for dim in sorted(searchers):
        entry = {f"recall@{k}": recall[f"{dim}"], f"recall@{k}_rescored": recall[f"{dim}_rescored"],
                 "ms_per_query": round(1000 * timing[f"{dim}"] / nq, 4),
                 "ms_per_query_rescored": round(1000 * timing[f"{dim}_rescored"] / nq, 4)}
        entry.update((tier_info or {}).get(dim, {}))
        tiers_out[str(dim)] = entry
    low = min(searchers)
    full = max(searchers)
    funnel = {"shortlist_tier": low, "shortlist": k * rescore, "rescore": "full-width vectors from Parquet",
              f"recall@{k}": recall[f"{low}_rescored"], "ms_per_query": tiers_out[str(low)]["ms_per_query_rescored"]}
    return {"k": k, "queries": int(nq), "rescore_factor": rescore, "tiers": tiers_out, "funnel": funnel,
            "widest_tier": full,
            "method": "leave-one-out corpus queries held out of training; truth = exact full-width IP; "
                      "tie-tolerant recall"}


def split_queries(ordinals: np.ndarray, n_queries: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Positions in the sample: (queries, training rows). Queries are held out of training unless that
    would leave fewer than half of the sample to train on (tiny corpora), then all rows train."""
    rng = np.random.default_rng(seed + 1)
    perm = rng.permutation(len(ordinals))
    nq = min(n_queries, len(ordinals))
    q, rest = perm[:nq], perm[nq:]
    if len(rest) < len(ordinals) / 2:
        rest = perm
    return np.sort(q), np.sort(rest)


def narrowest_tier_reaching(manifest: Any, recall_target: float, rescored: bool) -> int | None:
    """Width of the narrowest tier whose build-time recall@k (manifest.quality; rescored at full width, or
    the tier alone) reaches `recall_target`; None when none does or the manifest has no quality numbers."""
    quality = manifest.quality or {}
    k = quality.get("k", 10)
    key = f"recall@{k}_rescored" if rescored else f"recall@{k}"
    per_tier = quality.get("tiers", {})
    for t in sorted(manifest.tiers, key=lambda t: t.dim):
        recall = per_tier.get(str(t.dim), {}).get(key)
        if recall is not None and recall >= recall_target:
            return t.dim
    return None
