"""Merge IVF shard indexes into one serving index whose inverted lists live on disk.

FAISS does the merge (`OnDiskInvertedLists.merge_from_multiple`, what `faiss.contrib.ondisk` uses):
the data file holds every list packed back to back, list j = its codes (size x code_size bytes) then
its ids (size x 8 bytes), entries in shard order; the index file is FAISS's header with "ilod" lists
pointing at it, opened with `faiss.read_index(path, IO_FLAG_ONDISK_SAME_DIR)` (tier_io.read_ondisk).
Memory: one shard index at a time. Each shard's lists are first written alone (FAISS "ilar" format,
no quantizer) to a temporary folder next to the data file, then all of them are memory-mapped for the
merge; so the merge needs free disk for about twice the data file.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from typing import Iterable, Iterator, Sequence

from .faiss_lib import faiss
import numpy as np

from ..storage import Storage, is_remote
from . import tiers
from .factories import ivf_of
from .tier_io import quiet_stdout


def stored_indexes(store: Storage, rels: Sequence[str]) -> Iterator[faiss.Index]:
    """The indexes stored at `rels`, loaded one at a time (a merge holds one in memory)."""
    for rel in rels:
        yield tiers.deserialize(store.read_bytes(rel))


@contextlib.contextmanager
def staged_outputs(store: Storage, rels: Sequence[str]) -> Iterator[list[str]]:
    """Local paths to write `rels` to, put in place when the block succeeds. Local roots stage in a
    folder beside each destination, so a large data file is renamed into place, never copied; object
    stores stage in a temporary folder and upload. Nothing is left at `rels` if the block fails."""
    remote = is_remote(store.root)
    staging: dict[str, str] = {}  # destination folder -> its staging folder
    paths = []
    try:
        for rel in rels:
            folder = os.path.dirname(store.fs_path(rel))
            if folder not in staging:
                if not remote:
                    os.makedirs(folder, exist_ok=True)
                staging[folder] = tempfile.mkdtemp(prefix=".staging-", dir=None if remote else folder)
            paths.append(os.path.join(staging[folder], os.path.basename(rel)))
        yield paths
        for path, rel in zip(paths, rels):
            if remote:
                store.fs.put_file(path, store.fs_path(rel))
            else:
                os.replace(path, store.fs_path(rel))
    finally:
        for folder in staging.values():
            shutil.rmtree(folder, ignore_errors=True)


def _write_lists(shard: faiss.Index, path: str) -> None:
    faiss.write_InvertedLists(ivf_of(shard).invlists, faiss.FileIOWriter(path))  # closed when dropped


def _map_lists(path: str, nlist: int, code_size: int) -> faiss.Index:
    """Lists written by `_write_lists`, memory-mapped, held by a tiny IVF index that owns them (a
    Python object cannot safely own lists FAISS allocated: deleting them through SWIG corrupts the
    heap). Its `invlists` is what the merge reads."""
    lists = faiss.read_InvertedLists(faiss.FileIOReader(path), faiss.IO_FLAG_MMAP)
    owner = faiss.IndexIVFScalarQuantizer(faiss.IndexFlatL2(code_size), code_size, nlist,
                                          faiss.ScalarQuantizer.QT_8bit)  # code_size bytes per entry
    owner.replace_invlists(lists, True)
    return owner


def merge_ondisk(trained: faiss.Index, shard_indexes: Iterable[faiss.Index], sizes: Sequence[np.ndarray],
                 index_path: str, data_path: str) -> faiss.Index:
    """Write `index_path` (header) + `data_path` (lists) holding all shards' entries, in shard order.

    `trained`: the empty trained index the shards were filled from (not modified); `shard_indexes`
    may be a lazy generator; `sizes`: their list lengths as the fill tasks reported them, checked
    against the merge. Returns the header index (its lists mapped from `data_path`)."""
    index = faiss.clone_index(trained)
    ivf = ivf_of(index)
    if ivf is None:
        raise ValueError("on-disk merge needs an IVF index")
    nlist, code_size = ivf.nlist, ivf.code_size
    with tempfile.TemporaryDirectory(prefix=".merge-", dir=os.path.dirname(os.path.abspath(data_path))) as tmp:
        paths = []
        for i, shard in enumerate(shard_indexes):
            paths.append(os.path.join(tmp, f"lists-{i:05d}"))
            _write_lists(shard, paths[-1])
            del shard
        owners = [_map_lists(p, nlist, code_size) for p in paths]
        pointers = faiss.InvertedListsPtrVector()
        for owner in owners:
            pointers.push_back(owner.invlists)
        od = faiss.OnDiskInvertedLists(nlist, code_size, data_path)
        with quiet_stdout():  # FAISS reports the file resize on C stdout
            ntotal = od.merge_from_multiple(pointers.data(), pointers.size(), False)
        del pointers, owners  # unmapped before the folder goes
    merged = np.array([od.list_size(j) for j in range(nlist)], dtype=np.int64)
    expected = np.sum(np.stack(sizes), axis=0) if len(sizes) else np.zeros(nlist, np.int64)
    if not np.array_equal(merged, expected):
        raise RuntimeError("shard list sizes do not match the sizes reported by the fill tasks")
    ivf.replace_invlists(od, True)
    od.this.disown()
    index.ntotal = ivf.ntotal = int(ntotal)
    faiss.write_index(index, index_path)
    return index
