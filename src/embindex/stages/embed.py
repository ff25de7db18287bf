"""`embed`: the embedding model on its actor pool (`resources`), one vector (or token vectors) per row
(`embed.actor.EmbedActor`)."""

from __future__ import annotations

from typing import Any

from ..config import JobConfig
from ..embed.actor import EmbedActor
from .base import ActorStage


class Embed(ActorStage):
    name = "embed"

    def __init__(self, cfg: JobConfig, window: int, window_overlap: int, progress: str | None = None,
                 share: int = 1):
        super().__init__(cfg.resources, share)
        self.cfg, self.window, self.window_overlap, self.progress = cfg, window, window_overlap, progress

    def actor(self, torch_threads: int) -> tuple[type, dict[str, Any]]:
        cfg = self.cfg
        return EmbedActor, {"model_json": cfg.model.model_dump_json(), "outputs_json": cfg.outputs.model_dump_json(),
                            "task": cfg.model.task, "batch_tokens": cfg.resources.batch_tokens,
                            "torch_threads": torch_threads, "window": self.window,
                            "window_overlap": self.window_overlap, "progress": self.progress}
