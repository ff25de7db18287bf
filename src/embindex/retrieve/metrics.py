"""Retrieval metrics over document-level rankings, with trec_eval's definitions.

* nDCG@k: linear gain (the judged grade), discount 1/log2(rank + 1), normalised by the ideal ordering of
  all the query's judged documents (trec_eval `ndcg_cut`, what BEIR reports).
* MRR@k: 1 / rank of the first relevant document (grade > 0) within the top k, else 0.
* Recall@k: relevant documents in the top k / relevant documents judged for the query.

A ranking may repeat a document (several chunks of it): only its first occurrence counts. Queries without
any relevant judgment are left out of the means; a judged query with no ranking (it failed, or returned
nothing) counts as 0, so errors never raise the scores.
"""

from __future__ import annotations

import math
from typing import Iterable, Mapping, Sequence

Qrels = Mapping[str, Mapping[str, int]]  # query id -> {doc id: grade}

DEFAULT_METRICS = ("nDCG@10", "MRR@10", "Recall@10", "Recall@100")


def dedupe(ranking: Iterable[str]) -> list[str]:
    """Document ids in rank order, each once (its best-ranked occurrence)."""
    seen: set[str] = set()
    out = []
    for doc in ranking:
        if doc not in seen:
            seen.add(doc)
            out.append(doc)
    return out


def ndcg_at(ranking: Sequence[str], judged: Mapping[str, int], k: int) -> float:
    dcg = sum(judged.get(d, 0) / math.log2(i + 2) for i, d in enumerate(ranking[:k]) if judged.get(d, 0) > 0)
    ideal = sorted((g for g in judged.values() if g > 0), reverse=True)[:k]
    idcg = sum(g / math.log2(i + 2) for i, g in enumerate(ideal))
    return dcg / idcg if idcg > 0 else 0.0


def mrr_at(ranking: Sequence[str], judged: Mapping[str, int], k: int) -> float:
    for i, d in enumerate(ranking[:k]):
        if judged.get(d, 0) > 0:
            return 1.0 / (i + 1)
    return 0.0


def recall_at(ranking: Sequence[str], judged: Mapping[str, int], k: int) -> float:
    relevant = {d for d, g in judged.items() if g > 0}
    return len(relevant.intersection(ranking[:k])) / len(relevant) if relevant else 0.0


_FUNCTIONS = {"ndcg": ndcg_at, "mrr": mrr_at, "recall": recall_at}


def parse_metric(name: str) -> tuple[str, int]:
    """'nDCG@10' -> ('ndcg', 10)."""
    kind, _, cut = name.partition("@")
    if kind.lower() not in _FUNCTIONS or not cut.isdigit() or int(cut) <= 0:
        raise ValueError(f"unknown metric {name!r}; use nDCG@k, MRR@k or Recall@k")
    return kind.lower(), int(cut)


def query_metrics(ranking: Sequence[str], judged: Mapping[str, int],
                  metrics: Sequence[str] = DEFAULT_METRICS) -> dict[str, float]:
    """Each metric of one query's ranking (document ids, best first)."""
    docs = dedupe(ranking)
    out = {}
    for name in metrics:
        kind, k = parse_metric(name)
        out[name] = _FUNCTIONS[kind](docs, judged, k)
    return out


def evaluated_queries(qrels: Qrels) -> list[str]:
    """Queries with at least one relevant judgment (the ones averaged)."""
    return sorted(q for q, judged in qrels.items() if any(g > 0 for g in judged.values()))


def mean_metrics(runs: Mapping[str, Sequence[str]], qrels: Qrels,
                 metrics: Sequence[str] = DEFAULT_METRICS) -> dict[str, float]:
    """Means over the evaluated queries of `qrels`; `runs` maps query id -> ranking."""
    queries = evaluated_queries(qrels)
    totals = dict.fromkeys(metrics, 0.0)
    for q in queries:
        for name, value in query_metrics(runs.get(q, ()), qrels[q], metrics).items():
            totals[name] += value
    return {name: total / len(queries) if queries else float("nan") for name, total in totals.items()}
