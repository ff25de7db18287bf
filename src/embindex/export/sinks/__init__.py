"""Export targets, one module each, chosen by the target URI's scheme:

    lancedb:///path/to/db/TABLE, lancedb+s3://bucket/db/TABLE   LanceDB table       (lance_sink)
    postgresql://user:pass@host:port/db?table=NAME              Postgres + pgvector (pg_sink)
    es://host:9200/INDEX, ess://host:443/INDEX                   Elasticsearch       (es_sink; ess = https)
    file:///dir                                                  mapping.json + bulk NDJSON per shard (file_sink)
"""

from __future__ import annotations

from typing import Any

from .base import Sink, mask_uri

SCHEMES = ("lancedb", "lancedb+s3", "lancedb+gs", "lancedb+az", "postgresql", "postgres", "es", "ess", "file")


def open_sink(uri: str, index: bool | None = None, **options: Any) -> Sink:
    """The sink of a target URI; `index`: build the target's ANN index (None: the target's default);
    `options`: target-specific settings (see each sink's constructor)."""
    scheme = uri.split("://", 1)[0].lower() if "://" in uri else ""
    if scheme == "lancedb" or scheme.startswith("lancedb+"):
        from .lance_sink import LanceSink

        return LanceSink(uri, index=index, **options)
    if scheme in ("postgresql", "postgres"):
        from .pg_sink import PgSink

        return PgSink(uri, index=index, **options)
    if scheme in ("es", "ess"):
        from .es_sink import EsSink

        return EsSink(uri, index=index, **options)
    if scheme == "file":
        from .file_sink import FileSink

        return FileSink(uri, index=index, **options)
    raise ValueError(f"unknown export target {mask_uri(uri)!r}: use one of "
                     + ", ".join(f"{s}://" for s in SCHEMES))


__all__ = ["Sink", "open_sink", "SCHEMES"]
