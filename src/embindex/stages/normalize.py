"""`normalize`: the row rules that need the corpus-wide view, applied per fragment: ids that occur more than
once become `duplicate_id` rejects, and a reindex keeps only the rows of its delta (new or changed documents,
and rejects)."""

from __future__ import annotations

from typing import Any, Callable

import pyarrow as pa

from ..incremental.diff import keep_delta_rows
from ..sources.normalize import mark_duplicates
from .base import TaskStage


def normalize_rows(table: pa.Table, duplicate_ids: frozenset[str], embed_ids: pa.Array | None) -> pa.Table:
    table = mark_duplicates(table, duplicate_ids)  # first: a duplicate is a reject, which a delta keeps
    return table if embed_ids is None else keep_delta_rows(table, embed_ids)


class Normalize(TaskStage):
    name = "normalize"

    def __init__(self, duplicate_ids: frozenset[str] = frozenset(), embed_ids: list[str] | None = None):
        self.duplicate_ids = frozenset(duplicate_ids)
        self.embed_ids = None if embed_ids is None else pa.array(sorted(embed_ids), pa.string())

    def function(self) -> tuple[Callable[..., pa.Table], dict[str, Any]]:
        return normalize_rows, {"duplicate_ids": self.duplicate_ids, "embed_ids": self.embed_ids}
