"""`model.name: jina-embeddings-v3`: Jina-XLM-RoBERTa + RoPE with 5 task LoRA adapters, mean pooling.

Loads the ORIGINAL `jinaai/jina-embeddings-v3` checkpoint layout (see `jina_xlmr`) without remote code.

Tasks (config `lora_adaptations`): retrieval.query, retrieval.passage, separation, classification,
text-matching. The actor holds ONE copy of the base weights whatever the task: each task is a peft LoRA
adapter (see `jina_xlmr` / `lora`), chosen per forward call (`task`), or per row when `task` is a list of
task names (mixed-task batch, peft's `adapter_names`). The special task `"none"` (`NO_TASK`) means the base
weights without LoRA and without an instruction prefix (the reference's `adapter_mask=None`); it must be
asked for explicitly — `task=None` with no `spec.task` is an error, because v3 without a task is rarely
what one wants.

Role and task:

* the tokenizer prepends an instruction from config `task_instructions`. For the retrieval tasks the
  instruction follows the ROLE: "query" -> `task_instructions["retrieval.query"]`, "document" ->
  `task_instructions["retrieval.passage"]`. For the other tasks it is the task's own (empty) instruction.
* the encoder's LoRA follows the TASK. An index built with task "retrieval.passage" (documents) is
  searched with `query_task_for("retrieval.passage") == "retrieval.query"` (role "query"); every other
  task is symmetric (the same task on both sides).

Output: fp32 mean over the attention mask of the last hidden state (instruction tokens, `<s>` and `</s>`
included), not normalised; the Embedder L2-normalises. Matryoshka: truncate to one of
`ModelInfo.matryoshka_dims` first, then normalise.

Late chunking (not implemented here) can use `JinaV3Encoder.token_embeddings`.
"""

from __future__ import annotations

import os
from typing import Sequence

import torch

from .base import ModelError, ModelFamily, ModelInfo, Role, TextEncoder
from .device import pick_device, resolve_dtype
from .pooling import mean_pool
from .tokenization import PrefixTokenizer
from .jina_xlmr import (
    JinaXLMRBackbone,
    XLMRConfig,
    build_backbone,
    header_tensors,
    load_tokenizer_json,
    parse_config,
    prepare_checkpoint,
    tokenizer_max_length,
)

NO_TASK = "none"
"""Explicit "no task": base weights, no LoRA, no instruction prefix."""

RETRIEVAL_QUERY = "retrieval.query"
RETRIEVAL_PASSAGE = "retrieval.passage"
DEFAULT_MAX_LENGTH = 8192


def _instruction(instructions: dict[str, str], role: Role, task: str) -> str:
    """The instruction prefix for `role` under `task` (see the module docstring)."""
    if task == NO_TASK:
        return ""
    if task in (RETRIEVAL_QUERY, RETRIEVAL_PASSAGE):
        task = RETRIEVAL_QUERY if role == "query" else RETRIEVAL_PASSAGE
    return instructions.get(task, "")


class JinaV3Tokenizer(PrefixTokenizer):
    """`tokenizers` pipeline from tokenizer.json (normalizer included) + the role/task instruction."""

    padding_side = "right"

    def __init__(self, path: str, max_length: int, instructions: dict[str, str], tasks: Sequence[str],
                 default_task: str | None, pad_token_id: int):
        self.tok = load_tokenizer_json(path)
        self.tok.enable_truncation(max_length)  # counts <s> and </s>, like the reference's truncation
        self.max_length = max_length
        self.instructions = dict(instructions)
        self.tasks = list(tasks)
        self.default_task = default_task
        self.pad_token_id = int(pad_token_id)

    def prefix(self, role: Role, task: str | None = None) -> str:
        """The instruction prepended to texts of `role` under `task`."""
        return _instruction(self.instructions, role, _resolve_task(task, self.default_task, self.tasks))


def _resolve_task(task: str | None, default: str | None, tasks: Sequence[str]) -> str:
    t = task if task is not None else default
    if t is None:
        raise ModelError(
            f"jina-embeddings-v3 needs a task: one of {list(tasks)}, or {NO_TASK!r} for the base weights "
            "without LoRA (set model.task or pass task=...)"
        )
    if t != NO_TASK and t not in tasks:
        raise ModelError(f"jina-embeddings-v3 has no task {t!r}; choose one of {list(tasks)} or {NO_TASK!r}")
    return t


class JinaV3Encoder(TextEncoder):
    """Backbone + task LoRA + fp32 mean pooling."""

    def __init__(self, backbone: JinaXLMRBackbone, tasks: Sequence[str], default_task: str | None,
                 device: torch.device, dtype: torch.dtype):
        self.backbone = backbone
        self.tasks = list(tasks)
        self.default_task = default_task
        self.device, self.dtype = device, dtype

    def lora_tasks(self, task: str | Sequence[str] | None, batch: int) -> str | list[str | None] | None:
        """Task name(s) -> the backbone's LoRA choice: None (base), one task, or one task per row (None = base)."""
        if task is None or isinstance(task, str):
            t = _resolve_task(task, self.default_task, self.tasks)
            return None if t == NO_TASK else t
        names = [_resolve_task(n, self.default_task, self.tasks) for n in task]
        if len(names) != batch:
            raise ModelError(f"got {len(names)} per-row tasks for a batch of {batch} rows")
        return [None if t == NO_TASK else t for t in names]

    def forward_token_states(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, task: str | Sequence[str] | None = None
    ) -> torch.Tensor:
        return self.token_embeddings(input_ids, attention_mask, task)

    @torch.inference_mode()
    def token_embeddings(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, task: str | Sequence[str] | None = None
    ) -> torch.Tensor:
        """[B, L] -> [B, L, H] last hidden states (model dtype); `task` may be a list of per-row tasks."""
        ids = input_ids.to(self.device)
        return self.backbone(ids, attention_mask.to(self.device), self.lora_tasks(task, ids.shape[0]))

    @torch.inference_mode()
    def forward_pooled(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, task: str | Sequence[str] | None = None,
        role: Role | None = None,
    ) -> torch.Tensor:
        """[B, L] -> [B, H] fp32 masked mean, not normalised."""
        mask = attention_mask.to(self.device)
        return mean_pool(self.token_embeddings(input_ids, mask, task), mask)


class JinaEmbeddingsV3Family(ModelFamily):
    """The original jina-embeddings-v3 checkpoint (config.json without `model_type`, LoRA in the weights)."""

    name = "jina-embeddings-v3"

    def __init__(self, spec):
        super().__init__(spec)
        self.cfg: XLMRConfig = parse_config(spec.path)
        raw = self.cfg.raw
        tasks = raw.get("lora_adaptations")
        if not tasks or not isinstance(tasks, list):
            raise ModelError(f"{spec.path}/config.json: no 'lora_adaptations'; not a jina-embeddings-v3 checkpoint")
        if NO_TASK in tasks:
            raise ModelError(f"{spec.path}/config.json: a LoRA task named {NO_TASK!r} clashes with the no-task option")
        self.tasks: list[str] = [str(t) for t in tasks]
        for key in ("lora_rank", "lora_alpha"):
            if raw.get(key) is None:
                raise ModelError(f"{spec.path}/config.json: missing {key!r}")
        if raw.get("emb_pooler") not in (None, "mean"):
            raise ModelError(f"{spec.path}/config.json: emb_pooler {raw['emb_pooler']!r} is not supported (mean only)")
        if spec.pooling not in ("auto", "mean"):
            raise ModelError(f"jina-embeddings-v3 uses mean pooling (got pooling {spec.pooling!r})")
        instr = raw.get("task_instructions") or {}
        self.instructions: dict[str, str] = {t: str(instr.get(t) or "") for t in self.tasks}
        if spec.task is not None:
            _resolve_task(spec.task, None, self.tasks)
        default_max = min(tokenizer_max_length(spec.path, DEFAULT_MAX_LENGTH), self.cfg.max_position_embeddings)
        self.max_length = int(spec.max_length or default_max)
        if self.max_length > self.cfg.max_position_embeddings:
            raise ModelError(
                f"model.max_length {self.max_length} exceeds the model's {self.cfg.max_position_embeddings} positions"
            )
        mrl = raw.get("matryoshka_dimensions")
        self.matryoshka_dims = sorted(int(d) for d in mrl) if mrl else None
        if self.matryoshka_dims and self.matryoshka_dims[-1] > self.cfg.hidden_size:
            raise ModelError(
                f"{spec.path}/config.json: matryoshka_dimensions {mrl} exceed hidden_size {self.cfg.hidden_size}"
            )
        if not os.path.exists(os.path.join(spec.path, "tokenizer.json")):
            raise ModelError(f"{spec.path}: no tokenizer.json")
        # fail now (not in the actor) on config/shape mismatches and missing adapter tensors: headers only
        prepare_checkpoint(spec.path, self.cfg, header_tensors(spec.path), **self._lora_kwargs())

    def _lora_kwargs(self) -> dict:
        return {
            "lora_tasks": self.tasks,
            "lora_rank": int(self.cfg.raw["lora_rank"]),
            "lora_alpha": float(self.cfg.raw["lora_alpha"]),
            "require_lora": True,
        }

    def check_task(self, task: str | None) -> None:
        """Like the base check, plus the explicit `NO_TASK`; None is an error unless `spec.task` is set."""
        _resolve_task(task, self.spec.task, self.tasks)

    def query_task_for(self, task: str | None) -> str | None:
        """The task to encode queries with against an index built with `task` (retrieval.passage ->
        retrieval.query; every other task is symmetric)."""
        t = task if task is not None else self.spec.task
        return RETRIEVAL_QUERY if t == RETRIEVAL_PASSAGE else t

    def info(self) -> ModelInfo:
        return ModelInfo(
            family=self.name,
            dim=self.cfg.hidden_size,
            max_length=self.max_length,
            pooling="mean",
            tasks=list(self.tasks),
            matryoshka_dims=self.matryoshka_dims,
            prefixes={
                "query": self.instructions.get(RETRIEVAL_QUERY, ""),
                "document": self.instructions.get(RETRIEVAL_PASSAGE, ""),
            },
            extra={
                "task_instructions": dict(self.instructions),
                "query_task": {t: self.query_task_for(t) for t in self.tasks},
                "no_task": NO_TASK,
                "lora_rank": int(self.cfg.raw["lora_rank"]),
                "lora_alpha": float(self.cfg.raw["lora_alpha"]),
                "rotary_emb_base": self.cfg.rotary_base,
            },
        )

    def load_tokenizer(self) -> JinaV3Tokenizer:
        return JinaV3Tokenizer(
            self.spec.path, self.max_length, self.instructions, self.tasks, self.spec.task, self.cfg.pad_token_id
        )

    def load_encoder(self, device: str | torch.device | None = None) -> JinaV3Encoder:
        dev = pick_device(device)
        dtype = resolve_dtype(self.spec.dtype, dev)
        backbone, _ = build_backbone(self.spec.path, self.cfg, dev, dtype, **self._lora_kwargs())
        return JinaV3Encoder(backbone, self.tasks, self.spec.task, dev, dtype)
