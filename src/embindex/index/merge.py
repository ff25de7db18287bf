"""Merge IVF shard indexes into one serving index whose inverted lists live on disk.

The result is FAISS's own format: an index file whose invlists are an `OnDiskInvertedLists`
("ilod") pointing at a data file, opened with `faiss.read_index(path, IO_FLAG_ONDISK_SAME_DIR)`.
The data file is written here with plain file writes, shard by shard, into lists pre-sized from the
list lengths the fill tasks reported: list j holds its codes (capacity x code_size bytes) then its
ids (capacity x 8 bytes), lists packed back to back, exactly as `set_all_lists_sizes` lays them
out. Memory: one shard index at a time (no mmap of the output is ever touched).
"""

from __future__ import annotations

import os
from typing import Callable, Iterable, Sequence

from .faiss_lib import faiss
import numpy as np

from .factories import ivf_of

ID_BYTES = 8


def list_offsets(sizes: np.ndarray, code_size: int) -> np.ndarray:
    """Byte offset of each list in the data file (packed, capacity = size)."""
    per_list = sizes.astype(np.int64) * (code_size + ID_BYTES)
    return np.concatenate([[0], np.cumsum(per_list)[:-1]]).astype(np.int64)


def merge_ondisk(trained: faiss.Index, shard_indexes: Iterable[faiss.Index], sizes: Sequence[np.ndarray],
                 index_path: str, data_path: str) -> faiss.Index:
    """Write `index_path` (header) + `data_path` (lists) holding all shards' entries, in shard order.

    `trained` is the empty trained index the shards were filled from; `sizes` the per-shard list
    lengths (in the same order as `shard_indexes`, which may be a lazy generator). Returns the header
    index (its lists mapped read-only from `data_path`)."""
    ivf = ivf_of(trained)
    if ivf is None:
        raise ValueError("on-disk merge needs an IVF index")
    nlist, cs = ivf.nlist, ivf.code_size
    total_sizes = np.sum(np.stack(sizes), axis=0) if len(sizes) else np.zeros(nlist, np.int64)
    offsets = list_offsets(total_sizes, cs)
    ntotal = int(total_sizes.sum())
    filled = np.zeros(nlist, dtype=np.int64)
    with open(data_path, "wb") as f:
        f.truncate(ntotal * (cs + ID_BYTES))
        for shard in shard_indexes:
            il = ivf_of(shard).invlists
            for j in range(nlist):
                n = il.list_size(j)
                if n == 0:
                    continue
                codes = faiss.rev_swig_ptr(il.get_codes(j), n * cs)
                ids = faiss.rev_swig_ptr(il.get_ids(j), n)
                base = offsets[j]
                f.seek(int(base + filled[j] * cs))
                f.write(memoryview(codes))
                f.seek(int(base + total_sizes[j] * cs + filled[j] * ID_BYTES))
                f.write(memoryview(ids).cast("B"))
                filled[j] += n
            del shard, il
    if not np.array_equal(filled, total_sizes):
        raise RuntimeError("shard list sizes do not match the sizes reported by the fill tasks")
    return _write_header(trained, total_sizes, index_path, data_path)


def _write_header(trained: faiss.Index, sizes: np.ndarray, index_path: str, data_path: str) -> faiss.Index:
    index = faiss.clone_index(trained)
    ivf = ivf_of(index)
    od = faiss.OnDiskInvertedLists(ivf.nlist, ivf.code_size, data_path)
    od.read_only = True
    # map the existing file (size = total bytes) and point each list at its packed slot
    od.totsize = os.path.getsize(data_path)
    od.do_mmap()
    sz = np.ascontiguousarray(sizes, dtype=np.uint64)
    od.set_all_lists_sizes(faiss.swig_ptr(sz))
    ivf.replace_invlists(od, True)
    od.this.disown()
    ntotal = int(sizes.sum())
    ivf.ntotal = ntotal
    index.ntotal = ntotal
    faiss.write_index(index, index_path)
    return index


def iter_deserialized(loaders: Iterable[Callable[[], faiss.Index]]) -> Iterable[faiss.Index]:
    """Load shard indexes lazily, one at a time."""
    for load in loaders:
        yield load()
