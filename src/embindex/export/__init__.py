"""Export a version of an index to a serving engine (LanceDB, Postgres + pgvector, Elasticsearch, NDJSON
files), incrementally: a target that holds an older version of the same index gets only the delta.

    from embindex.export import export_index
    export_index("s3://bucket/indexes/docs", "lancedb:///srv/lancedb/docs", tier=256)
"""

from __future__ import annotations

from .job import ExportResult, export_index
from .state import ConflictError, ExportError, ExportState, TargetError

__all__ = ["export_index", "ExportResult", "ExportError", "TargetError", "ConflictError", "ExportState"]
