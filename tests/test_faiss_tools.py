"""FAISS's own tools in place of hand-written ones: the on-disk IVF merge, IndexShards over a tier's
files, exact top k (faiss.knn + ResultHeap) and search-time selectors for every tier type. No Ray."""

from __future__ import annotations

import functools
import os

import numpy as np
import pytest

from embindex.index.factories import default_search_params, make_index
from embindex.index.faiss_lib import faiss
from embindex.index.filling import fill_index, list_sizes
from embindex.index.merge import merge_ondisk
from embindex.index.tier_io import read_ondisk
from embindex.index.training import train_index
from embindex.index.funnel import exact_topk
from embindex.index.rescore_vectors import BLOCK_ROWS, ArrayVectors, TierVectors
from embindex.index.tier_search import ShardedIndex, TierSearcher, shards_index
from embindex.index.selectors import RowFilter, search_parameters, supports_filter

D = 32
N = 3000
BOUNDS = [0, 700, 700, 1500, 2500, N]  # uneven shards, one of them empty


def unit(n: int, d: int = D, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).normal(size=(n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@functools.cache
def trained(factory: str):
    """The empty trained index of a factory (trained once per test session, on 1,000 rows: OPQ is slow)."""
    return train_index(factory, D, unit(N)[:1000])


def fill_shards(empty, x: np.ndarray, wrap: bool) -> list:
    return [fill_index(empty, x[a:b], a, wrap) for a, b in zip(BOUNDS, BOUNDS[1:])]


def assert_same_ranking(got, ref, atol: float = 1e-5) -> None:
    """Same scores; the same ids wherever a score is not tied with another one of the row."""
    np.testing.assert_allclose(got[0], ref[0], atol=atol)
    for gs, gi, ri in zip(got[0], got[1], ref[1]):
        untied = np.array([np.sum(np.isclose(gs, s, atol=atol)) == 1 for s in gs])
        assert np.array_equal(gi[untied], ri[untied])


# -- on-disk merge ------------------------------------------------------------------------------------

def packed_lists(index) -> bytes:
    """The data file the layout promises: list after list, each its codes then its ids."""
    ivf = faiss.extract_index_ivf(index)
    out = []
    for j in range(ivf.nlist):
        n = ivf.invlists.list_size(j)
        if n:
            out.append(faiss.rev_swig_ptr(ivf.invlists.get_codes(j), n * ivf.code_size).tobytes())
            out.append(faiss.rev_swig_ptr(ivf.invlists.get_ids(j), n).tobytes())
    return b"".join(out)


@pytest.mark.parametrize("factory", ["IVF16,Flat", "IVF16,SQ8", "IVF16,PQ8x4", "OPQ8,IVF16,PQ8x4"])
def test_faiss_merge_writes_the_packed_layout_and_searches_like_one_index(tmp_path, factory):
    x, empty = unit(N), trained(factory)
    one = faiss.clone_index(empty)
    one.add(x)  # one process: ids = ordinals, entries in shard order
    shards = fill_shards(empty, x, wrap=False)
    merged = merge_ondisk(empty, (s for s in shards), [list_sizes(s) for s in shards],
                          str(tmp_path / "t.faiss"), str(tmp_path / "t.ivfdata"))
    assert sorted(os.listdir(tmp_path)) == ["t.faiss", "t.ivfdata"]  # the temporary lists are gone
    assert (tmp_path / "t.ivfdata").read_bytes() == packed_lists(one)
    assert empty.ntotal == 0
    reopened = read_ondisk(str(tmp_path / "t.faiss"))
    assert merged.ntotal == reopened.ntotal == N
    q = unit(20, seed=5)
    ref = TierSearcher(one, params={"nprobe": 8}).search(q, 10)
    for index in (merged, reopened):
        got = TierSearcher(index, params={"nprobe": 8}).search(q, 10)
        assert np.array_equal(got[1], ref[1]) and np.allclose(got[0], ref[0], atol=1e-6)


def test_merge_checks_the_list_sizes_the_fill_tasks_reported(tmp_path):
    shards = fill_shards(trained("IVF16,Flat"), unit(N), wrap=False)
    sizes = [list_sizes(s) for s in shards]
    sizes[0] = sizes[0] + 1
    with pytest.raises(RuntimeError, match="list sizes"):
        merge_ondisk(trained("IVF16,Flat"), iter(shards), sizes, str(tmp_path / "t.faiss"), str(tmp_path / "t.ivfdata"))


# -- a tier of several files: IndexShards ----------------------------------------------------------------

@pytest.mark.parametrize("factory", ["Flat", "Binary"])
def test_index_shards_equal_one_index_and_the_lazy_build_time_shards(factory):
    x, q = unit(N), unit(25, seed=7)
    metric = "hamming" if factory == "Binary" else "ip"
    empty = make_index(factory, D)
    one = fill_index(empty, x, 0, wrap_ids=True)
    parts = fill_shards(empty, x, wrap=True)
    sharded = shards_index(parts)
    lazy = ShardedIndex([lambda p=p: p for p in parts], higher_is_better=metric == "ip",
                        ntotals=[p.ntotal for p in parts], d=D)
    ref = TierSearcher(one, metric=metric).search(q, 20)
    assert_same_ranking(TierSearcher(sharded, metric=metric).search(q, 20), ref)
    assert_same_ranking(TierSearcher(lazy, metric=metric).search(q, 20), ref)
    # more than the corpus: every row once, then padding
    s, i = TierSearcher(sharded, metric=metric).search(q[:2], N + 50)
    assert s.shape == (2, N) and all(sorted(r) == list(range(N)) for r in i)


def test_index_shards_of_hnsw_shards_equal_searching_each_shard():
    x, q = unit(N), unit(25, seed=8)
    parts = fill_shards(make_index("HNSW32,Flat", D), x, wrap=True)
    params = {"efSearch": 64}
    lazy = ShardedIndex(parts)
    assert_same_ranking(TierSearcher(shards_index(parts), params=params).search(q, 10),
                        TierSearcher(lazy, params=params).search(q, 10))


def test_filters_pass_through_index_shards_of_on_disk_lists_and_a_delta(tmp_path):
    """A reindexed IVF tier: its on-disk lists plus a delta index, filtered inside FAISS."""
    x, q = unit(N), unit(10, seed=9)
    empty = trained("IVF16,Flat")
    base = [fill_index(empty, x[a:b], a, False) for a, b in ((0, 1200), (1200, 2500))]
    merge_ondisk(empty, iter(base), [list_sizes(s) for s in base], str(tmp_path / "t.faiss"),
                 str(tmp_path / "t.ivfdata"))
    delta = fill_index(empty, x[2500:], 2500, False)
    tier = shards_index([read_ondisk(str(tmp_path / "t.faiss")), delta])
    near = np.argsort(-(q @ x.T), axis=1)[:, :15].ravel()
    hidden = np.union1d(near, np.arange(0, N, 2))
    rows = RowFilter(hidden, N)
    assert supports_filter(tier)
    s, i = TierSearcher(tier, params={"nprobe": 16}).search(q, 10, skip=rows)  # every list: exact
    live = q @ x.T
    live[:, hidden] = -np.inf
    ref = np.argsort(-live, axis=1, kind="stable")[:, :10]
    assert np.array_equal(i, ref) and np.allclose(s, np.take_along_axis(live, ref, axis=1), atol=1e-5)


def test_tier_vectors_reconstruct_through_index_shards():
    x, q = unit(N), unit(2, seed=10)
    tier = shards_index(fill_shards(make_index("Flat", D), x, wrap=True))
    ids = np.array([[5, N - 1, 700, -1], [1500, 0, 2499, 2500]])
    got = TierVectors(tier).score(q, ids)
    for r in range(2):
        ok = ids[r] >= 0
        np.testing.assert_allclose(got[r][ok], x[ids[r][ok]] @ q[r], atol=1e-6)
    assert got[0, 3] == -np.inf


# -- exact top k ----------------------------------------------------------------------------------------

def test_exact_topk_equals_numpy():
    x, q = unit(2 * BLOCK_ROWS + 123, 48), unit(17, 48, seed=3)  # three blocks, the last one short
    scores = q @ x.T
    exclude = np.random.default_rng(4).integers(0, len(x), len(q))
    exclude[:5] = np.argmax(scores[:5], axis=1)  # the excluded row is the best one
    ref = scores.copy()
    ref[np.arange(len(q)), exclude] = -np.inf
    order = np.argsort(-ref, axis=1, kind="stable")[:, :25]
    got = exact_topk(ArrayVectors(x), q, 25, exclude=exclude)
    assert_same_ranking(got, (np.take_along_axis(ref, order, axis=1), order))
    assert not (got[1] == exclude[:, None]).any()
    # k beyond the corpus: every row, then (-inf, -1)
    s, i = exact_topk(ArrayVectors(x[:7]), q, 10)
    assert (i[:, 7:] == -1).all() and np.isneginf(s[:, 7:]).all()
    assert all(sorted(r) == list(range(7)) for r in i[:, :7])


# -- selectors, per tier type -----------------------------------------------------------------------------

FILTERED = ["Flat", "SQ8", "HNSW32,Flat", "HNSW32,SQ8", "IVF16,Flat", "IVF16,SQ8", "IVF16,PQ8", "OPQ8,IVF16,PQ8x4",
            "IVF16,PQ8x4fs"]
UNFILTERED = ["Binary", "PQ8x4", "PQ8x4fs"]


@pytest.fixture(scope="module")
def data():
    x, q = unit(N), unit(8, seed=11)
    near = np.argsort(-(q @ x.T), axis=1)[:, :20].ravel()  # every query's nearest rows are hidden
    hidden = np.union1d(near, np.arange(0, N, 3))
    return x, q, hidden


@pytest.mark.parametrize("wrap", [False, True])
@pytest.mark.parametrize("factory", FILTERED)
def test_selectors_skip_hidden_rows_inside_faiss_and_k_results_come_back(data, factory, wrap):
    x, q, hidden = data
    empty = trained(factory)
    if wrap:
        index = fill_index(empty, x, 0, wrap_ids=True)
    else:
        index = faiss.clone_index(empty)
        index.add(x)  # ids = ordinals
    assert supports_filter(index)
    s, i = TierSearcher(index, params=default_search_params(empty)).search(q, 10, skip=RowFilter(hidden, N))
    assert (i >= 0).all() and np.isfinite(s).all()  # k results: enough live rows
    assert not np.isin(i, hidden).any()


@pytest.mark.parametrize("factory", UNFILTERED)
def test_tier_types_faiss_cannot_filter_are_reported(data, factory):
    """Such tiers are searched without a selector and over-fetched (reader.search_vectors)."""
    x, q, hidden = data
    index = fill_index(trained(factory), x, 0, wrap_ids=True)
    assert not supports_filter(index) and not supports_filter(shards_index([index]))
    assert not supports_filter(ShardedIndex([index]))  # build-time shards are never filtered
    with pytest.raises(RuntimeError):
        faiss.downcast_index(index.index).search(q, 10, params=search_parameters(index, {}, 10, RowFilter(hidden, N)))
    s, i = TierSearcher(index, metric="hamming" if factory == "Binary" else "ip").search(q, 10)
    assert (i >= 0).all()
