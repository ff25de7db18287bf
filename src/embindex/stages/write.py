"""`write`: each fragment's part and rejects files, then its commit marker (`index.shards.write_fragment`).
Returns one shard record per file written."""

from __future__ import annotations

from typing import Any, Callable

import pyarrow as pa

from ..index.shards import write_fragment
from .base import TaskStage


class Write(TaskStage):
    """The commit point: it must keep pace with the embed stage. Its tasks reserve no CPU (they mostly
    wait on storage, and at most one runs per embedded fragment), so a read stage that takes every free
    CPU slot for the whole run cannot hold embedded fragments back from being written and committed."""

    name = "write"
    task_options = {"num_cpus": 0}

    def __init__(self, root: str, storage: dict[str, Any], run_id: str, stage_columns: list[str] | None = None):
        self.root, self.storage, self.run_id = root, storage, run_id
        self.stage_columns = list(stage_columns or [])

    def function(self) -> tuple[Callable[..., pa.Table], dict[str, Any]]:
        return write_fragment, {"root": self.root, "storage": self.storage, "run_id": self.run_id,
                                "stage_columns": self.stage_columns}
