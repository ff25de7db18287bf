"""`write`: each fragment's part and rejects files, then its commit marker (`index.shards.write_fragment`).
Returns one shard record per file written."""

from __future__ import annotations

from typing import Any, Callable

import pyarrow as pa

from ..index.shards import write_fragment
from .base import TaskStage


class Write(TaskStage):
    name = "write"

    def __init__(self, root: str, storage: dict[str, Any], run_id: str, stage_columns: list[str] | None = None):
        self.root, self.storage, self.run_id = root, storage, run_id
        self.stage_columns = list(stage_columns or [])

    def function(self) -> tuple[Callable[..., pa.Table], dict[str, Any]]:
        return write_fragment, {"root": self.root, "storage": self.storage, "run_id": self.run_id,
                                "stage_columns": self.stage_columns}
