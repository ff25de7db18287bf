"""FAISS index choice per tier: the `auto` rule, building an index from a factory string, search settings.

The `auto` rule (per tier, n = vectors in the corpus, d = tier width, B = index.memory_budget_mb,
b = B / n bytes available per vector; ids cost 8 bytes where stored):

  1. n <= 200k and b >= 4d                      -> "Flat"              exact, no training
  2. n <= 1M and b >= 4d + 264                  -> "HNSW32,Flat"       graph (~256 B/vector of links)
  3. b >= 4d + 8                                -> "IVF{L},Flat"       exact codes, nprobe-limited recall
  4. b >= d + 8                                 -> "IVF{L},SQ8"        1 byte per dim
  5. a PQ code of m bytes fits (m + 8 <= b, m | d, m in 64,48,32,24,16,12,8):
        d >= 256 -> "OPQ{m},IVF{L},PQ{m}"  (rotation balances the uneven variance of Matryoshka dims)
        d <  256 -> "IVF{L},PQ{m}"
  6. otherwise                                  -> "Binary"            sign bits, d/8 bytes, Hamming scan;
                                                                       always rescored in the funnel
with L = the power of two nearest sqrt(n), clamped to [16, 65536] and to n / 39 (FAISS wants ~39
training points per centroid). "Binary" is our alias for FAISS "LSH" (IndexLSH without rotation:
one sign bit per dim) under the L2/Hamming metric; every other tier uses inner product.
"""

from __future__ import annotations

import math

from .faiss_lib import faiss

FLAT_MAX_ROWS = 200_000
HNSW_MAX_ROWS = 1_000_000
HNSW_LINK_BYTES = 256  # HNSW32: 64 level-0 neighbours x 4 bytes
ID_BYTES = 8
PQ_SIZES = (64, 48, 32, 24, 16, 12, 8)


def ivf_nlist(n: int) -> int:
    """Inverted lists for n vectors: nearest power of two to sqrt(n), within [16, 65536] and <= n / 39."""
    nlist = 2 ** round(math.log2(max(math.sqrt(max(n, 1)), 1)))
    nlist = min(nlist, 65536, max(16, 2 ** int(math.log2(max(n // 39, 1)))))
    return max(16, nlist)


def auto_factory(n: int, dim: int, memory_budget_mb: float = 4096) -> str:
    """The FAISS factory `auto` picks for a tier of n vectors of width dim (rule in the module docstring)."""
    b = memory_budget_mb * 2**20 / max(n, 1)
    if n <= FLAT_MAX_ROWS and b >= 4 * dim:
        return "Flat"
    if n <= HNSW_MAX_ROWS and b >= 4 * dim + HNSW_LINK_BYTES + ID_BYTES:
        return "HNSW32,Flat"
    nlist = ivf_nlist(n)
    if b >= 4 * dim + ID_BYTES:
        return f"IVF{nlist},Flat"
    if b >= dim + ID_BYTES:
        return f"IVF{nlist},SQ8"
    for m in PQ_SIZES:
        if dim % m == 0 and m < dim and m + ID_BYTES <= b:
            return f"OPQ{m},IVF{nlist},PQ{m}" if dim >= 256 else f"IVF{nlist},PQ{m}"
    return "Binary"


def is_binary(factory: str) -> bool:
    return factory.strip().lower() == "binary" or "LSH" in factory


def metric_name(factory: str) -> str:
    """Manifest metric of a tier: 'ip', or 'hamming' for binary codes."""
    return "hamming" if is_binary(factory) else "ip"


def make_index(factory: str, dim: int) -> faiss.Index:
    """An empty index for a factory string (or 'Binary'), inner-product metric unless binary.

    IVF-PQ indexes skip FAISS's polysemous training (slow, and only useful with polysemous search,
    which embindex never enables)."""
    if is_binary(factory):
        if dim % 8:
            raise ValueError(f"binary codes need a width divisible by 8, not {dim}")
        fs = "LSH" if factory.strip().lower() == "binary" else factory
        return faiss.index_factory(dim, fs, faiss.METRIC_L2)
    index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    ivf = ivf_of(index)
    if ivf is not None and isinstance(faiss.downcast_index(ivf), faiss.IndexIVFPQ):
        faiss.downcast_index(ivf).do_polysemous_training = False
    return index


def ivf_of(index: faiss.Index):
    """The IndexIVF inside an index (through IndexPreTransform / IDMap), or None."""
    try:
        return faiss.extract_index_ivf(index)
    except RuntimeError:
        return None


def default_search_params(index: faiss.Index) -> dict[str, int]:
    """Search settings recorded in the manifest: nprobe = nlist / 16 within [8, 256]; HNSW efSearch floor."""
    ivf = ivf_of(index)
    if ivf is not None:
        return {"nprobe": int(min(max(ivf.nlist // 16, 8), 256, ivf.nlist))}
    if hnsw_of(index) is not None:
        return {"efSearch": 64}
    return {}


def hnsw_of(index: faiss.Index):
    """The IndexHNSW inside an index (through IDMap / IndexPreTransform), or None."""
    idx = faiss.downcast_index(index)
    while True:
        if isinstance(idx, faiss.IndexHNSW):
            return idx
        inner = getattr(idx, "index", None)
        if inner is None:
            return None
        idx = faiss.downcast_index(inner)


def apply_search_params(index: faiss.Index, params: dict[str, int], k: int) -> None:
    """Set nprobe / efSearch (at least 2k, so a shortlist of k is reachable) on an index."""
    ivf = ivf_of(index)
    if ivf is not None:
        ivf.nprobe = int(params.get("nprobe", min(32, ivf.nlist)))
    hnsw = hnsw_of(index)
    if hnsw is not None:
        hnsw.hnsw.efSearch = int(max(params.get("efSearch", 64), 2 * k))
