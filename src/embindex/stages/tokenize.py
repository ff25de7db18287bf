"""`tokenize`: text -> input ids (and chunk spans), images -> prepared pixels, in CPU tasks
(`embed.tokenize.tokenize_batch`)."""

from __future__ import annotations

from typing import Any, Callable

import pyarrow as pa

from ..config import JobConfig
from ..embed.tokenize import tokenize_batch
from .base import TaskStage


class Tokenize(TaskStage):
    name = "tokenize"

    def __init__(self, cfg: JobConfig, max_length: int):
        self.cfg, self.max_length = cfg, max_length

    def function(self) -> tuple[Callable[..., pa.Table], dict[str, Any]]:
        cfg = self.cfg
        return tokenize_batch, {"model_json": cfg.model.model_dump_json(),
                                "outputs_json": cfg.outputs.model_dump_json(), "role": cfg.model.role,
                                "task": cfg.model.task, "max_length": self.max_length,
                                "max_image_pixels": cfg.source.max_image_pixels,
                                "store_content": cfg.index.store_content}
