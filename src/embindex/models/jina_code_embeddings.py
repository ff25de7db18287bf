"""jina-code-embeddings-0.5b / -1.5b: a Qwen2 (Qwen2.5-Coder) decoder with last-token pooling.

Facts (MODELS.md §5, model card `INSTRUCTION_CONFIG`):

* Backbone: transformers' native `Qwen2Model`, SDPA attention. The weights are read with safetensors
  (never pickle) and may be stored Qwen2Model-style (`embed_tokens.weight`, `layers.N...`, `norm.weight`) or
  Qwen2ForCausalLM-style (the same keys under `model.`, plus an ignored `lm_head.weight`).
* Text fed to the model = `instruction + text` (plain concatenation). Each task has a query and a passage
  instruction; the pipeline's role "document" takes the passage instruction. A task is required.
* Tokenizer: the checkpoint's `tokenizer.json` through `tokenizers` (its post-processor decides whether any
  special token is appended; Qwen2.5's adds none, so nothing is appended here). Padding side: the
  `padding_side` of `tokenizer_config.json`, else the `padding.direction` of `tokenizer.json`, else right.
  Either side gives the same vectors: last-token pooling finds the last attended token per row, and position
  ids are counted from each row's first real token, so left padding does not shift RoPE positions.
* Pooling: hidden state of the last attended token (no final normalisation here; the Embedder L2-normalises).
* Matryoshka dims: 896-wide (0.5b) -> [64, 128, 256, 512, 896]; 1536-wide (1.5b) -> [128, 256, 512, 1024,
  1536] (jina.ai model pages). Other widths: `matryoshka_dimensions` / `matryoshka_dims` from config.json when
  present, else [h/8, h/4, h/2, h] (our choice; it gives the tiny fixture's 8/16/32/64). Truncate, then
  normalise.
"""

from __future__ import annotations

import os
from typing import Any, Sequence

import numpy as np
import torch

from .base import ModelError, ModelFamily, ModelInfo, ModelSpec, Role, TextEncoder, TextTokenizer
from .checkpoint_files import load_checked_state, load_tokenizer_file, read_config, read_json, safetensors_files
from .device import pick_device, resolve_dtype
from .pooling import last_token_pool
from .tokenization import batch_ids

QUERY_PREFIXES: dict[str, str] = {
    "nl2code": "Find the most relevant code snippet given the following query:\n",
    "qa": "Find the most relevant answer given the following question:\n",
    "code2code": "Find an equivalent code snippet given the following code snippet:\n",
    "code2nl": "Find the most relevant comment given the following code snippet:\n",
    "code2completion": "Find the most relevant completion given the following start of code snippet:\n",
}
PASSAGE_PREFIXES: dict[str, str] = {
    "nl2code": "Candidate code snippet:\n",
    "qa": "Candidate answer:\n",
    "code2code": "Candidate code snippet:\n",
    "code2nl": "Candidate comment:\n",
    "code2completion": "Candidate completion:\n",
}
TASKS: list[str] = list(QUERY_PREFIXES)

# hidden size -> published Matryoshka dims
KNOWN_MATRYOSHKA: dict[int, list[int]] = {
    896: [64, 128, 256, 512, 896],
    1536: [128, 256, 512, 1024, 1536],
}
DEFAULT_MAX_LENGTH = 8192  # the model card's MAX_LENGTH; the architecture allows 32768



def task_prefix(task: str | None, role: str) -> str:
    """The instruction prepended to a text of `role` ("query", or "document"/"passage") for `task`."""
    if task is None:
        raise ModelError(f"jina-code-embeddings needs a task; choose one of {TASKS}")
    if task not in QUERY_PREFIXES:
        raise ModelError(f"jina-code-embeddings has no task {task!r}; choose one of {TASKS}")
    if role == "query":
        return QUERY_PREFIXES[task]
    if role in ("document", "passage"):
        return PASSAGE_PREFIXES[task]
    raise ModelError(f"unknown role {role!r}; expected 'query' or 'document'")


def matryoshka_dims(hidden_size: int, config: dict[str, Any]) -> list[int]:
    """Matryoshka widths for a checkpoint (see the module docstring for the rule)."""
    if hidden_size in KNOWN_MATRYOSHKA:
        return list(KNOWN_MATRYOSHKA[hidden_size])
    declared = config.get("matryoshka_dimensions") or config.get("matryoshka_dims")
    if declared:
        dims = sorted({int(d) for d in declared if 0 < int(d) <= hidden_size} | {hidden_size})
        return dims
    if hidden_size % 8 == 0:
        return [hidden_size // 8, hidden_size // 4, hidden_size // 2, hidden_size]
    return [hidden_size]



class JinaCodeTokenizer(TextTokenizer):
    """Instruction prefix + text -> token ids with the checkpoint's own `tokenizer.json`."""

    def __init__(self, path: str, max_length: int, default_task: str | None):
        self.tok = load_tokenizer_file(path, max_length)
        tok_file = os.path.join(path, "tokenizer.json")
        self.max_length = max_length
        self.default_task = default_task
        tok_cfg = read_json(os.path.join(path, "tokenizer_config.json")) or {}
        tok_json = read_json(tok_file) or {}
        self.padding_side = _padding_side(tok_cfg, tok_json)
        self.pad_token_id = _pad_token_id(self.tok, tok_cfg)

    def __call__(self, texts: Sequence[str], role: Role, task: str | None = None) -> list[np.ndarray]:
        prefix = task_prefix(task if task is not None else self.default_task, role)
        return batch_ids(self.tok, [prefix + t for t in texts])


def _token_content(tok: Any) -> str | None:
    if isinstance(tok, dict):
        return tok.get("content")
    return tok


def _padding_side(tok_cfg: dict[str, Any], tok_json: dict[str, Any]) -> str:
    side = tok_cfg.get("padding_side")
    if side is None and isinstance(tok_json.get("padding"), dict):
        side = str(tok_json["padding"].get("direction", "Right")).lower()
    side = (side or "right").lower()
    if side not in ("left", "right"):
        raise ModelError(f"unsupported padding_side {side!r} in the tokenizer files")
    return side


def _pad_token_id(tok: Any, tok_cfg: dict[str, Any]) -> int:
    for name in ("pad_token", "eos_token"):
        content = _token_content(tok_cfg.get(name))
        if content is not None and tok.token_to_id(content) is not None:
            return int(tok.token_to_id(content))
    return 0  # any id works: padded positions are masked out and never pooled


class JinaCodeEncoder(TextEncoder):
    """Qwen2Model + last-token pooling."""

    def __init__(self, path: str, device: torch.device, dtype: torch.dtype):
        from transformers import Qwen2Config, Qwen2Model
        from transformers.models.qwen2.modeling_qwen2 import Qwen2RotaryEmbedding

        self.device, self.dtype = device, dtype
        config = Qwen2Config.from_pretrained(path, local_files_only=True)
        config._attn_implementation = "sdpa"
        with torch.device("meta"):  # no random init; real tensors are assigned below
            model = Qwen2Model(config)
        state = load_qwen2_state_dict(path, model.state_dict(), dtype, device)
        model.load_state_dict(state, strict=True, assign=True)
        model.rotary_emb = Qwen2RotaryEmbedding(config).to(device)  # non-persistent buffers, rebuilt off meta
        self.model = model.eval()

    @torch.inference_mode()
    def forward_pooled(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, task: str | None = None,
        role: Role | None = None,
    ) -> torch.Tensor:
        ids = input_ids.to(self.device)
        mask = attention_mask.to(self.device)
        # positions count from each row's first real token, so left padding matches right padding
        position_ids = (mask.long().cumsum(1) - 1).clamp(min=0)
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=position_ids, use_cache=False)
        return last_token_pool(out.last_hidden_state, mask)


def load_qwen2_state_dict(
    path: str, expected: dict[str, torch.Tensor], dtype: torch.dtype, device: torch.device
) -> dict[str, torch.Tensor]:
    """Read safetensors weights into Qwen2Model keys (a leading `model.` stripped, `lm_head.*` dropped),
    checking names and shapes against `expected`."""

    def rename(key: str) -> str | None:
        name = key[len("model.") :] if key.startswith("model.") else key
        return None if name.startswith("lm_head.") else name

    return load_checked_state(path, expected, rename, dtype, device, "Qwen2")


class JinaCodeEmbeddingsFamily(ModelFamily):
    """`model.name: jina-code-embeddings` (0.5b / 1.5b, or any Qwen2 checkpoint in the same layout)."""

    name = "jina-code-embeddings"
    fp16_safe = False  # Qwen decoder: float16 activations overflow

    def __init__(self, spec: ModelSpec):
        super().__init__(spec)
        config = read_config(spec.path)
        if config.get("model_type") != "qwen2":
            raise ModelError(
                f"{spec.path}: model_type {config.get('model_type')!r}; jina-code-embeddings expects 'qwen2'"
            )
        if not os.path.exists(os.path.join(spec.path, "tokenizer.json")):
            raise ModelError(f"{spec.path}: no tokenizer.json")
        safetensors_files(spec.path)  # fail early when there are no safetensors weights
        task_prefix(spec.task, "query")  # a known task is required
        if spec.pooling not in ("auto", "last"):
            raise ModelError(f"jina-code-embeddings uses last-token pooling (got pooling {spec.pooling!r})")
        if spec.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ModelError(f"unknown dtype {spec.dtype!r}")
        self.config = config
        self.task: str = spec.task  # type: ignore[assignment]
        self.dim = int(config["hidden_size"])
        arch_max = int(config.get("max_position_embeddings", 32768))
        self.max_length = int(spec.max_length or min(DEFAULT_MAX_LENGTH, arch_max))
        if self.max_length > arch_max:
            raise ModelError(f"model.max_length {self.max_length} exceeds the model's {arch_max} positions")
        self.matryoshka = matryoshka_dims(self.dim, config)

    def info(self) -> ModelInfo:
        return ModelInfo(
            family=self.name,
            dim=self.dim,
            max_length=self.max_length,
            pooling="last",
            tasks=list(TASKS),
            matryoshka_dims=list(self.matryoshka),
            prefixes={"query": QUERY_PREFIXES[self.task], "document": PASSAGE_PREFIXES[self.task]},
            extra={
                "model_type": "qwen2",
                "task": self.task,
                # search: queries against an index built with task T use task query_task[T], role "query"
                "query_task": {t: t for t in TASKS},
                "query_prefixes": dict(QUERY_PREFIXES),
                "document_prefixes": dict(PASSAGE_PREFIXES),
            },
        )

    def load_tokenizer(self) -> JinaCodeTokenizer:
        return JinaCodeTokenizer(self.spec.path, self.max_length, self.task)

    def load_encoder(self, device: str | torch.device | None = None) -> JinaCodeEncoder:
        dev = pick_device(device)
        return JinaCodeEncoder(self.spec.path, dev, resolve_dtype(self.spec.dtype, dev))
