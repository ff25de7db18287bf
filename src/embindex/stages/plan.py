"""The build as a list of stages, from `JobConfig.stages` (default: read -> normalize -> tokenize -> embed ->
write). Build and reindex run the same list; they differ only in what the normalize stage keeps."""

from __future__ import annotations

from typing import Any

from ..config import GenerateStageConfig, JobConfig
from .base import ActorStage, Stage
from .caption import Caption
from .embed import Embed
from .generate import Generate
from .html_to_markdown import HtmlToMarkdown
from .normalize import Normalize
from .read import Read
from .tokenize import Tokenize
from .write import Write

GENERATIVE: dict[str, type[Generate]] = {"html_to_markdown": HtmlToMarkdown, "caption": Caption}


def generative_stages(cfg: JobConfig) -> list[Generate]:
    """The configured generative stages, ready to attach (their checkpoints resolved and fingerprinted)."""
    share = 1 + len(cfg.generative_stages())
    return [GENERATIVE[s.stage](s, share) for s in cfg.generative_stages()]


def plan_stages(cfg: JobConfig, *, read: Read, normalize: Normalize, generate: list[Generate], max_length: int,
                window: int, window_overlap: int, run_id: str, progress: str | None = None) -> list[Stage]:
    """The job's stages in its configured order."""
    by_output = iter(generate)
    share = 1 + len(generate)
    out: list[Stage] = []
    for entry in cfg.stages:
        if isinstance(entry, GenerateStageConfig):
            out.append(next(by_output))
        elif entry == "read":
            out.append(read)
        elif entry == "normalize":
            out.append(normalize)
        elif entry == "tokenize":
            out.append(Tokenize(cfg, max_length))
        elif entry == "embed":
            out.append(Embed(cfg, window, window_overlap, progress, share=share))
        elif entry == "write":
            out.append(Write(cfg.index.uri, cfg.index.storage, run_id, [g.output_column() for g in generate]))
    return out


def apply_stages(stages: list[Stage]) -> Any:
    """The Ray dataset running every stage in order (lazy)."""
    ds = None
    for stage in stages:
        ds = stage.apply(ds)
    return ds


def actor_stages(stages: list[Stage]) -> list[ActorStage]:
    return [s for s in stages if isinstance(s, ActorStage)]
