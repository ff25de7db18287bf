"""Tiers at corpus scale, on small data: the sample, auto rule, sharded filling, on-disk merge, funnel."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from embindex.config import IndexConfig
from embindex.index import tier_builder, tiers
from embindex.index.factories import auto_factory, make_index
from embindex.index.filling import fill_index, list_sizes
from embindex.index.manifest import TierEntry
from embindex.index.merge import merge_ondisk
from embindex.index.sampling import sample_shards
from embindex.index.tier_builder import build_tiers
from embindex.index.tier_io import read_ondisk
from embindex.index.training import train_index
from embindex.index.funnel import Funnel, Rescore, exact_topk
from embindex.index.rescore_vectors import ArrayVectors, ParquetVectors
from embindex.index.tier_search import ShardedIndex, TierSearcher, open_tier
from embindex.storage import Storage

DIM = 64
SHARD_ROWS = [300, 250, 400, 250]  # uneven shards: offsets matter


def clustered(n: int, dim: int = DIM, seed: int = 0) -> np.ndarray:
    """Unit vectors from a Gaussian mixture whose variance decays along the dims (Matryoshka-like)."""
    rng = np.random.default_rng(seed)
    scale = 1.0 / np.sqrt(1 + np.arange(dim) / 8)
    centers = rng.normal(size=(20, dim)) * scale
    x = centers[rng.integers(0, 20, n)] + 0.5 * rng.normal(size=(n, dim)) * scale
    x = x.astype(np.float16).astype(np.float32)  # what the shards store
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def write_shards(root, x: np.ndarray, rows=SHARD_ROWS) -> list[str]:
    paths, start = [], 0
    for i, n in enumerate(rows):
        v = x[start:start + n].astype(np.float16)
        col = pa.FixedSizeListArray.from_arrays(pa.array(v.ravel(), pa.float16()), x.shape[1])
        table = pa.table({"id": [f"d{j}" for j in range(start, start + n)], "meta": [None] * n, "vector": col})
        rel = f"shards/run/part-{i:03d}.parquet"
        (root / "shards" / "run").mkdir(parents=True, exist_ok=True)
        pq.write_table(table, root / rel, row_group_size=128)  # several row groups: row takes read a few
        paths.append(rel)
        start += n
    return paths


@pytest.fixture()
def corpus(tmp_path):
    x = clustered(sum(SHARD_ROWS))
    x = x / np.linalg.norm(x.astype(np.float16).astype(np.float32), axis=1, keepdims=True)
    paths = write_shards(tmp_path, x)
    stored = np.concatenate([ParquetVectors(Storage(str(tmp_path)), paths, SHARD_ROWS, DIM).take(
        i, np.arange(n)).astype(np.float32) for i, n in enumerate(SHARD_ROWS)])
    return Storage(str(tmp_path)), paths, tiers.truncate(stored, DIM)  # unit rows, as the funnel scores them


def brute(x: np.ndarray, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    s = q @ x.T
    i = np.argsort(-s, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(s, i, axis=1), i


# -- the sample ------------------------------------------------------------------------------------

def test_sample_shards_counts_rows_and_keeps_all_when_small(corpus):
    store, paths, stored = corpus
    scan = sample_shards(store, paths, capacity=5000, dim=DIM)
    assert scan.rows == SHARD_ROWS and scan.offsets == [0, 300, 550, 950]
    assert np.array_equal(scan.ordinals, np.arange(sum(SHARD_ROWS)))
    np.testing.assert_allclose(scan.vectors.astype(np.float32), stored, atol=2e-3)
    small = sample_shards(store, paths, capacity=100, dim=DIM)
    assert len(small.ordinals) == 100 and small.vectors.dtype == np.float16


def test_sample_shards_is_uniform_without_replacement_across_uneven_shards(corpus, monkeypatch):
    """The per-shard draws (sizes from a multivariate hypergeometric split) add up to a uniform sample
    of the corpus: every row equally likely, whatever its shard; rows travel with their ordinals."""
    from embindex.index import sampling

    store, paths, stored = corpus
    monkeypatch.setattr(sampling, "run_tasks", lambda fn, calls, **_: [fn(*c) for c in calls])
    n, cap, trials = sum(SHARD_ROWS), 120, 300
    counts = np.zeros(n)
    for t in range(trials):
        scan = sample_shards(store, paths, cap, DIM, seed=t, rows=SHARD_ROWS)
        assert len(scan.ordinals) == cap == len(set(scan.ordinals.tolist()))
        assert np.all(np.diff(scan.ordinals) > 0)
        np.testing.assert_allclose(scan.vectors.astype(np.float32), stored[scan.ordinals], atol=2e-3)
        counts[scan.ordinals] += 1
    freq, p = counts / trials, cap / n
    bounds = np.cumsum([0] + SHARD_ROWS)
    for lo, hi in zip(bounds[:-1], bounds[1:]):  # each shard gets its share (sd of a shard mean ~0.001)
        assert abs(freq[lo:hi].mean() - p) < 0.006, (lo, hi, freq[lo:hi].mean())
        mid = (lo + hi) // 2  # and within a shard, early rows as likely as late ones
        assert abs(freq[lo:mid].mean() - freq[mid:hi].mean()) < 0.012
    assert freq.min() > 0  # no row is unreachable


def test_sample_shards_reads_in_tasks_not_on_the_driver(ray_cluster, corpus, monkeypatch):
    """Under Ray the shards are read by tasks: the driver never opens one (at corpus scale the sample
    pass must not stream every shard through the head node)."""
    store, paths, stored = corpus

    def refuse(*a, **k):
        raise AssertionError("the driver read a shard")

    monkeypatch.setattr(pq, "read_table", refuse)
    monkeypatch.setattr(pq, "ParquetFile", refuse)
    scan = sample_shards(store, paths, capacity=200, dim=DIM)  # row counts unknown: footers read in tasks
    assert scan.rows == SHARD_ROWS and len(scan.ordinals) == 200
    np.testing.assert_allclose(scan.vectors.astype(np.float32), stored[scan.ordinals], atol=2e-3)
    with pytest.raises(ValueError, match="not the 301 its count says"):
        sample_shards(store, paths, capacity=200, dim=DIM, rows=[301, 250, 400, 250])


@pytest.mark.parametrize("factory", ["Flat", "IVF16,Flat"])
def test_extend_tiers_streams_the_delta_one_shard_at_a_time(corpus, tmp_path, factory, monkeypatch):
    """A reindex's delta goes into every tier shard by shard: the same search results as brute force
    over base + delta, while Python-side memory stays near one delta shard (not all of them at once)."""
    import tracemalloc

    from embindex.incremental.delta_tiers import extend_tiers
    from embindex.index.vector_io import read_vectors

    store, paths, stored = corpus
    cfg = IndexConfig(uri=store.root, factory=factory, quality_sample=20, train_sample=600)
    base, _ = build_tiers(store, paths[:1], DIM, [16, DIM], cfg, "base", shard_rows=SHARD_ROWS[:1])
    delta_rows = [4000, 4000, 4000]
    big = clustered(sum(delta_rows), seed=3)
    store_d, delta_paths = Storage(str(tmp_path / "d")), []
    for p in write_shards(tmp_path / "d", big, rows=delta_rows):  # under the same root as the base
        delta_paths.append(p.replace("/run/", "/delta/"))
        store.write_bytes(delta_paths[-1], store_d.read_bytes(p))
    from embindex.incremental import delta_tiers

    held = []  # Python-side bytes alive just after each shard read that extend_tiers' calls allocated
    # (FAISS's own memory is not counted; neither are other threads', e.g. a session's Ray)

    def read_and_measure(*a, **k):
        v = read_vectors(*a, **k)
        mine = tracemalloc.Filter(True, delta_tiers.__file__, all_frames=True)
        held.append(sum(t.size for t in tracemalloc.take_snapshot().filter_traces([mine]).traces))
        return v

    monkeypatch.setattr(delta_tiers, "read_vectors", read_and_measure)
    tracemalloc.start(30)
    entries = extend_tiers(store, base, delta_paths, SHARD_ROWS[0], "day2")
    tracemalloc.stop()
    shard_bytes = delta_rows[0] * DIM * 4
    # what is alive does not grow shard after shard (all at once would add a shard per read)
    assert len(held) == 3 and max(held) - held[0] < 0.5 * shard_bytes, (held, shard_bytes)
    x = np.concatenate([stored[:SHARD_ROWS[0]], tiers.truncate(big.astype(np.float16).astype(np.float32), DIM)])
    q = clustered(15, seed=9)
    for e in entries:
        assert e.ntotal == len(x) and len(e.deltas) == 1
        searcher = TierSearcher(open_tier(store, e), params={"nprobe": 16})
        s, i = searcher.search(q, 10)
        bs, bi = brute(tiers.truncate(x, e.dim), tiers.truncate(q, e.dim), 10)
        np.testing.assert_allclose(s, bs, atol=1e-4)
        assert (i == bi).mean() > 0.98  # exact up to float ties


# -- index choice ---------------------------------------------------------------------------------

def test_auto_rule():
    assert auto_factory(10_000, 384) == "Flat"
    assert auto_factory(500_000, 384) == "HNSW32,Flat"
    assert auto_factory(5_000_000, 384, memory_budget_mb=16_000) == "IVF2048,Flat"
    assert auto_factory(5_000_000, 384, memory_budget_mb=2_000) == "IVF2048,SQ8"
    assert auto_factory(5_000_000, 384, memory_budget_mb=300) == "OPQ48,IVF2048,PQ48"
    assert auto_factory(5_000_000, 128, memory_budget_mb=200) == "IVF2048,PQ32"
    assert auto_factory(50_000_000, 64, memory_budget_mb=500) == "Binary"
    assert make_index("Binary", 64).metric_type == 1  # L2 / Hamming on sign bits


# -- building -------------------------------------------------------------------------------------

@pytest.mark.parametrize("single_max", [0, 10_000])  # shards layout, single-file layout
def test_flat_tiers_equal_brute_force(corpus, single_max):
    store, paths, stored = corpus
    cfg = IndexConfig(uri=store.root, factory="Flat", quality_sample=50, single_file_max_rows=single_max)
    entries, quality = build_tiers(store, paths, DIM, [16, 32, DIM], cfg, "run")
    assert {e.layout for e in entries} == {"shards" if single_max == 0 else "single"}
    q = clustered(20, seed=5)
    for e in entries:
        x = tiers.truncate(stored, e.dim)
        s, i = TierSearcher(open_tier(store, e)).search(q, 10)
        bs, bi = brute(x, tiers.truncate(q, e.dim), 10)
        assert np.array_equal(i, bi), e.dim
        np.testing.assert_allclose(s, bs, atol=1e-5)
    assert quality["tiers"][str(DIM)]["recall@10"] == 1.0
    assert quality["funnel"]["shortlist_tier"] == 16 and quality["queries"] == 50
    for key in ("recall@10", "recall@10_rescored", "bytes_per_vector", "build_seconds", "ms_per_query"):
        assert key in quality["tiers"]["16"]


def test_corpus_inside_the_sample_builds_from_memory_like_from_shards(corpus, tmp_path, monkeypatch):
    """A corpus that fits the sample is filled and scored from the sample: the same tier files and
    quality report as streaming the shards again."""
    from embindex.index import sampling

    store, paths, _ = corpus
    cfg = IndexConfig(uri=store.root, factory="Flat", quality_sample=60)
    assert sampling.sample_shards(store, paths, 10_000, DIM).complete
    assert not sampling.sample_shards(store, paths, 100, DIM).complete
    built = {}
    for mode in ("memory", "shards"):
        if mode == "shards":
            monkeypatch.setattr(sampling.ShardScan, "complete", property(lambda self: False))
        entries, quality = build_tiers(store, paths, DIM, [16, 32, DIM], cfg, f"run-{mode}")
        files = {e.dim: store.read_bytes(e.files[0]) for e in entries}
        recalls = {d: {k: v for k, v in t.items() if k.startswith("recall")} for d, t in quality["tiers"].items()}
        built[mode] = files, recalls, quality["funnel"].get("recall@10")
    assert built["memory"] == built["shards"]


def test_quality_step_rescores_from_the_row_matrices(corpus, monkeypatch):
    """Given the shards' row matrices, the build's quality step reads candidates from them, not from the
    Parquet vector column, and measures the same recall."""
    from embindex.index import sampling, vector_io
    from embindex.index.shards import vector_matrix_bytes

    store, paths, _ = corpus
    matrices = []
    for rel in paths:
        matrices.append(rel.replace(".parquet", ".vectors.npy"))
        store.write_bytes(matrices[-1], vector_matrix_bytes(pq.read_table(store.fs_path(rel))))
    monkeypatch.setattr(sampling.ShardScan, "complete", property(lambda self: False))  # stream, not memory
    cfg = IndexConfig(uri=store.root, factory="Flat", quality_sample=60)
    recalls = {}
    for mode in ("parquet", "matrices"):
        if mode == "matrices":
            read = vector_io.ShardRows.read

            def no_vector_column(self, s, rows, columns):
                assert "vector" not in columns, "rescored from the Parquet vector column"
                return read(self, s, rows, columns)
            monkeypatch.setattr(vector_io.ShardRows, "read", no_vector_column)
        _, quality = build_tiers(store, paths, DIM, [16, 32, DIM], cfg, f"run-{mode}",
                                 vector_files=matrices if mode == "matrices" else None)
        recalls[mode] = {d: {k: v for k, v in t.items() if k.startswith("recall")} for d, t in quality["tiers"].items()}
    assert recalls["parquet"] == recalls["matrices"] and recalls["parquet"]["16"]["recall@10_rescored"] > 0


def test_funnel_whose_shortlist_covers_the_corpus_is_exact(corpus):
    store, paths, stored = corpus
    n = len(stored)
    q = clustered(15, seed=7)
    _, ei = exact_topk(ParquetVectors(store, paths, SHARD_ROWS, DIM), q, 10)
    bs, bi = brute(stored, q, 10)
    assert np.array_equal(ei, bi)
    for factory in ("Flat", "Binary"):  # an exact and a very lossy first stage
        first = make_index(factory, 16)
        first.add(tiers.truncate(stored, 16))
        metric = "hamming" if factory == "Binary" else "ip"
        for source in (ParquetVectors(store, paths, SHARD_ROWS, DIM), ArrayVectors(stored)):
            s, i = Funnel(TierSearcher(first, metric), [Rescore(source)], factor=n).search(q, 10)
            assert np.array_equal(i, bi), (factory, type(source).__name__)
            np.testing.assert_allclose(s, bs, atol=1e-5)


def test_parquet_rescoring_reads_only_the_needed_rows(corpus):
    store, paths, stored = corpus
    src = ParquetVectors(store, paths, SHARD_ROWS, DIM)
    ids = np.array([[3, 310, -1], [940, 3, 551]])
    q = clustered(2, seed=9)
    scores = src.score(q, ids)
    assert np.isneginf(scores[0, 2])
    np.testing.assert_allclose(scores[1], [q[1] @ stored[940], q[1] @ stored[3], q[1] @ stored[551]], atol=1e-5)
    assert src.rows_read == 4 and src.shards_read == 3  # 4 distinct rows of 3 shards; shard 3 untouched


def _fill_by_shards(trained, stored, rows=SHARD_ROWS, dim=32, wrap=False):
    shards, start = [], 0
    for n in rows:
        shards.append(fill_index(trained, tiers.truncate(stored[start:start + n], dim), start, wrap))
        start += n
    return shards


def test_ivf_filled_shard_by_shard_equals_one_process_and_merge_equals_shards(corpus, tmp_path):
    store, paths, stored = corpus
    x = tiers.truncate(stored, 32)
    trained = train_index("IVF16,PQ8x4", 32, x)
    one = faiss_clone(trained)
    one.add(x)  # one process, ids = ordinals
    shards = _fill_by_shards(trained, stored)
    merged = merge_ondisk(trained, iter(shards), [list_sizes(s) for s in shards],
                          str(tmp_path / "t.faiss"), str(tmp_path / "t.ivfdata"))
    reopened = read_ondisk(str(tmp_path / "t.faiss"))
    # inverted lists of the merged index == those of the one-process index, entry for entry
    a, b = ivf(one).invlists, ivf(reopened).invlists
    for j in range(16):
        n = a.list_size(j)
        assert b.list_size(j) == n
        if n:
            import faiss
            assert np.array_equal(faiss.rev_swig_ptr(a.get_ids(j), n), faiss.rev_swig_ptr(b.get_ids(j), n))
            assert np.array_equal(faiss.rev_swig_ptr(a.get_codes(j), n * 4), faiss.rev_swig_ptr(b.get_codes(j), n * 4))
    q = clustered(25, seed=11)
    params = {"nprobe": 4}
    r_one = TierSearcher(one, params=params).search(q, 10)
    r_merged = TierSearcher(reopened, params=params).search(q, 10)
    r_shards = TierSearcher(ShardedIndex(shards), params=params).search(q, 10)
    assert merged.ntotal == reopened.ntotal == len(stored)
    assert np.array_equal(r_merged[1], r_one[1])  # same lists in the same order: identical results
    np.testing.assert_allclose(r_merged[0], r_one[0], atol=1e-6)
    assert_same_ranking(r_shards, r_one)  # 4-bit PQ ties may come back in another order across shards


def assert_same_ranking(got, ref):
    """Same scores, and the same ids wherever the score is not tied with another result."""
    np.testing.assert_allclose(got[0], ref[0], atol=1e-5)
    for gs, gi, ri in zip(got[0], got[1], ref[1]):
        untied = [j for j in range(len(gs)) if np.sum(np.isclose(gs, gs[j], atol=1e-6)) == 1]
        kth_tied = np.isclose(gs, gs[-1], atol=1e-6)
        assert set(gi[~kth_tied]) == set(ri[~kth_tied])
        assert np.array_equal(gi[untied], ri[untied])


def faiss_clone(index):
    import faiss
    return faiss.clone_index(index)


def ivf(index):
    import faiss
    return faiss.downcast_index(faiss.extract_index_ivf(index))


@pytest.mark.timeout(300)
def test_build_tiers_in_ray_tasks_equals_one_process(ray_cluster, corpus, monkeypatch):
    """The pipeline path: Ray fill tasks (one per shard), on-disk merge for IVF in a task (it maps every
    shard's lists: not on the driver), shards for Flat/binary."""
    store, paths, stored = corpus

    def refuse(*a, **k):
        raise AssertionError("the on-disk merge ran on the driver")
    monkeypatch.setattr(tier_builder, "merge_ondisk", refuse)  # tasks import their own copy
    cfg = IndexConfig(uri=store.root, factory={"16": "Binary", "32": "IVF16,PQ8x4", "default": "Flat"},
                      quality_sample=40, single_file_max_rows=0)
    entries, quality = build_tiers(store, paths, DIM, [16, 32, DIM], cfg, "run")
    by_dim = {e.dim: e for e in entries}
    assert [by_dim[d].layout for d in (16, 32, DIM)] == ["shards", "ondisk", "shards"]
    assert by_dim[16].metric == "hamming" and by_dim[32].search_params == {"nprobe": 8}
    assert not (store.exists("shards/run/tier-00032/shard-00000.faiss"))  # merged, then removed
    assert by_dim[32].build["merge_task_peak_rss_mb"] > 0 and by_dim[32].build["merge_s"] >= 0
    # the served IVF tier == the same trained index filled in one process
    served = open_tier(store, by_dim[32])
    one = empty_copy(store, by_dim[32])
    one.add(tiers.truncate(stored, 32))
    q = clustered(20, seed=3)
    got = TierSearcher(served, params={"nprobe": 16}).search(q, 10)
    ref = TierSearcher(one, params={"nprobe": 16}).search(q, 10)
    assert np.array_equal(got[1], ref[1]) and np.allclose(got[0], ref[0], atol=1e-6)
    # the full-width Flat shards equal brute force; the binary funnel is rescored
    _, i = TierSearcher(open_tier(store, by_dim[DIM])).search(q, 10)
    assert np.array_equal(i, brute(stored, tiers.truncate(q, DIM), 10)[1])
    assert quality["tiers"][str(DIM)]["recall@10"] == 1.0
    assert quality["tiers"]["16"]["recall@10_rescored"] >= quality["tiers"]["16"]["recall@10"]
    assert by_dim[32].bytes_per_vector < by_dim[DIM].bytes_per_vector


def empty_copy(store, entry):
    """The served IVF tier's header without its lists: the trained, empty index it was filled from."""
    import faiss
    index = faiss.read_index(store.fs_path(entry.files[0]), faiss.IO_FLAG_SKIP_IVF_DATA)
    inner = ivf(index)
    lists = faiss.ArrayInvertedLists(inner.nlist, inner.code_size)
    inner.replace_invlists(lists, True)
    lists.this.disown()  # the index owns it now
    inner.ntotal = index.ntotal = 0
    return index


def test_tier_entry_defaults_stay_compatible():
    e = TierEntry(dim=8, factory="Flat", files=["x"])
    assert e.layout == "single" and e.metric == "ip" and e.search_params == {}
