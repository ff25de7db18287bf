"""Generative stages: a model on its own actor pool writes text for some rows before they are embedded
(`html_to_markdown`: the HTML of text rows -> Markdown; `caption`: image rows -> a caption).

The output replaces the row's `text` (what the embed stage reads; a captioned image row becomes a text row,
its encoded image kept for `index.store_content`) and is stored in the shards with its status, the
generating stage's fingerprint and the generated token count (`index.shards.generated_columns`). The
row's `content_hash` stays that of the source, so a reindex regenerates only new or changed documents.
A row the model cannot take becomes a reject with the model's reason (e.g. `empty_after_cleaning`,
`image_decode_error`), as does an empty output (`empty_generation`) and, with `unfinished: reject`, an
output that hit `max_new_tokens` (`generation_unfinished`); nothing is lost.
"""

from __future__ import annotations

import hashlib
import json
from abc import abstractmethod
from typing import Any, ClassVar

import pyarrow as pa
import pyarrow.compute as pc

from ..checkpoints import resolve_model_path
from ..config import GenerateStageConfig
from ..index.shards import STATUS_OK, generated_columns
from ..models.checkpoint_files import checkpoint_hash
from ..models.generator import Generation, GenerationInput
from ..ray_runtime import ComputeThread
from ..sources.normalize import with_rejects
from .base import ActorStage

EMPTY_GENERATION = "empty_generation"
GENERATION_UNFINISHED = "generation_unfinished"


def stage_fingerprint(cfg: GenerateStageConfig, family: str, checkpoint: str) -> str:
    """What makes two runs of a stage write the same output: model, options, token limit, dtype."""
    payload = {"stage": cfg.stage, "family": family, "checkpoint": checkpoint, "options": cfg.options,
               "max_new_tokens": cfg.max_new_tokens, "dtype": cfg.model.dtype, "unfinished": cfg.unfinished}
    return "sha256:" + hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:32]


def status_of(g: Generation) -> str:
    flags = [f for f, on in (("truncated_input", g.truncated), ("unfinished", not g.finished)) if on]
    return ",".join(flags) or STATUS_OK


def _set(table: pa.Table, name: str, values: list[Any], typ: pa.DataType) -> pa.Table:
    col = pa.array(values, typ)
    if name in table.column_names:
        return table.set_column(table.schema.get_field_index(name), name, col)
    return table.append_column(name, col)


class GenerateActor:
    """Holds one generator; each call generates for the block's rows of `modality` that are not rejects."""

    def __init__(self, stage_json: str, family: str, modality: str, output: str, fingerprint: str,
                 torch_threads: int | None = None, device: str | None = None):
        self._compute = ComputeThread()
        self._compute.setup(self._setup, stage_json, family, modality, output, fingerprint, torch_threads, device)

    def _setup(self, stage_json: str, family: str, modality: str, output: str, fingerprint: str,
               torch_threads: int | None, device: str | None) -> None:
        import torch

        from ..models.registry import load_generator

        if torch_threads:
            torch.set_num_threads(torch_threads)
        self.cfg = GenerateStageConfig.model_validate_json(stage_json)
        m = self.cfg.model
        path = resolve_model_path(m.path, m.storage_options(), m.cache_dir)
        self.generator = load_generator(family, path, device=device, dtype=m.dtype, force_dtype=m.force_dtype,
                                        **self.cfg.options)
        self.modality, self.output, self.fingerprint = modality, output, fingerprint

    def __call__(self, batch: pa.Table) -> pa.Table:
        return self._compute.run(self._generate, batch)

    def _inputs(self, batch: pa.Table, rows: list[int]) -> list[GenerationInput]:
        if self.modality == "image":
            images = batch.column("image").to_pylist()
            return [GenerationInput(image=images[i]) for i in rows]
        texts = batch.column("text").to_pylist()
        return [GenerationInput(text=texts[i]) for i in rows]

    def _generate(self, batch: pa.Table) -> pa.Table:
        n = batch.num_rows
        wanted = pc.and_(pc.is_null(batch.column("reject")), pc.equal(batch.column("modality"), self.modality))
        rows = [i for i, ok in enumerate(pc.fill_null(wanted, False).to_pylist()) if ok]
        results = self.generator.generate(self._inputs(batch, rows), self.cfg.max_new_tokens,
                                          self.cfg.resources.batch_tokens) if rows else []
        text, modality = batch.column("text").to_pylist(), batch.column("modality").to_pylist()
        rejects: dict[int, tuple[str, str]] = {}
        out, status, model, tokens = ([None] * n for _ in range(4))
        for i, g in zip(rows, results):
            reason = self._reject_reason(g)
            if reason is not None:
                rejects[i] = (reason.split(":", 1)[0].strip(), reason[:500])
                text[i] = modality[i] = None
                continue
            out[i], status[i], model[i], tokens[i] = g.text, status_of(g), self.fingerprint, len(g.ids)
            text[i], modality[i] = g.text, "text"
        batch = with_rejects(_set(_set(batch, "text", text, pa.string()), "modality", modality, pa.string()), rejects)
        for name, values, typ in zip(generated_columns(self.output), (out, status, model, tokens),
                                     (pa.string(), pa.string(), pa.string(), pa.int32())):
            batch = _set(batch, name, values, typ)
        return batch

    def _reject_reason(self, g: Generation) -> str | None:
        if g.reject is not None:
            return g.reject
        if not (g.text or "").strip():
            return f"{EMPTY_GENERATION}: the model wrote no text ({len(g.ids)} tokens)"
        if not g.finished and self.cfg.unfinished == "reject":
            return f"{GENERATION_UNFINISHED}: hit max_new_tokens={self.cfg.max_new_tokens} without a stop token"
        return None


class Generate(ActorStage):
    """A generative stage from its config; subclasses name the stage, its default family and the rows it
    reads."""

    family: ClassVar[str]
    modality: ClassVar[str]  # the rows it generates for: "text" (HTML) or "image"

    def __init__(self, cfg: GenerateStageConfig, share: int = 1):
        super().__init__(cfg.resources, share)
        self.cfg = cfg
        self.family_name = cfg.model.name or self.family
        m = cfg.model
        self.checkpoint = checkpoint_hash(resolve_model_path(m.path, m.storage_options(), m.cache_dir))
        self.fingerprint = stage_fingerprint(cfg, self.family_name, self.checkpoint)

    @abstractmethod
    def output_column(self) -> str:
        """The stored output column (`index.shards.generated_columns`)."""

    def actor(self, torch_threads: int) -> tuple[type, dict[str, Any]]:
        return GenerateActor, {"stage_json": self.cfg.model_dump_json(), "family": self.family_name,
                               "modality": self.modality, "output": self.output_column(),
                               "fingerprint": self.fingerprint, "torch_threads": torch_threads}

    def manifest_entry(self, counts: dict[str, int]) -> dict[str, Any]:
        """What the manifest records about this stage (the counts are this run's)."""
        return {"stage": self.name, "family": self.family_name, "path": self.cfg.model.path,
                "checkpoint_hash": self.checkpoint, "fingerprint": self.fingerprint,
                "output": self.output_column(), "options": self.cfg.options,
                "max_new_tokens": self.cfg.max_new_tokens, "counts": counts}
