"""embindex: distributed offline indexing for embedding models on Ray.

    import embindex
    result = embindex.build("configs/quickstart.yaml", overrides={"source.uri": "s3://bucket/corpus/"})
    index = embindex.open_index("indexes/quickstart")
    hits = index.search(["how do I list files"], k=10, tier=256)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from .pipeline import BuildResult
    from .search import IndexReader


def build(config: Any, overrides: dict[str, Any] | None = None, **kwargs: Any) -> "BuildResult":
    """Build and publish a new index version; see `embindex.pipeline.build`."""
    from .pipeline import build as _build

    return _build(config, overrides, **kwargs)


def open_index(uri: str, version: str | None = None, **kwargs: Any) -> "IndexReader":
    """Open the latest (or a given) version of an index for search."""
    from .search import open_index as _open

    return _open(uri, version=version, **kwargs)


__all__ = ["build", "open_index", "__version__"]
