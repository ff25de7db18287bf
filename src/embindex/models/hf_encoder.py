"""Any Hugging Face encoder (BERT, MiniLM, RoBERTa, E5, BGE, ...) with sentence-transformers conventions.

A sentence-transformers checkpoint (one with `modules.json`) is embedded as sentence-transformers embeds it:
its module list in order (see `st_modules`), its max length and lowercasing (`sentence_bert_config.json`,
else the tokenizer's `model_max_length`) and its role prompts (`config_sentence_transformers.json`).
Without `modules.json` it is a plain AutoModel with the configured pooling (auto: `1_Pooling/config.json`
if present, else mean).

`forward_pooled` returns what `SentenceTransformer.encode` returns (normalized only when the checkpoint
ends with a Normalize module); the Embedder L2-normalizes every vector for the index afterwards.
"""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np
import torch

from . import st_modules
from .base import ModelError, ModelFamily, ModelInfo, Role, TextEncoder, TextTokenizer, TokenizedText
from .checkpoint_files import read_config, read_json
from .device import pick_device, resolve_dtype
from .pooling import POOLERS
from .tokenization import leading_prefix_tokens, text_offsets


def _st_pooling(path: str) -> str | None:
    """Pooling mode of a checkpoint without modules.json that still has a `1_Pooling/config.json`."""
    cfg = read_json(os.path.join(path, "1_Pooling", "config.json"))
    if not cfg:
        return None
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
    def __init__(self, path: str, max_length: int, prompts: dict[str, str], do_lower_case: bool = False):
        from transformers import AutoTokenizer

        self.tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
        if do_lower_case:
            _add_lowercase(self.tok)
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

    def prompt_prefix(self, prompt: str) -> st_modules.PromptPrefix:
        """The prompt's leading ids as sentence-transformers counts them (its prompt_length)."""
        ids = list(self.tok(prompt, truncation=True, max_length=self.max_length, add_special_tokens=True)["input_ids"])
        special = set(self.tok.all_special_ids)
        if ids and ids[-1] in special:
            ids = ids[:-1]
        loose = bool(ids) and ids[-1] not in special and self.tok.decode([ids[-1]]).strip() == ""
        return st_modules.PromptPrefix(tuple(int(i) for i in ids), loose)


def _add_lowercase(tok) -> None:
    """sentence-transformers' do_lower_case: a Lowercase normalizer first, unless one is there."""
    from tokenizers.normalizers import Lowercase, Sequence as NormalizerSequence

    backend = tok.backend_tokenizer
    norm = backend.normalizer
    present = isinstance(norm, Lowercase) or (
        isinstance(norm, NormalizerSequence) and any(isinstance(n, Lowercase) for n in norm))
    if not present:
        rest = list(norm) if isinstance(norm, NormalizerSequence) else ([norm] if norm is not None else [])
        backend.normalizer = NormalizerSequence([Lowercase(), *rest])


class HFEncoder(TextEncoder):
    """AutoModel + pooling; with `pipeline`, the sentence-transformers modules after the transformer
    (`prompts`: role -> the prompt whose tokens a Pooling with include_prompt=false leaves out)."""

    def __init__(self, path: str, pooling: str, device: torch.device, dtype: torch.dtype,
                 pipeline: st_modules.STPipeline | None = None,
                 prompts: dict[Role, st_modules.PromptPrefix] | None = None):
        from transformers import AutoModel
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        self.device, self.dtype = device, dtype
        self.model = AutoModel.from_pretrained(path, local_files_only=True, dtype=dtype)
        self.model.to(device).eval()
        self.pool = POOLERS.get(pooling)
        self.modules = st_modules.build_modules(pipeline).to(device) if pipeline is not None else None
        self.prompts = dict(prompts or {})

    @torch.inference_mode()
    def _hidden(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        out = self.model(input_ids=input_ids.to(self.device), attention_mask=attention_mask.to(self.device))
        return out.last_hidden_state

    @torch.inference_mode()
    def _st_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                     until_pooling: bool = False, role: Role | None = None) -> dict[str, torch.Tensor]:
        assert self.modules is not None
        input_ids, attention_mask = input_ids.to(self.device), attention_mask.to(self.device)
        features = {"token_embeddings": self._hidden(input_ids, attention_mask).float(),
                    "attention_mask": attention_mask}
        if self.prompts:
            # the rows' role says which prompt they start with (as sentence-transformers knows the prompt it
            # prepended); without it, each row's prompt is recognised from its first tokens
            prefixes = ([self.prompts[role]] if role in self.prompts else []) if role is not None \
                else list(self.prompts.values())
            features["prompt_length"] = st_modules.prompt_lengths(prefixes, input_ids, attention_mask)
        for module in self.modules:
            if until_pooling and isinstance(module, st_modules.Pooling):
                break
            features = module(features)
        return features

    def forward_token_states(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, task: str | None = None
    ) -> torch.Tensor:
        if self.modules is None:
            return self._hidden(input_ids, attention_mask)
        return self._st_features(input_ids, attention_mask, until_pooling=True)["token_embeddings"]

    def forward_pooled(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, task: str | None = None,
        role: Role | None = None,
    ) -> torch.Tensor:
        if self.modules is None:
            hidden = self.forward_token_states(input_ids, attention_mask, task)
            return self.pool(hidden, attention_mask.to(self.device))
        return self._st_features(input_ids, attention_mask, role=role)["sentence_embedding"].float()


class HFEncoderFamily(ModelFamily):
    """`model.name: hf-encoder`: any AutoModel encoder checkpoint directory."""

    name = "hf-encoder"

    def __init__(self, spec):
        super().__init__(spec)
        self.config = read_config(spec.path)
        if spec.task is not None:
            raise ModelError(f"model family 'hf-encoder' takes no task (got {spec.task!r})")
        if self.config.get("is_encoder_decoder"):
            raise ModelError(f"{spec.path}: encoder-decoder checkpoints ({self.config.get('model_type')}) are not "
                             "supported by hf-encoder")
        hidden = int(self.config.get("hidden_size") or self.config.get("d_model") or 0)
        if not hidden:
            raise ModelError(f"{spec.path}/config.json has no hidden_size")
        if spec.pooling != "auto" and spec.pooling not in POOLERS:
            raise ModelError(f"unknown pooling {spec.pooling!r}; choose one of {sorted(POOLERS)}")
        arch_max = int(self.config.get("max_position_embeddings", 512))
        if self.config.get("model_type") in ("roberta", "xlm-roberta", "camembert"):
            arch_max -= 2  # positions start after padding_idx
        self.pipeline = st_modules.read_pipeline(spec.path, hidden, None if spec.pooling == "auto" else spec.pooling)
        if self.pipeline is not None:
            self.pooling, self.dim = self.pipeline.pooling_name, self.pipeline.dim
            tok_cfg = read_json(os.path.join(spec.path, "tokenizer_config.json")) or {}
            default_max = self.pipeline.max_length or min(int(tok_cfg.get("model_max_length") or arch_max), arch_max)
        else:
            self.pooling = spec.pooling if spec.pooling != "auto" else (_st_pooling(spec.path) or "mean")
            self.dim = hidden
            st_cfg = read_json(os.path.join(spec.path, "sentence_bert_config.json")) or {}
            default_max = int(st_cfg.get("max_seq_length") or arch_max)
        self.max_length = int(spec.max_length or default_max)
        if self.max_length > arch_max:
            raise ModelError(f"model.max_length {self.max_length} exceeds the model's {arch_max} positions")
        self.st_config = read_json(os.path.join(spec.path, "config_sentence_transformers.json")) or {}
        try:
            prompts = st_modules.role_prompts(self.st_config)
        except ModelError as e:
            raise ModelError(f"{spec.path}/config_sentence_transformers.json: {e}") from None
        self.prompts = {r: p for r, p in prompts.items() if p}

    def info(self) -> ModelInfo:
        extra = {"model_type": self.config.get("model_type")}
        if self.pipeline is not None:
            extra["similarity_fn_name"] = self.st_config.get("similarity_fn_name")
        return ModelInfo(
            family=self.name,
            dim=self.dim,
            max_length=self.max_length,
            pooling=self.pooling,
            prefixes=self.prompts,
            extra=extra,
        )

    def load_tokenizer(self) -> HFTokenizer:
        lower = self.pipeline is not None and self.pipeline.do_lower_case
        return HFTokenizer(self.spec.path, self.max_length, self.prompts, do_lower_case=lower)

    def load_encoder(self, device: str | torch.device | None = None) -> HFEncoder:
        dev = pick_device(device)
        prefixes: dict[Role, st_modules.PromptPrefix] = {}
        if self.pipeline is not None and self.pipeline.excludes_prompt and self.prompts:
            tok = self.load_tokenizer()
            prefixes = {role: tok.prompt_prefix(p) for role, p in self.prompts.items()}
        return HFEncoder(self.spec.path, self.pooling, dev, resolve_dtype(self.spec.dtype, dev),
                         self.pipeline, prefixes)
