"""`model.name: jina-colbert-v2`: Jina-XLM-RoBERTa + RoPE (no LoRA) + a bias-free `linear` projection,
ColBERT multi-vector output (one L2-normalised vector per token), scored with MaxSim.

Tokenisation follows PyLate's ColBERT recipe (the fixture README and MODELS.md §3):

* queries: `<s> [QueryMarker] … </s>` then `<mask>` expansion tokens up to `query_length` (32) ids;
  the text is truncated to `query_length - 1` tokens before the marker is inserted. All 32 tokens are
  attended (`attend_to_expansion_tokens`) and all 32 vectors are kept. The tokenizer returns exactly
  32 ids, so downstream right-padding adds nothing and its attention mask is all ones; the encoder also
  forces attention on `<mask>` tokens of query rows in case a caller's mask left them out.
* documents: `<s> [DocumentMarker] … </s>`, truncated to `document_length - 1` before the marker; the
  whole document is encoded (punctuation included), and the keep mask drops padding and every token in
  the skiplist (`string.punctuation`, each character looked up as a token; characters missing from the
  vocabulary map to `<unk>`, which is therefore dropped too, as in PyLate).
* a row is a query when its second id is the query marker; any other row is treated as a document.

Settings come from `config_sentence_transformers.json` (PyLate keys: query_prefix, document_prefix,
query_length, document_length, do_query_expansion, attend_to_expansion_tokens, skiplist_words) when
present, else PyLate's jina-colbert-v2 values; `model.max_length` overrides document_length. `forward_pooled` raises NotImplementedError: a mean of ColBERT token vectors is
not a meaningful single-vector embedding; use `forward_tokens` and `maxsim`.
"""

from __future__ import annotations

import os
import string
from typing import Any, Sequence

import numpy as np
import torch
from torch.nn import functional as F

from .base import ModelError, ModelFamily, ModelInfo, Role, TextEncoder, TextTokenizer
from .device import pick_device, resolve_dtype
from .jina_xlmr import (
    JinaXLMRBackbone,
    XLMRConfig,
    build_backbone,
    header_tensors,
    load_tokenizer_json,
    parse_config,
    prepare_checkpoint,
    read_json,
)

LINEAR_KEY = "linear.weight"
DEFAULTS: dict[str, Any] = {
    "query_prefix": "[QueryMarker]",
    "document_prefix": "[DocumentMarker]",
    "query_length": 32,
    "document_length": 8194,
    "do_query_expansion": True,
    "attend_to_expansion_tokens": True,
}


def maxsim(query: torch.Tensor | np.ndarray, doc: torch.Tensor | np.ndarray) -> float:
    """ColBERT late-interaction score: sum over query vectors of the max dot product over doc vectors."""
    q = torch.as_tensor(query, dtype=torch.float32)
    d = torch.as_tensor(doc, dtype=torch.float32)
    if d.shape[0] == 0:
        return 0.0
    return float((q @ d.T).max(dim=1).values.sum())


class ColbertTokenizer(TextTokenizer):
    """Marker insertion, `<mask>` query expansion and truncation, on the tokenizer.json pipeline."""

    padding_side = "right"

    def __init__(self, path: str, settings: dict[str, Any]):
        self.settings = settings
        self.query_length = int(settings["query_length"])
        self.document_length = int(settings["document_length"])
        self.expand = bool(settings["do_query_expansion"])
        self.q_tok = load_tokenizer_json(path)
        self.q_tok.enable_truncation(self.query_length - 1)  # room for the marker
        self.d_tok = load_tokenizer_json(path)
        self.d_tok.enable_truncation(self.document_length - 1)
        ids = _special_ids(self.q_tok, settings, path)
        self.query_marker_id = ids["query_marker_id"]
        self.document_marker_id = ids["document_marker_id"]
        self.mask_token_id = ids["mask_token_id"]
        self.pad_token_id = self.mask_token_id  # PyLate pads with the mask token (attention 0 for documents)

    def __call__(self, texts: Sequence[str], role: Role, task: str | None = None) -> list[np.ndarray]:
        if task is not None:
            raise ModelError(f"jina-colbert-v2 takes no task (got {task!r})")
        if role == "query":
            out = []
            for enc in self.q_tok.encode_batch_fast(list(texts)):
                ids = enc.ids
                if self.expand:
                    ids = ids + [self.mask_token_id] * (self.query_length - 1 - len(ids))
                out.append(np.asarray(ids[:1] + [self.query_marker_id] + ids[1:], dtype=np.int32))
            return out
        return [
            np.asarray(e.ids[:1] + [self.document_marker_id] + e.ids[1:], dtype=np.int32)
            for e in self.d_tok.encode_batch_fast(list(texts))
        ]


def _special_ids(tok, settings: dict[str, Any], path: str) -> dict[str, Any]:
    def need(token: str, what: str) -> int:
        i = tok.token_to_id(token)
        if i is None:
            raise ModelError(f"{path}: tokenizer has no {what} token {token!r}")
        return int(i)

    unk = tok.token_to_id("<unk>")
    words = settings.get("skiplist_words") or list(string.punctuation)
    skip = sorted({i if (i := tok.token_to_id(w)) is not None else unk for w in words} - {None})
    return {
        "query_marker_id": need(settings["query_prefix"], "query marker"),
        "document_marker_id": need(settings["document_prefix"], "document marker"),
        "mask_token_id": need("<mask>", "mask"),
        "skiplist_ids": skip,
    }


class ColbertEncoder(TextEncoder):
    """Backbone -> `linear` projection -> per-token L2 normalisation, with the ColBERT keep mask."""

    def __init__(self, backbone: JinaXLMRBackbone, linear: torch.Tensor, ids: dict[str, Any],
                 attend_to_expansion: bool, device: torch.device, dtype: torch.dtype):
        self.backbone = backbone
        self.linear = linear.float()  # [dim, hidden]; projection in fp32 (tiny) after the backbone
        self.query_marker_id = int(ids["query_marker_id"])
        self.mask_token_id = int(ids["mask_token_id"])
        self.skiplist = torch.tensor(ids["skiplist_ids"], dtype=torch.long, device=device)
        self.attend_to_expansion = attend_to_expansion
        self.device, self.dtype = device, dtype

    @torch.inference_mode()
    def forward_tokens(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, task: str | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, L] -> ([B, L, dim] fp32 unit vectors, [B, L] bool keep mask: queries keep every attended
        token incl. expansion, documents drop padding and skiplist tokens)."""
        if task is not None:
            raise ModelError(f"jina-colbert-v2 takes no task (got {task!r})")
        ids = input_ids.to(self.device).long()
        mask = attention_mask.to(self.device).long()
        if ids.shape[1] > 1:
            is_query = ids[:, 1] == self.query_marker_id
        else:
            is_query = torch.zeros(ids.shape[0], dtype=torch.bool, device=self.device)
        if self.attend_to_expansion:
            mask = torch.where(is_query[:, None] & (ids == self.mask_token_id), torch.ones_like(mask), mask)
        hidden = self.backbone(ids, mask)
        vecs = F.normalize(hidden.float() @ self.linear.T, p=2, dim=-1)
        keep = mask.bool() & (is_query[:, None] | ~torch.isin(ids, self.skiplist))
        return vecs, keep

    def forward_pooled(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, task: str | None = None,
        role: Role | None = None,
    ) -> torch.Tensor:
        raise NotImplementedError("jina-colbert-v2 is multi-vector: use forward_tokens and maxsim")


class JinaColbertV2Family(ModelFamily):
    """The jina-colbert-v2 checkpoint: `roberta.*` backbone keys with plain `.weight`s + `linear.weight`."""

    name = "jina-colbert-v2"

    def __init__(self, spec):
        super().__init__(spec)
        if spec.task is not None:
            raise ModelError(f"model family 'jina-colbert-v2' takes no task (got {spec.task!r})")
        if spec.pooling not in ("auto", "colbert", "multi_vector"):
            raise ModelError(f"jina-colbert-v2 is multi-vector (got pooling {spec.pooling!r})")
        self.cfg: XLMRConfig = parse_config(spec.path)
        if self.cfg.raw.get("lora_adaptations"):
            raise ModelError(f"{spec.path}/config.json lists LoRA tasks; use family 'jina-embeddings-v3'")
        prep = prepare_checkpoint(spec.path, self.cfg, header_tensors(spec.path), extra_keys=(LINEAR_KEY,))
        shape = tuple(prep.extras[LINEAR_KEY].shape)
        if len(shape) != 2 or shape[1] != self.cfg.hidden_size:
            raise ModelError(f"{spec.path}: {LINEAR_KEY} has shape {shape}, expected [dim, {self.cfg.hidden_size}]")
        self.dim = shape[0]
        for key in ("colbert_dim", "dim", "projection_dim"):
            v = self.cfg.raw.get(key)
            if v is not None and int(v) != self.dim:
                raise ModelError(f"{spec.path}/config.json: {key} {v} disagrees with {LINEAR_KEY} shape {shape}")
        st = read_json(os.path.join(spec.path, "config_sentence_transformers.json")) or {}
        self.settings = {k: st[k] if st.get(k) is not None else v for k, v in DEFAULTS.items()}
        if isinstance(st.get("skiplist_words"), list):
            self.settings["skiplist_words"] = [str(w) for w in st["skiplist_words"]]
        if spec.max_length:
            self.settings["document_length"] = int(spec.max_length)
        for k in ("query_length", "document_length"):
            if not 3 <= int(self.settings[k]) <= self.cfg.max_position_embeddings:
                raise ModelError(
                    f"{k} {self.settings[k]} out of range [3, {self.cfg.max_position_embeddings}] for this model"
                )
        self.ids = _special_ids(load_tokenizer_json(spec.path), self.settings, spec.path)

    def info(self) -> ModelInfo:
        return ModelInfo(
            family=self.name,
            dim=self.dim,
            max_length=int(self.settings["document_length"]),
            pooling="multi_vector",
            tasks=[],
            extra={
                "multi_vector": True,
                "score": "maxsim",
                **{k: self.settings[k] for k in DEFAULTS},
                **self.ids,
                "rotary_emb_base": self.cfg.rotary_base,
            },
        )

    def query_task_for(self, task: str | None) -> str | None:
        """No tasks: queries use the same (absent) task."""
        return task

    def load_tokenizer(self) -> ColbertTokenizer:
        return ColbertTokenizer(self.spec.path, self.settings)

    def load_encoder(self, device: str | torch.device | None = None) -> ColbertEncoder:
        dev = pick_device(device)
        dtype = resolve_dtype(self.spec.dtype, dev)
        backbone, extras = build_backbone(self.spec.path, self.cfg, dev, dtype, extra_keys=(LINEAR_KEY,))
        return ColbertEncoder(
            backbone,
            extras[LINEAR_KEY],
            self.ids,
            bool(self.settings["attend_to_expansion_tokens"] and self.settings["do_query_expansion"]),
            dev,
            dtype,
        )
