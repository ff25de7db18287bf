"""The FAISS module, from whichever of the two wheels is installed: `embindex[cpu]` (faiss-cpu) or
`embindex[gpu]` (faiss-gpu-cu12). Both provide the module `faiss`, so exactly one may be installed; without
either, a clear install hint instead of a bare ModuleNotFoundError deep in a worker."""

try:
    import faiss
except ImportError as e:  # pragma: no cover - exercised by tests/test_packaging.py in a subprocess
    raise ImportError("embindex needs FAISS: pip install 'embindex[cpu]' (faiss-cpu), or 'embindex[gpu]' "
                      "(faiss-gpu-cu12) on CUDA machines; install exactly one of them") from e

__all__ = ["faiss"]
