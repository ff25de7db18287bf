"""Search reads what a query needs: hit rows' ids and metadata from their row groups only, hidden rows
skipped inside FAISS (selectors), remote tier files from a persistent local cache, and the default tier
chosen by the build-time recall numbers.

Reads are observed at the file level: the reader's filesystem `open` is wrapped so that every byte range
read from a Parquet shard is recorded, then mapped onto the shard's column chunks with its footer."""

from __future__ import annotations

import json
import os
from collections import defaultdict

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from typer.testing import CliRunner

import embindex
from conftest import job_config, sample_docs
from embindex.cli import app
from embindex.config import IndexConfig
from embindex.index import tiers
from embindex.index.manifest import Counts, Manifest, ModelEntry, ShardEntry, TierEntry
from embindex.index.shards import put_part, put_table
from embindex.index.tier_builder import build_tiers
from embindex.index.tier_io import TierCache
from embindex.search.reader import default_tier, recall_target_of
from embindex.storage import Storage

pytestmark = [pytest.mark.timeout(600)]

DIM = 64
SHARD_ROWS = [10_000, 10_000, 6_000]
DOC_COLS = ("id", "meta", "chunk")


# -- a small index written directly from synthetic vectors (no model) ----------------------------------

def clustered(n: int, dim: int = DIM, seed: int = 0) -> np.ndarray:
    """Unit vectors of a Gaussian mixture whose variance decays along the dims (Matryoshka-like)."""
    rng = np.random.default_rng(seed)
    scale = 1.0 / np.sqrt(1 + np.arange(dim) / 8)
    centers = np.random.default_rng(1).normal(size=(50, dim)) * scale
    x = centers[rng.integers(0, 50, n)] + 0.5 * rng.normal(size=(n, dim)) * scale
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _shard_table(x: np.ndarray, start: int, images: np.ndarray) -> pa.Table:
    n = len(x)
    ords = range(start, start + n)
    return pa.table({
        "id": [f"d{j}" for j in ords],
        "chunk": pa.array([j % 3 for j in ords], pa.int32()),
        "start": pa.array([10 * j for j in ords], pa.int64()),
        "end": pa.array([10 * j + 7 for j in ords], pa.int64()),
        "content_hash": [f"h{j}" for j in ords],
        "meta": [json.dumps({"n": j}) for j in ords],
        "source": ["synthetic"] * n,
        "vector": pa.FixedSizeListArray.from_arrays(pa.array(x.astype(np.float16).ravel(), pa.float16()), x.shape[1]),
        "modality": ["image" if images[j - start] else "text" for j in ords],
    })


def synthetic_index(root, factories: dict[int, str] | None = None, hidden: np.ndarray | None = None,
                    images_every: int = 0, rows=SHARD_ROWS, modalities=("text",),
                    single_file_max_rows: int = 200_000, row_matrices: bool = True) -> tuple[str, np.ndarray]:
    """Write shards (as the pipeline does: parts + row matrices; `row_matrices=False`: parts only, as
    older versions wrote them) + tiers + a published manifest under `root`; returns (uri, stored unit vectors)."""
    store = Storage(str(root))
    total = sum(rows)
    x = clustered(total)
    image = np.zeros(total, bool) if not images_every else (np.arange(total) % images_every == 0)
    shards, start = [], 0
    for i, n in enumerate(rows):
        rel = f"shards/syn/part-{i:05d}.parquet"
        table = _shard_table(x[start:start + n], start, image[start:start + n])
        if row_matrices:
            shards.append(ShardEntry(**put_part(store, rel, table)))
        else:
            size, sha = put_table(store, rel, table)
            shards.append(ShardEntry(path=rel, rows=n, bytes=size, sha256=sha))
        start += n
    dims = sorted(factories or {16: "Flat", 32: "Flat", DIM: "Flat"})
    cfg = IndexConfig(uri=str(root), tiers=dims, factory={str(d): f for d, f in (factories or {}).items()} or "Flat",
                      quality_sample=200, train_sample=5000, single_file_max_rows=single_file_max_rows)
    entries, quality = build_tiers(store, [s.path for s in shards], DIM, dims, cfg, "syn")
    tomb = {}
    if hidden is not None and len(hidden):
        rel = "shards/syn/tombstones.parquet"
        put_table(store, rel, pa.table({"ordinal": pa.array(np.sort(hidden), pa.int64())}))
        tomb = {"path": rel, "rows": int(len(hidden))}
    m = Manifest(version="v000001", created_at="2026-01-01T00:00:00+00:00", run_id="syn",
                 model=ModelEntry(name="synthetic", path="none", checkpoint_hash="sha256:0", max_length=8,
                                  pooling="mean", dtype="float32", modalities=list(modalities)),
                 outputs={"mode": "document"}, dim=DIM, tiers=entries, shards=shards,
                 counts=Counts(rows_in=total, documents=total, chunks=total, vectors=total, rejected=0),
                 quality=quality, config={"index": {"rescore": 10}}, tombstones=tomb)
    store.write_text("versions/v000001/manifest.json", m.to_json())
    store.write_text("_latest", "v000001")
    stored = tiers.truncate(x.astype(np.float16).astype(np.float32), DIM)
    return str(root), stored


@pytest.fixture(scope="module")
def flat_index(tmp_path_factory):
    return synthetic_index(tmp_path_factory.mktemp("flat"))


# -- observing reads ----------------------------------------------------------------------------------

class ReadLog:
    """Wraps a reader's filesystem `open` for the test: records the byte ranges read from each Parquet file
    (fsspec shares one local filesystem object between readers: wrap it just before the reads to observe)."""

    def __init__(self, fs, monkeypatch):
        self.ranges: dict[str, list[tuple[int, int]]] = defaultdict(list)
        self._open = fs.open
        monkeypatch.setattr(fs, "open", self.open)

    def open(self, path, mode="rb", **kwargs):
        f = self._open(path, mode, **kwargs)
        return _Recording(f, self.ranges[path]) if str(path).endswith(".parquet") and "r" in mode else f

    def chunks(self, path: str) -> set[tuple[int, str]]:
        """(row group, column) chunks whose bytes were read, footer reads (the file's tail) left out."""
        md = pq.ParquetFile(path).metadata
        size = os.path.getsize(path)
        out = set()
        for g in range(md.num_row_groups):
            rg = md.row_group(g)
            for c in range(rg.num_columns):
                col = rg.column(c)
                first = col.dictionary_page_offset if col.has_dictionary_page else col.data_page_offset
                end = first + col.total_compressed_size
                if any(a < end and first < b and b < size for a, b in self.ranges.get(path, [])):
                    out.add((g, col.path_in_schema.split(".")[0]))
        return out

    def groups(self, path: str, columns=DOC_COLS) -> set[int]:
        return {g for g, c in self.chunks(path) if c in columns}


class _Recording:
    def __init__(self, f, log):
        self._f, self._log = f, log

    def read(self, n=-1):
        pos = self._f.tell()
        data = self._f.read(n)
        self._log.append((pos, pos + len(data)))
        return data

    def readinto(self, b):
        pos = self._f.tell()
        n = self._f.readinto(b)
        self._log.append((pos, pos + (n or 0)))
        return n

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()

    def __getattr__(self, name):
        return getattr(self._f, name)


def _groups_of(reader, ordinals) -> dict[int, set[int]]:
    """shard -> the row groups holding these ordinals, from the shards' own footers."""
    offsets = np.concatenate([[0], np.cumsum([s.rows for s in reader.manifest.shards])])
    out: dict[int, set[int]] = defaultdict(set)
    for o in ordinals:
        s = int(np.searchsorted(offsets, o, side="right") - 1)
        md = pq.ParquetFile(_shard_paths(reader)[s]).metadata
        starts = np.cumsum([0] + [md.row_group(g).num_rows for g in range(md.num_row_groups)])
        out[s].add(int(np.searchsorted(starts, o - offsets[s], side="right") - 1))
    return out


def _shard_paths(reader) -> list[str]:
    return [reader.storage.fs_path(s.path) for s in reader.manifest.shards]


def brute(stored: np.ndarray, q: np.ndarray, k: int, hidden=()) -> tuple[np.ndarray, np.ndarray]:
    s = q @ stored.T
    s[:, np.asarray(hidden, dtype=np.int64)] = -np.inf
    i = np.argsort(-s, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(s, i, axis=1), i


# -- row-group reads ----------------------------------------------------------------------------------

def test_a_query_reads_only_the_row_groups_of_its_hits(flat_index, monkeypatch):
    uri, stored = flat_index
    reader = embindex.open_index(uri)
    log = ReadLog(reader.storage.fs, monkeypatch)
    hits = reader.search_vectors(clustered(1, seed=5), k=3, tier=DIM)  # full-width Flat: exact, no rescoring
    want = _groups_of(reader, [int(h.id[1:]) for hs in hits for h in hs])
    assert sum(len(g) for g in want.values()) < 5  # of the index's row groups
    for s, path in enumerate(_shard_paths(reader)):
        assert log.groups(path) == want.get(s, set()), (s, log.chunks(path))
        assert not any(c == "vector" for _, c in log.chunks(path))
    # hits equal brute force over the stored vectors, with their metadata and chunk offsets
    q = clustered(4, seed=6)
    hits = reader.search_vectors(q, k=3, tier=DIM)
    bs, bi = brute(stored, q, 3)
    for hs, s_row, i_row in zip(hits, bs, bi):
        assert [h.id for h in hs] == [f"d{i}" for i in i_row]
        np.testing.assert_allclose([h.score for h in hs], s_row, atol=1e-5)
        for h, i in zip(hs, i_row):
            assert h.meta == {"n": int(i)} and h.modality == "text"
            assert h.chunk == {"index": int(i) % 3, "start": 10 * int(i), "end": 10 * int(i) + 7}
    # footers are read once per shard: a second query opens no footer again
    footers = reader.rows.footers_read
    reader.search_vectors(clustered(1, seed=6), k=3, tier=DIM)
    assert reader.rows.footers_read == footers <= len(SHARD_ROWS)


@pytest.fixture(scope="module")
def flat_index_without_row_matrices(tmp_path_factory):
    return synthetic_index(tmp_path_factory.mktemp("flat-parquet-only"), row_matrices=False)


def test_rescoring_reads_rows_of_the_row_matrices_and_no_vector_column(flat_index, monkeypatch):
    """Shortlisted rows are read from each part's row matrix by offset: no Parquet vector chunk is
    decoded, and the hits equal the funnel over vectors in memory."""
    uri, stored = flat_index
    reader = embindex.open_index(uri)
    assert all(s.vectors and reader.storage.exists(s.vectors) for s in reader.manifest.shards)
    log = ReadLog(reader.storage.fs, monkeypatch)
    q = clustered(4, seed=12)
    got = reader.search_vectors(q, k=5, tier=16, rescore=4)
    assert not any(c == "vector" for p in _shard_paths(reader) for _, c in log.chunks(p))
    assert reader.full_width.rows_read == 4 * 5 * 4
    mem = embindex.open_index(uri)
    mem.vectors  # noqa: B018 - load every vector: rescoring from memory
    ref = mem.search_vectors(q, k=5, tier=16, rescore=4)
    assert [[h.id for h in r] for r in got] == [[h.id for h in r] for r in ref]
    # scored against the renormalized stored rows (the full-width tier's definition), as the Parquet path
    want = [[float(q[i] @ stored[int(h.id[1:])]) for h in r] for i, r in enumerate(got)]
    np.testing.assert_allclose([[h.score for h in r] for r in got], want, atol=1e-5)


def test_row_matrix_reads_rows_by_offset_locally_and_from_s3(tmp_path, s3_bucket):
    from embindex.index.vector_io import RowMatrix

    bucket, opts, client = s3_bucket
    x = clustered(300).astype(np.float16)
    table = pa.table({"vector": pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), DIM)})
    local = Storage(str(tmp_path / "l"))
    part = put_part(local, "p/part-0.parquet", table)
    assert part["vectors"] == "p/part-0.vectors.npy" and part["rows"] == 300
    np.testing.assert_array_equal(np.load(local.fs_path(part["vectors"])), x)
    remote = Storage(f"s3://{bucket}/idx", embindex.storage.StorageOptions.from_dict(opts))
    put_part(remote, "p/part-0.parquet", table)
    rows = np.array([7, 8, 9, 299, 0, 8, 150, 151, 3])  # unsorted, repeated, runs of consecutive rows
    for store in (local, remote):
        np.testing.assert_array_equal(RowMatrix(store, part["vectors"]).take(rows), x[rows])
    with pytest.raises(IndexError):
        RowMatrix(remote, part["vectors"]).take(np.array([300]))
    # no vector column (or a null vector): no row matrix
    assert put_part(local, "p/part-1.parquet", table.rename_columns(["other"]))["vectors"] is None


def test_rescoring_reads_only_shortlisted_row_groups_and_equals_the_old_in_memory_funnel(
        flat_index_without_row_matrices):
    """Parts written without a row matrix (older versions) are rescored from their Parquet row groups."""
    uri, stored = flat_index_without_row_matrices
    reader = embindex.open_index(uri)
    assert not any(s.vectors for s in reader.manifest.shards)
    q = clustered(4, seed=11)
    got = reader.search_vectors(q, k=5, tier=16, rescore=4)
    groups = reader.rows.groups_read
    # the same funnel over vectors held in memory (what the reader did for small indexes before)
    mem = embindex.open_index(uri)
    mem.vectors  # noqa: B018 - load every vector: rescoring from memory
    ref = mem.search_vectors(q, k=5, tier=16, rescore=4)
    assert [[(h.id, h.meta, h.chunk) for h in r] for r in got] == [[(h.id, h.meta, h.chunk) for h in r] for r in ref]
    # in memory the fp16 rows were scored as stored; Parquet rescoring renormalizes them (as the full-width tier)
    np.testing.assert_allclose([[h.score for h in r] for r in got], [[h.score for h in r] for r in ref], atol=2e-4)
    assert 0 < groups <= 5 * 4 * 4 + 5 * 4  # candidates' and hits' groups, never more
    # warm: the rescored row groups are cached
    before = reader.rows.groups_read
    reader.search_vectors(q, k=5, tier=16, rescore=4)
    assert reader.rows.groups_read - before <= len(q) * 5  # at most the hits' id groups (usually cached too)


# -- hidden rows: selectors ---------------------------------------------------------------------------

@pytest.mark.parametrize("factories,filtered,single_max", [
    ({16: "Flat", 32: "HNSW32,Flat", DIM: "Flat"}, {16: True, 32: True, DIM: True}, 200_000),
    ({16: "IVF64,Flat", 32: "Binary", DIM: "Flat"}, {16: True, 32: False, DIM: True}, 200_000),
    ({16: "PQ8x4", 32: "HNSW32,SQ8", DIM: "Flat"}, {16: False, 32: True, DIM: True}, 200_000),
    ({16: "Flat", 32: "HNSW32,Flat", DIM: "Binary"}, {16: True, 32: True, DIM: False}, 0),  # faiss.IndexShards
])
def test_tombstoned_rows_are_skipped_inside_faiss_and_k_results_come_back(tmp_path, factories, filtered, single_max):
    q = clustered(3, seed=21)
    x = clustered(sum(SHARD_ROWS))
    near = np.unique(np.argsort(-(q @ x.T), axis=1)[:, :20])  # hide every query's nearest rows
    hidden = np.union1d(near, np.arange(0, sum(SHARD_ROWS), 3))
    uri, stored = synthetic_index(tmp_path, factories=factories, hidden=hidden, single_file_max_rows=single_max)
    reader = embindex.open_index(uri)
    layout = "ondisk" if "IVF" in factories[16] else ("single" if single_max else "shards")
    assert {t.dim: t.layout for t in reader.manifest.tiers}[16] == layout
    calls = []
    search_rows = reader.search_rows
    reader.search_rows = lambda *a, **kw: calls.append(kw["k"]) or search_rows(*a, **kw)
    for dim in sorted(factories):
        calls.clear()
        hits = reader.search_vectors(q, k=10, tier=dim, rescore=20)
        assert all(len(h) == 10 for h in hits)
        assert not {int(h.id[1:]) for hs in hits for h in hs} & set(hidden.tolist())
        assert (calls[0] == 10) == filtered[dim], (dim, calls)  # a filtered search does not over-fetch
        if factories[dim] == "Flat":  # exact tiers (rescored at full width): equal to brute force
            bs, bi = brute(stored, q, 10, hidden)
            assert [[h.id for h in hs] for hs in hits] == [[f"d{i}" for i in row] for row in bi]


def test_modality_filter_reads_only_the_modality_column(tmp_path, monkeypatch):
    uri, stored = synthetic_index(tmp_path, images_every=4, modalities=("text", "image"))
    reader = embindex.open_index(uri)
    log = ReadLog(reader.storage.fs, monkeypatch)
    q = clustered(3, seed=31)
    image_rows = np.arange(0, len(stored), 4)
    text_rows = np.setdiff1d(np.arange(len(stored)), image_rows)
    for modality, rows in (("image", image_rows), ("text", text_rows)):
        hits = reader.search_vectors(q, k=6, tier=DIM, modality=modality)
        assert all(len(h) == 6 and all(x.modality == modality for x in h) for h in hits)
        bs, bi = brute(stored, q, 6, np.setdiff1d(np.arange(len(stored)), rows))
        assert [[h.id for h in hs] for hs in hits] == [[f"d{i}" for i in row] for row in bi]
    ords = [int(h.id[1:]) for m in ("image", "text") for hs in reader.search_vectors(q, k=6, tier=DIM, modality=m)
            for h in hs]
    want = _groups_of(reader, ords)
    for s, path in enumerate(_shard_paths(reader)):
        assert log.groups(path) == want.get(s, set())  # ids and metadata: hit rows' groups only
    # a text-only model's index holds only text: no modality column is read for a filter
    uri2, _ = synthetic_index(tmp_path / "t")
    text_only = embindex.open_index(uri2)
    monkeypatch.undo()
    log2 = ReadLog(text_only.storage.fs, monkeypatch)
    assert text_only.search_vectors(q, k=3, tier=DIM, modality="image") == [[], [], []]
    assert all(not log2.chunks(p) for p in _shard_paths(text_only))


# -- the tier cache -----------------------------------------------------------------------------------

def _upload(local_root, bucket, prefix, client) -> None:
    for dirpath, _, names in os.walk(local_root):
        for name in names:
            path = os.path.join(dirpath, name)
            key = f"{prefix}/{os.path.relpath(path, local_root)}"
            client.upload_file(path, bucket, key)


def test_remote_tier_files_are_cached_across_readers_and_evicted_past_the_limit(tmp_path, s3_bucket):
    bucket, opts, client = s3_bucket
    local, stored = synthetic_index(tmp_path / "src", factories={16: "IVF64,Flat", 32: "Flat", DIM: "Flat"})
    _upload(local, bucket, "idx", client)
    uri = f"s3://{bucket}/idx"
    cache = tmp_path / "cache"
    q = clustered(2, seed=41)

    first = embindex.open_index(uri, storage=opts, cache_dir=str(cache))
    hits = first.search_vectors(q, k=5, tier=16)
    m = first.manifest
    ivf = m.tier(16)
    assert ivf.layout == "ondisk" and set(ivf.sha256) == set(ivf.files)
    assert first.tier_cache.downloads == 2  # header + lists, into one entry
    (ivf_entry,) = [p.name for p in cache.iterdir()]
    second = embindex.open_index(uri, storage=opts, cache_dir=str(cache))
    assert [[h.id for h in r] for r in second.search_vectors(q, k=5, tier=16)] == [[h.id for h in r] for r in hits]
    assert second.tier_cache.downloads == 0  # the second reader does not download again
    flat = m.tier(32)
    entry = cache / flat.sha256[flat.files[0]]  # content-addressed by the manifest's sha256
    second.search_vectors(q, k=5, tier=32)
    assert entry.is_dir() and second.tier_cache.downloads == 1

    # a manifest entry without hashes (older versions, delta files) falls back to path + size + ETag
    no_hash = TierEntry(**{**flat.model_dump(), "sha256": {}})
    fallback = TierCache(str(cache))
    path = fallback.paths(Storage(uri, second.storage.options), no_hash.files)[0]
    assert fallback.downloads == 1 and os.path.basename(os.path.dirname(path)) != flat.sha256[flat.files[0]]
    assert TierCache(str(cache)).paths(Storage(uri, second.storage.options), no_hash.files)[0] == path

    # size limit: opening the full-width tier evicts the least recently used entries (IVF, then flat)
    full = m.tier(DIM)
    limit = sum(os.path.getsize(os.path.join(local, t.files[0])) for t in (full, flat))
    small = embindex.open_index(uri, storage=opts, cache_dir=str(cache), cache_max_bytes=limit)
    small.search_vectors(q, k=5, tier=DIM)
    kept = {p.name for p in cache.iterdir() if not p.name.startswith(".")}
    assert kept == {full.sha256[full.files[0]], os.path.basename(os.path.dirname(path))}
    assert sum(e[1] for e in small.tier_cache.entries()) <= limit and ivf_entry not in kept


# -- the default tier ---------------------------------------------------------------------------------

def _manifest_with_quality(recalls: dict[int, float], config: dict | None = None) -> Manifest:
    tiers_ = [TierEntry(dim=d, factory="Flat", files=[f"t{d}"]) for d in recalls]
    return Manifest(version="v000001", created_at="x", run_id="r",
                    model=ModelEntry(name="m", path="p", checkpoint_hash="h", max_length=8, pooling="mean",
                                     dtype="float32"),
                    outputs={}, dim=max(recalls), tiers=tiers_, shards=[],
                    counts=Counts(rows_in=0, documents=0, chunks=0, vectors=0, rejected=0),
                    quality={"k": 10, "tiers": {str(d): {"recall@10": r - 0.2, "recall@10_rescored": r}
                                                for d, r in recalls.items()}},
                    config=config or {})


def test_recall_target_picks_the_narrowest_tier_that_reaches_it():
    m = _manifest_with_quality({32: 0.93, 64: 0.978, 128: 0.995, 384: 1.0})
    assert recall_target_of(m) == 0.99
    assert default_tier(m, 0.99) == 128
    assert default_tier(m, 0.97) == 64 and default_tier(m, 0.5) == 32
    assert default_tier(m, 1.0) == 384
    assert default_tier(_manifest_with_quality({32: 0.5, 64: 0.6}), 0.99) == 64  # none reaches it: the widest
    no_numbers = _manifest_with_quality({32: 0.5, 64: 0.6})
    no_numbers.quality = {}
    assert default_tier(no_numbers, 0.9) == 64
    assert recall_target_of(_manifest_with_quality({32: 1.0}, {"search": {"recall_target": 0.95}})) == 0.95


def test_reader_and_inspect_use_the_recall_target(flat_index):
    uri, _ = flat_index
    reader = embindex.open_index(uri)
    q = reader.manifest.quality["tiers"]
    expected = min((d for d in (16, 32, DIM) if q[str(d)]["recall@10_rescored"] >= 0.99), default=DIM)
    assert reader.default_tier == expected
    assert embindex.open_index(uri, recall_target=0.01).default_tier == 16
    r = CliRunner().invoke(app, ["inspect", uri])
    assert r.exit_code == 0, r.output
    assert f"default tier {expected} " in r.output


# -- end to end: a real build, text queries ------------------------------------------------------------

def test_text_search_on_a_built_index_reads_only_hit_shards(ray_cluster, tmp_path, monkeypatch):
    docs = sample_docs(120)
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for f in range(4):  # one fragment (and shard) per file
        (corpus / f"part{f}.jsonl").write_text(
            "".join(json.dumps({**d, "topic": f"t{j % 5}"}) + "\n" for j, d in enumerate(docs[f::4])))
    cfg = job_config(str(corpus), str(tmp_path / "idx"), index={"tiers": [32, 128, "full"]})
    cfg_path = tmp_path / "job.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    result = embindex.build(cfg, log=None)
    assert len(result.manifest.shards) == 4
    assert all(set(t.sha256) == set(t.files) for t in result.manifest.tiers)
    store = Storage(str(tmp_path / "idx"))
    for s in result.manifest.shards:  # each part has its row matrix: the vector column, row for row
        stored = pq.read_table(store.fs_path(s.path), columns=["vector"]).column("vector").combine_chunks()
        np.testing.assert_array_equal(np.load(store.fs_path(s.vectors)),
                                      stored.flatten().to_numpy().reshape(s.rows, -1))

    reader = embindex.open_index(str(tmp_path / "idx"))
    log = ReadLog(reader.storage.fs, monkeypatch)
    hits = reader.search(["how do I read a compressed file"], k=2, tier=384)[0]
    read_shards = {s for s, p in enumerate(_shard_paths(reader)) if log.groups(p)}
    offsets = np.concatenate([[0], np.cumsum([s.rows for s in reader.manifest.shards])])
    full = embindex.open_index(str(tmp_path / "idx"))
    rows = [full.ids.index(h.id) for h in hits]
    hit_shards = {int(np.searchsorted(offsets, r, side="right") - 1) for r in rows}
    assert read_shards == hit_shards and len(hit_shards) < 4
    # same hits as brute force over every stored vector, with the source metadata
    q = reader.encode_queries(["how do I read a compressed file"])
    bs, bi = brute(tiers.truncate(full.vectors, 384), q, 2)  # the full-width tier: renormalized fp16 rows
    assert [h.id for h in hits] == [full.ids[i] for i in bi[0]]
    np.testing.assert_allclose([h.score for h in hits], bs[0], atol=1e-5)
    by_id = {d["id"]: d for d in docs}
    assert all(h.meta.get("topic", "").startswith("t") for h in hits) and all(h.id in by_id for h in hits)

    # the CLI's default tier is the one inspect shows
    r = CliRunner().invoke(app, ["inspect", str(tmp_path / "idx")])
    assert f"default tier {reader.default_tier} " in r.output
    r = CliRunner().invoke(app, ["search", str(tmp_path / "idx"), "gzip", "-k", "2", "--recall-target", "0.01",
                                 "--json"])
    assert r.exit_code == 0, r.output
    assert len(json.loads(r.output.strip().splitlines()[-1])["hits"]) == 2


def test_row_group_cache_smaller_than_one_query_needs(tmp_path):
    """Rows of more groups than the cache holds: each call still returns every row (caching a group must
    not evict one the same call still needs)."""
    from embindex.index import rescore_vectors

    x = clustered(1000).astype(np.float16)
    vectors = pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), DIM)
    pq.write_table(pa.table({"vector": vectors}), tmp_path / "s.parquet", row_group_size=100)
    source = rescore_vectors.ParquetVectors(Storage(str(tmp_path)), ["s.parquet"], [1000], DIM,
                                   group_cache_bytes=100 * DIM * 2)  # room for one group
    for rows in ([5, 150, 420, 999, 151], [420, 6, 998], [5]):
        np.testing.assert_array_equal(source.take(0, np.asarray(rows)), x[rows])


def test_rerank_needs_stored_content(flat_index):
    reader = embindex.open_index(flat_index[0])
    hits = reader.search_vectors(clustered(1, seed=5), k=3, tier=DIM)[0]
    with pytest.raises(ValueError, match="index.store_content"):
        reader.contents(hits)
