"""manifest.json: what a version holds and where (a contract; every field in docs/manifest.md)."""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

FORMAT_VERSION = 1


class _M(BaseModel):
    model_config = ConfigDict(extra="allow", protected_namespaces=())


class ShardEntry(_M):
    path: str
    rows: int
    bytes: int
    sha256: str
    # the part's `vector` column again as a float16 [rows, dim] .npy file: what search reads to rescore a
    # few rows (a Parquet read decodes a whole row group per row); None for parts written without one
    vectors: str | None = None


class RejectsEntry(ShardEntry):
    reasons: dict[str, int] = Field(default_factory=dict)


class TierEntry(_M):
    dim: int
    factory: str
    metric: str = "ip"
    files: list[str]
    bytes_per_vector: float | None = None
    build_seconds: float | None = None
    # how `files` make up the tier: "single" (one index), "shards" (one index per Parquet shard, global ids),
    # "ondisk" (an IVF index file + its on-disk inverted lists file); see index/tier_io.py
    layout: str = "single"
    ntotal: int | None = None
    search_params: dict[str, Any] = Field(default_factory=dict)  # e.g. nprobe, efSearch floor
    build: dict[str, Any] = Field(default_factory=dict)  # train/fill/merge seconds, training rows
    sha256: dict[str, str] = Field(default_factory=dict)  # file -> content hash (keys the readers' tier cache)
    # indexes of rows added by reindexes (global ids), searched together with `files`; see delta_tiers.py
    deltas: list[str] = Field(default_factory=list)


class ModelEntry(_M):
    name: str
    path: str
    checkpoint_hash: str
    task: str | None = None
    query_task: str | None = None
    max_length: int
    pooling: str
    dtype: str
    prefixes: dict[str, str] = Field(default_factory=dict)
    modalities: list[str] = Field(default_factory=lambda: ["text"])


class Counts(_M):
    rows_in: int
    documents: int
    chunks: int
    vectors: int
    rejected: int


class Manifest(_M):
    format_version: int = FORMAT_VERSION
    version: str
    created_at: str
    run_id: str
    parent: str | None = None
    model: ModelEntry
    outputs: dict[str, Any]
    dim: int
    metric: str = "ip"
    vector_column: str = "vector"
    vector_dtype: str = "float16"
    tiers: list[TierEntry]
    shards: list[ShardEntry]
    rejects: list[RejectsEntry] = Field(default_factory=list)
    counts: Counts
    quality: dict[str, Any] = Field(default_factory=dict)
    source: dict[str, Any] = Field(default_factory=dict)
    config: dict[str, Any] = Field(default_factory=dict)
    timings: dict[str, float] = Field(default_factory=dict)
    fingerprint: str | None = None  # model + outputs settings: vectors of two versions are comparable iff equal
    fragments: dict[str, int] = Field(default_factory=dict)  # total / embedded / reused in this run
    tombstones: dict[str, Any] = Field(default_factory=dict)  # {path, rows}: ordinals hidden from search
    delta: dict[str, int] = Field(default_factory=dict)  # reindex: added / changed / deleted / unchanged
    trained_rows: int | None = None  # rows the tiers were last trained on (reindex retrains past a growth)

    def tier(self, dim: int | None) -> TierEntry:
        """The tier of width `dim` (None: the narrowest)."""
        if dim is None:
            return min(self.tiers, key=lambda t: t.dim)
        for t in self.tiers:
            if t.dim == dim:
                return t
        raise ValueError(f"index has no tier {dim}; tiers: {[t.dim for t in self.tiers]}")

    def to_json(self) -> str:
        return json.dumps(self.model_dump(mode="json"), indent=2, sort_keys=False)

    @classmethod
    def from_json(cls, text: str) -> "Manifest":
        return cls.model_validate_json(text)
