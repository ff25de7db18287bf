"""What an export target records about the index it holds (a contract shared by every sink).

A target (a LanceDB table, a Postgres table, an Elasticsearch index, an export folder) keeps one state
record: which index it was loaded from (URI and manifest fingerprint), the vector width, the last version
completely exported, the version being exported (`pending`, set until the export finishes) and the shards
whose rows it holds. Shards are recorded as each wave of them is written, so an interrupted export is
resumed by running it again: shards already recorded are not sent twice.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Any

from ..storage import is_remote

STATE_FORMAT = 1


class ExportError(RuntimeError):
    """An export that cannot go on; the message says why and what to do."""


class TargetError(ExportError):
    """The target cannot be reached, or refuses the credentials."""


class ConflictError(ExportError):
    """The target holds something else (another index, another width, a foreign table or mapping)."""


@dataclass
class ExportState:
    index: str  # normalized URI of the exported index
    fingerprint: str | None  # manifest fingerprint: vectors of two versions are comparable iff equal
    width: int  # vector width in the target
    full_dim: int
    version: str | None = None  # last version completely exported
    pending: str | None = None  # version being exported (an interrupted export leaves it set)
    shards: list[str] = field(default_factory=list)  # shard paths whose live rows the target holds
    fields: dict[str, Any] = field(default_factory=dict)  # metadata field kinds (see plan.infer_fields)
    updated_at: str = ""
    format: int = STATE_FORMAT

    def to_json(self) -> str:
        self.updated_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str | dict) -> "ExportState":
        data = json.loads(text) if isinstance(text, str) else dict(text)
        known = {k: data[k] for k in cls.__dataclass_fields__ if k in data}
        return cls(**known)


def index_identity(root: str) -> str:
    """The index URI as recorded in targets: remote URIs as given (no trailing slash), local paths absolute."""
    if is_remote(root):
        return root.rstrip("/")
    path = root[len("file://"):] if root.startswith("file://") else root
    return os.path.abspath(path)
