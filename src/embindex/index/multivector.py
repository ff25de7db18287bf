"""Multi-vector storage and candidate generation: a token-level FAISS index whose ids are the row
ordinals of the documents the tokens belong to, and MaxSim over stored token vectors.

The token index is built out of core (`build_token_index`), like the tiers (tier_builder.py):

  1. plan     row counts per shard from the Parquet footers -> row-ordinal offsets
  2. train    only when the factory needs it (IVF): on a uniform sample of token vectors drawn by
              one task per shard (its share from a hypergeometric split of the footer token counts)
  3. fill     one Ray task per shard (filling.run_tasks / fill_index): reads that shard's token
              vectors, adds them to a copy of the empty/trained index with id = row ordinal, writes
              a partial index under shards/<run>/tokens/
  4. merge    in one task, one partial at a time into shards/<run>/tokens.faiss; partials are
              then removed.
              Flat (the default, what the manifest calls "IDMap2,Flat"): the file is streamed in
              FAISS's own IndexIDMap2(IndexFlat) format, byte for byte what `faiss.serialize_index`
              writes for the same index, so search/reader.py reads it as before. IVF factories: FAISS
              on-disk layout (tokens.faiss header + tokens.ivfdata, merge.py), opened with
              `open_token_index`.

Driver memory: the training sample. A task holds one partial index at a time (the IVF merge maps
every partial's lists).
"""

from __future__ import annotations

import os
import resource
import shutil
import struct
import tempfile
from typing import Any, BinaryIO, Iterator, Sequence

from .faiss_lib import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..storage import Storage, StorageOptions, is_remote
from . import layout, tiers
from .factories import ivf_nlist, ivf_of, make_index
from ..ray_runtime import run_tasks
from .filling import fill_index, list_sizes
from .merge import merge_ondisk, staged_outputs, stored_indexes
from .sampling import draw_positions, split_sample
from .shards import read_table
from .tier_io import TierCache, read_ondisk
from .training import train_index
from .vector_io import shard_rows

TOKEN_FACTORY = "Flat"  # the manifest's "IDMap2,Flat"
TOKEN_FLAT_MAX = 2_000_000  # token vectors in one Flat file (1 GB at 128-d); more: IVF on disk
TOKEN_TRAIN_SAMPLE = 100_000
TOKEN_MIN_NPROBE = 32


def token_matrix(cell: pa.ListScalar | pa.Array) -> np.ndarray:
    """One row's list<fixed_size_list<float16>[d]> -> [n, d] float32."""
    arr = cell.values if isinstance(cell, pa.ListScalar) else cell
    if arr is None or len(arr) == 0:
        return np.zeros((0, 0), np.float32)
    d = arr.type.list_size
    return arr.flatten().to_numpy(zero_copy_only=False).reshape(-1, d).astype(np.float32)


def shard_token_vectors(table: pa.Table) -> list[np.ndarray]:
    """All rows' token matrices of a shard table with a `token_vectors` column."""
    flat, lengths = shard_tokens(table)
    ends = np.cumsum(lengths)
    return [flat[e - n : e] for e, n in zip(ends, lengths)]


def shard_tokens(table: pa.Table) -> tuple[np.ndarray, np.ndarray]:
    """All token vectors of a shard as one [n_tokens, d] float32 matrix, and the token count per row."""
    col = table.column("token_vectors").combine_chunks()
    d = col.type.value_type.list_size
    flat = col.flatten().flatten().to_numpy(zero_copy_only=False).reshape(-1, d).astype(np.float32)
    return flat, col.value_lengths().fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)


def token_ids(lengths: np.ndarray, offset: int) -> np.ndarray:
    """The row ordinal of every token: row i of the shard (offset + i) repeated lengths[i] times."""
    return np.repeat(np.arange(offset, offset + len(lengths), dtype=np.int64), lengths)


def fill_token_shard(root: str, options: StorageOptions, shard_rel: str, offset: int, out_rel: str,
                     wrap_ids: bool, trained: bytes) -> dict[str, Any]:
    """Ray task: one shard's token vectors into a copy of `trained` (ids = row ordinals), written to `out_rel`."""
    store = Storage(root, options)
    vecs, lengths = shard_tokens(read_table(store, shard_rel, columns=["token_vectors"]))
    index = fill_index(tiers.deserialize(trained), vecs, offset, wrap_ids, ids=token_ids(lengths, offset))
    data = tiers.serialize(index)
    store.write_bytes(out_rel, data)
    return {"rel": out_rel, "rows": int(len(lengths)), "ntotal": int(index.ntotal), "bytes": len(data),
            "list_sizes": list_sizes(index), "pid": os.getpid(),
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0}


def _draw_tokens(root: str, options: StorageOptions, rel: str, take: int, seed: int) -> np.ndarray:
    """Task: `take` token vectors of one shard drawn uniformly without replacement (all when fewer)."""
    vecs, _ = shard_tokens(read_table(Storage(root, options), rel, columns=["token_vectors"]))
    return vecs[draw_positions(len(vecs), take, seed)]


def sample_tokens(store: Storage, shard_paths: Sequence[str], capacity: int, dim: int, seed: int = 0,
                  counts: Sequence[int] | None = None) -> np.ndarray:
    """A uniform sample of min(capacity, tokens) token vectors over all shards: the sample size split over
    the shards by a multivariate hypergeometric draw on their token counts (`counts`, else the footers'),
    then one task per shard draws its share. The driver holds the sample only."""
    counts = counts if counts is not None else shard_footer_counts(store, shard_paths, dim)[1]
    take, seeds = split_sample(counts, capacity, seed)
    calls = [(store.root, store.options, rel, int(t), int(seeds[i]))
             for i, (rel, t) in enumerate(zip(shard_paths, take)) if t > 0]
    parts = run_tasks(_draw_tokens, calls)
    return np.concatenate(parts) if parts else np.zeros((0, dim), np.float32)


def fill_token_shards(store: Storage, shard_paths: Sequence[str], trained: faiss.Index, run_id: str,
                      wrap_ids: bool, rows: Sequence[int] | None = None) -> list[dict[str, Any]]:
    """One fill task per shard (Ray tasks when Ray is up); results in shard order. `rows`: the shards'
    row counts (row-ordinal offsets), else read from their footers here."""
    rows = rows if rows is not None else [shard_rows(store, rel) for rel in shard_paths]
    offsets = np.cumsum([0, *rows])[:-1]
    calls = [(store.root, store.options, rel, int(off), layout.token_partial_path(run_id, i), wrap_ids)
             for i, (rel, off) in enumerate(zip(shard_paths, offsets))]
    return run_tasks(fill_token_shard, calls, shared={"trained": tiers.serialize(trained)})


def _index_header(fourcc: bytes, index: faiss.Index, ntotal: int) -> bytes:
    """FAISS's `write_index_header` for an index of `ntotal` entries (dummies as FAISS writes them)."""
    head = fourcc + struct.pack("<iqqq?i", index.d, ntotal, 1 << 20, 1 << 20, bool(index.is_trained),
                                int(index.metric_type))
    return head + (struct.pack("<f", index.metric_arg) if index.metric_type > 1 else b"")


def _flat_fourcc(flat: faiss.Index) -> bytes:
    return {faiss.METRIC_INNER_PRODUCT: b"IxFI", faiss.METRIC_L2: b"IxF2"}.get(flat.metric_type, b"IxFl")


def _check_flat_format(flat: faiss.Index) -> None:
    """Our IDMap2(Flat) writer must equal FAISS's own for an empty index, else refuse to write."""
    empty = faiss.IndexIDMap2(faiss.clone_index(flat))
    ours = (_index_header(b"IxM2", empty, 0) + _index_header(_flat_fourcc(flat), flat, 0)
            + struct.pack("<Q", 0) + struct.pack("<Q", 0))
    if ours != tiers.serialize(empty):
        raise RuntimeError(f"FAISS {faiss.__version__} serializes IndexIDMap2(IndexFlat) differently; "
                           "the streamed token index writer needs updating")


def write_flat_idmap(out: BinaryIO, flat: faiss.Index, partials: Iterator[faiss.Index], ntotal: int) -> None:
    """Stream IndexIDMap2(`flat`) holding every partial's entries in order, one partial in memory at a
    time: headers, then the codes of each partial, then (from a side file) the ids."""
    _check_flat_format(flat)
    out.write(_index_header(b"IxM2", flat, ntotal) + _index_header(_flat_fourcc(flat), flat, ntotal))
    out.write(struct.pack("<Q", ntotal * flat.d))
    written = 0
    with tempfile.TemporaryFile() as ids_file:
        for part in partials:
            n = int(part.ntotal)
            if n:
                out.write(memoryview(faiss.rev_swig_ptr(faiss.downcast_index(part.index).get_xb(), n * flat.d)))
                ids_file.write(faiss.vector_to_array(part.id_map).astype(np.int64).tobytes())
            written += n
            del part
        if written != ntotal:
            raise RuntimeError(f"partial token indexes hold {written} entries, the fill tasks reported {ntotal}")
        out.write(struct.pack("<Q", ntotal))
        ids_file.seek(0)
        shutil.copyfileobj(ids_file, out, 1 << 20)


def merge_token_partials(root: str, options: StorageOptions, trained: bytes, results: Sequence[dict[str, Any]],
                         rel: str) -> None:
    """Task: merge the partial token indexes into `rel` (Flat: one streamed IDMap2 file; IVF: header +
    on-disk lists beside it), off the driver (an IVF merge maps every partial's lists)."""
    store = Storage(root, options)
    owner = tiers.deserialize(trained)
    index = faiss.downcast_index(owner)  # a view: `owner` keeps the C++ object alive
    partials = stored_indexes(store, [r["rel"] for r in results])
    if ivf_of(index) is None:
        with staged_outputs(store, [rel]) as (path,), open(path, "wb") as f:
            write_flat_idmap(f, index, partials, sum(r["ntotal"] for r in results))
        return
    with staged_outputs(store, [rel, layout.ivfdata_beside(rel)]) as paths:
        merge_ondisk(index, partials, [r["list_sizes"] for r in results], *paths)


def _train_tokens(store: Storage, shard_paths: Sequence[str], factory: str, dim: int, train_sample: int,
                  seed: int, counts: Sequence[int]) -> faiss.Index:
    """The empty index of `factory`, trained on a token sample when it needs training."""
    empty = make_index(factory, dim)
    if empty.is_trained:
        return empty
    return train_index(factory, dim, sample_tokens(store, shard_paths, train_sample, dim, seed, counts))


def _footer_counts(root: str, options: StorageOptions, rel: str, dim: int) -> tuple[int, int]:
    """Task: (rows, token vectors) of one shard from its Parquet footer (tokens = leaf values / dim; no
    data read)."""
    store = Storage(root, options)
    with store.fs.open(store.fs_path(rel), "rb") as f:
        md = pq.ParquetFile(f).metadata
    cols = [j for j in range(md.num_columns) if md.schema.column(j).path.startswith("token_vectors.")]
    values = sum(md.row_group(g).column(j).num_values for g in range(md.num_row_groups) for j in cols)
    return md.num_rows, values // max(dim, 1)


def shard_footer_counts(store: Storage, shard_paths: Sequence[str], dim: int) -> tuple[list[int], list[int]]:
    """Rows and token vectors stored in each shard, from the footers (one task per shard)."""
    counts = run_tasks(_footer_counts, [(store.root, store.options, rel, dim) for rel in shard_paths])
    return [int(r) for r, _ in counts], [int(t) for _, t in counts]


def token_factory(n_tokens: int) -> str:
    """Flat (one file, searched exactly, loaded whole by a reader) up to TOKEN_FLAT_MAX token vectors;
    above, IVF with on-disk inverted lists (a reader maps them; only the probed lists are touched)."""
    return TOKEN_FACTORY if n_tokens <= TOKEN_FLAT_MAX else f"IVF{ivf_nlist(n_tokens)},Flat"


def build_token_index(store: Storage, shard_paths: Sequence[str], dim: int, run_id: str,
                      factory: str | None = None, train_sample: int = TOKEN_TRAIN_SAMPLE,
                      seed: int = 0) -> dict[str, Any]:
    """Inner-product index over every stored token vector, id = the token's row ordinal, built out of
    core (module docstring). `factory`: Flat, an IVF factory (on-disk lists, see `open_token_index`),
    or None to choose by size (`token_factory`). Returns the manifest's `token_index` entry: file,
    files (with the on-disk lists), factory, vectors and, for IVF, nprobe."""
    rows, counts = shard_footer_counts(store, shard_paths, dim)
    factory = factory or token_factory(sum(counts))
    trained = _train_tokens(store, shard_paths, factory, dim, train_sample, seed, counts)
    ivf = ivf_of(trained)
    if ivf is None and not isinstance(faiss.downcast_index(trained), faiss.IndexFlat):
        raise ValueError(f"token index factory {factory!r}: only Flat and IVF factories can be merged")
    results = fill_token_shards(store, shard_paths, trained, run_id, wrap_ids=ivf is None, rows=rows)
    rel = layout.token_index_path(run_id)
    run_tasks(merge_token_partials, [(store.root, store.options, tiers.serialize(trained), results, rel)])
    for r in results:
        store.delete(r["rel"])
    entry: dict[str, Any] = {"file": rel, "files": [rel], "factory": "IDMap2,Flat" if ivf is None else factory,
                             "vectors": int(sum(r["ntotal"] for r in results))}
    if ivf is not None:
        entry.update(files=[rel, layout.ivfdata_beside(rel)], nprobe=min(ivf.nlist, max(TOKEN_MIN_NPROBE, ivf.nlist // 16)))
    return entry


def open_token_index(store: Storage, entry: dict[str, Any], cache: TierCache | None = None) -> faiss.Index:
    """Open the token index a manifest `token_index` entry describes: one file (Flat), or an IVF header
    whose on-disk lists are mapped from the file next to it, searched with the entry's nprobe. Files of a
    remote index come from the tier cache."""
    rels = entry.get("files") or [entry["file"]]
    paths = ((cache or TierCache()).paths(store, rels) if is_remote(store.root)
             else [store.fs_path(r) for r in rels])
    index = read_ondisk(paths[0]) if len(rels) > 1 else faiss.read_index(paths[0])
    if entry.get("nprobe"):
        faiss.extract_index_ivf(index).nprobe = int(entry["nprobe"])
    return index


def maxsim_scores(query: np.ndarray, docs: Sequence[np.ndarray]) -> np.ndarray:
    """ColBERT MaxSim of one [q, d] query against each [n_i, d] document: sum over query tokens of the
    best dot product over the document's tokens (0 for a document without tokens)."""
    out = np.zeros(len(docs), dtype=np.float32)
    for j, d in enumerate(docs):
        if len(d):
            out[j] = float((query @ d.T).max(axis=1).sum())
    return out


def token_candidates(index: faiss.Index, query: np.ndarray, token_k: int) -> np.ndarray:
    """Row ordinals whose tokens are among the `token_k` nearest of any query token."""
    _, ids = index.search(np.ascontiguousarray(query, dtype=np.float32), min(token_k, index.ntotal))
    return np.unique(ids[ids >= 0])
