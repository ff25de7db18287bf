"""Retrieval metrics against values computed by hand, and the qrels / run file formats."""

from __future__ import annotations

import json

import pytest

from embindex.retrieve.metrics import mean_metrics, parse_metric, query_metrics
from embindex.retrieve.trec import QrelsError, parse_qrels, read_qrels, run_lines

QRELS = {"q1": {"d1": 2, "d2": 1, "d3": 0}, "q2": {"d9": 1}, "q3": {"d5": 0}}
# q1's ranking repeats d1 (two chunks of it): only the first occurrence counts -> [d3, d1, x, d2]
RUN_Q1 = ["d3", "d1", "x", "d2", "d1"]


def test_one_query_by_hand():
    m = query_metrics(RUN_Q1, QRELS["q1"], ["nDCG@10", "MRR@10", "Recall@2", "Recall@10", "nDCG@1"])
    # DCG  = 2/log2(3) + 1/log2(5) = 1.261860 + 0.430677 = 1.692536 (d1 at rank 2, d2 at rank 4)
    # IDCG = 2/log2(2) + 1/log2(3) = 2 + 0.630930 = 2.630930
    assert m["nDCG@10"] == pytest.approx(0.6433224, abs=1e-7)
    assert m["MRR@10"] == 0.5  # first relevant at rank 2 (d3 is judged 0: not relevant)
    assert m["Recall@2"] == 0.5  # d1 of {d1, d2}
    assert m["Recall@10"] == 1.0
    assert m["nDCG@1"] == 0.0  # rank 1 is d3 (grade 0)


def test_cutoffs_cut():
    assert query_metrics(["x", "y", "z", "d1"], {"d1": 1}, ["MRR@3", "MRR@4", "Recall@3"]) == \
        {"MRR@3": 0.0, "MRR@4": 0.25, "Recall@3": 0.0}


def test_means_skip_unjudged_queries_and_count_missing_runs_as_zero():
    means = mean_metrics({"q1": RUN_Q1, "q3": ["d5"], "q4": ["d1"]}, QRELS, ["nDCG@10", "MRR@10"])
    # evaluated: q1 and q2 (q3 has no relevant judgment; q4 is not judged); q2 has no run -> 0
    assert means["nDCG@10"] == pytest.approx(0.6433224 / 2, abs=1e-7)
    assert means["MRR@10"] == 0.25


def test_metric_names():
    assert parse_metric("nDCG@10") == ("ndcg", 10)
    with pytest.raises(ValueError, match="unknown metric"):
        parse_metric("MAP@10")


def test_qrels_formats_agree(tmp_path):
    trec = "q1 0 d1 2\nq1 0 d2 1\n\nq2 0 d9 1\n"
    beir = "query-id\tcorpus-id\tscore\nq1\td1\t2\nq1\td2\t1\nq2\td9\t1\n"
    jsonl = "\n".join(json.dumps(r) for r in [{"query_id": "q1", "doc_id": "d1", "relevance": 2},
                                               {"query_id": "q1", "corpus_id": "d2", "score": 1},
                                               {"query_id": "q2", "id": "d9"}])
    want = {"q1": {"d1": 2, "d2": 1}, "q2": {"d9": 1}}
    for name, text in (("t.qrels", trec), ("b.tsv", beir), ("j.jsonl", jsonl)):
        (tmp_path / name).write_text(text)
        assert read_qrels(str(tmp_path / name)) == want, name


def test_bad_qrels_say_where():
    with pytest.raises(QrelsError, match="line 2"):
        parse_qrels(["q1 0 d1 1", "q1 d1"])
    with pytest.raises(QrelsError, match="not a number"):
        parse_qrels(["q1 0 d1 high"])
    with pytest.raises(QrelsError, match="no judgments"):
        parse_qrels(["", "  "])


def test_run_lines_rank_documents_once():
    assert run_lines("q1", [("d1", 0.9), ("d2", 0.8), ("d1", 0.7)], "embindex") == [
        "q1 Q0 d1 1 0.900000 embindex", "q1 Q0 d2 2 0.800000 embindex"]


def test_final_ranking_puts_unscorable_candidates_after_the_reranked_ones():
    from embindex.retrieve.job import final_ranking, trec_scores

    row = {"query_id": "q", "cand_id": ["a", "b", "c", "d", "e"], "cand_chunk": [None] * 5,
           "cand_start": [None] * 5, "cand_end": [None] * 5, "cand_score": [0.9, 0.8, 0.7, 0.6, 0.5],
           # depth 3: b scores best, c has no content (rejected); d and e were not reranked
           "rerank_score": [0.1, 0.7, None], "rerank_reject": [None, None, "empty_content"]}
    ranked = final_ranking(row, k=4, depth=3)
    assert [r["id"] for r in ranked] == ["b", "a", "c", "d"]
    assert [r["reject"] for r in ranked] == [None, None, "empty_content", None]
    assert [r["rerank_score"] for r in ranked] == [0.7, 0.1, None, None]
    scores = trec_scores(ranked)
    assert scores[:2] == [0.7, 0.1] and scores == sorted(scores, reverse=True) and len(set(scores)) == 4
