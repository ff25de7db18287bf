"""Any Hugging Face encoder (BERT, MiniLM, RoBERTa, E5, BGE, ...) with sentence-transformers conventions.

Pooling, max length and role prompts are read from the checkpoint's sentence-transformers files when
present (`1_Pooling/config.json`, `sentence_bert_config.json`, `config_sentence_transformers.json`).
"""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np
import torch

from .base import (
    read_config,
    read_json,
    POOLERS,
    ModelError,
    ModelFamily,
    ModelInfo,
    Role,
    TextEncoder,
    TextTokenizer,
    TokenizedText,
    leading_prefix_tokens,
    pick_device,
    resolve_dtype,
    text_offsets,
)



def _st_pooling(path: str) -> str | None:
    """Pooling mode declared by a sentence-transformers checkpoint, if any."""
    modules = read_json(os.path.join(path, "modules.json")) or []
    pool_dirs = [m.get("path", "") for m in modules if m.get("type", "").endswith("Pooling")]
    for d in pool_dirs or ["1_Pooling"]:
        cfg = read_json(os.path.join(path, d, "config.json"))
        if not cfg:
            continue
        if cfg.get("pooling_mode_cls_token"):
            return "cls"
        if cfg.get("pooling_mode_lasttoken"):
            return "last"
        if cfg.get("pooling_mode_mean_tokens"):
            return "mean"
        if cfg.get("pooling_mode"):
            return {"lasttoken": "last", "cls": "cls", "mean": "mean"}.get(cfg["pooling_mode"])
    return None


class HFTokenizer(TextTokenizer):
    def __init__(self, path: str, max_length: int, prompts: dict[str, str]):
        from transformers import AutoTokenizer

        self.tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.max_length = max_length
        self.prompts = prompts
        pad = self.tok.pad_token_id
        self.pad_token_id = int(pad if pad is not None else 0)

    def __call__(self, texts: Sequence[str], role: Role, task: str | None = None) -> list[np.ndarray]:
        prefix = self.prompts.get(role, "")
        batch = [prefix + t for t in texts] if prefix else list(texts)
        enc = self.tok(batch, truncation=True, max_length=self.max_length, add_special_tokens=True)
        return [np.asarray(ids, dtype=np.int32) for ids in enc["input_ids"]]

    def encode_with_offsets(self, text: str, role: Role, task: str | None = None,
                            truncate: bool = True) -> TokenizedText:
        prefix = self.prompts.get(role, "")
        enc = self.tok(prefix + text, truncation=truncate, max_length=self.max_length if truncate else None,
                       add_special_tokens=True, return_offsets_mapping=True, return_special_tokens_mask=True)
        offsets = text_offsets(enc["offset_mapping"], enc["special_tokens_mask"], len(prefix))
        return TokenizedText(np.asarray(enc["input_ids"], dtype=np.int32), offsets, leading_prefix_tokens(offsets))


class HFEncoder(TextEncoder):
    def __init__(self, path: str, pooling: str, device: torch.device, dtype: torch.dtype):
        from transformers import AutoModel
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        self.device, self.dtype = device, dtype
        self.model = AutoModel.from_pretrained(path, local_files_only=True, dtype=dtype)
        self.model.to(device).eval()
        self.pool = POOLERS[pooling]

    @torch.inference_mode()
    def forward_token_states(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, task: str | None = None
    ) -> torch.Tensor:
        out = self.model(input_ids=input_ids.to(self.device), attention_mask=attention_mask.to(self.device))
        return out.last_hidden_state

    def forward_pooled(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, task: str | None = None
    ) -> torch.Tensor:
        hidden = self.forward_token_states(input_ids, attention_mask, task)
        return self.pool(hidden, attention_mask.to(self.device))


class HFEncoderFamily(ModelFamily):
    """`model.name: hf-encoder`: any AutoModel encoder checkpoint directory."""

    name = "hf-encoder"

    def __init__(self, spec):
        super().__init__(spec)
        self.config = read_config(spec.path)
        if spec.task is not None:
            raise ModelError(f"model family 'hf-encoder' takes no task (got {spec.task!r})")
        pooling = spec.pooling if spec.pooling != "auto" else (_st_pooling(spec.path) or "mean")
        if pooling not in POOLERS:
            raise ModelError(f"unknown pooling {pooling!r}; choose one of {sorted(POOLERS)}")
        self.pooling = pooling
        st_cfg = read_json(os.path.join(spec.path, "sentence_bert_config.json")) or {}
        arch_max = int(self.config.get("max_position_embeddings", 512))
        if self.config.get("model_type") in ("roberta", "xlm-roberta", "camembert"):
            arch_max -= 2  # positions start after padding_idx
        default_max = int(st_cfg.get("max_seq_length") or arch_max)
        self.max_length = int(spec.max_length or default_max)
        if self.max_length > arch_max:
            raise ModelError(f"model.max_length {self.max_length} exceeds the model's {arch_max} positions")
        st = read_json(os.path.join(spec.path, "config_sentence_transformers.json")) or {}
        prompts = dict(st.get("prompts") or {})
        if "document" not in prompts and "passage" in prompts:
            prompts["document"] = prompts["passage"]
        self.prompts = {r: prompts.get(r, "") for r in ("query", "document") if prompts.get(r)}
        self.dim = int(self.config.get("hidden_size") or self.config.get("d_model") or 0)
        if not self.dim:
            raise ModelError(f"{spec.path}/config.json has no hidden_size")

    def info(self) -> ModelInfo:
        return ModelInfo(
            family=self.name,
            dim=self.dim,
            max_length=self.max_length,
            pooling=self.pooling,
            prefixes=self.prompts,
            extra={"model_type": self.config.get("model_type")},
        )

    def load_tokenizer(self) -> HFTokenizer:
        return HFTokenizer(self.spec.path, self.max_length, self.prompts)

    def load_encoder(self, device: str | torch.device | None = None) -> HFEncoder:
        dev = pick_device(device)
        return HFEncoder(self.spec.path, self.pooling, dev, resolve_dtype(self.spec.dtype, dev))
