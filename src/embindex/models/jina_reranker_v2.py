"""`jina-reranker-v2`: jina-reranker-v2-base-multilingual style cross-encoders (XLM-RoBERTa, absolute positions).

Facts of the model (Jina's remote code `XLMRobertaForSequenceClassification` with `compute_score` / `rerank`):

* Input: `<s> query </s></s> document </s>` (XLM-R pair template, all token type ids 0), right padding with
  `<pad>`; `compute_score` tokenises the pair with `truncation=True` (tokenizers' `longest_first`) at `max_length`.
* Positions: RoBERTa style, `pad_token_id + cumsum(input_ids != pad)` on real tokens, `pad_token_id` on padding;
  `max_position_embeddings` 1026 -> at most 1024 tokens.
* Encoder: post-norm BERT blocks (`h = LN1(h + Attn(h))`, `h = LN2(h + fc2(gelu(fc1(h))))`, exact erf GELU),
  embeddings word + position + token type then LayerNorm (`emb_ln`).
* Head: hidden state of `<s>` -> `dense` -> tanh -> `out_proj` -> one logit; score = sigmoid(logit).
* `rerank`: query ids = the query alone with specials, truncated to `max_query_length`; document ids without
  specials, untruncated; `room = max_length - len(query_ids) - 2`. A document of at most `room` tokens is one
  input `query_ids + [</s>] + doc_ids + [</s>]`; a longer one is cut into windows of `room` tokens starting every
  `room - min(overlap_tokens, room // 4)` tokens, the last window being the document's last `room` tokens.
  Document score = max over its windows of sigmoid(logit). Requires `max_length >= 2 * max_query_length`.

The network is transformers' native `XLMRobertaForSequenceClassification`, built from an `XLMRobertaConfig`
made here from config.json (which has no `model_type` and points to remote code that is never run). The
checkpoint is read from safetensors in its own key layout (`roberta.emb_ln`, `encoder.layers.N.mixer.Wqkv`
with rows `[q; k; v]`, `mixer.out_proj`, `norm1`, `mlp.fc1/fc2`, `norm2`, `classifier.dense/out_proj`),
renamed, `Wqkv` split in three, and checked against the config (names and shapes) before loading.
"""

from __future__ import annotations

import os
import re
import threading
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from ..text.batching import pad_batch, token_budget_batches
from .base import ModelError
from .checkpoint_files import load_checked_state, load_tokenizer_file, read_config, read_json
from .reranker import Reranker, RerankerInfo, RerankDoc, RerankInputError, RerankScores, as_doc

DEFAULT_OPTIONS: dict[str, int] = {
    "max_length": 1024,  # tokens of one model input (query + window + specials)
    "max_query_length": 512,  # query tokens, specials included
    "overlap_tokens": 80,  # overlap of consecutive windows of a long document (at most room // 4)
    "batch_size": 32,  # most rows of one forward pass
    "batch_tokens": 32768,  # most padded tokens of one forward pass
}
_GELU_TANH = ("gelu_new", "gelu_fast", "gelu_pytorch_tanh")  # the reference runs these as tanh-approximate GELU
_LAYER_KEY = re.compile(r"^roberta\.encoder\.layers\.(\d+)\.(.+)$")
_LAYER_RENAME = {
    "mixer.Wqkv.": "attention.self.qkv.",
    "mixer.out_proj.": "attention.output.dense.",
    "norm1.": "attention.output.LayerNorm.",
    "mlp.fc1.": "intermediate.dense.",
    "mlp.fc2.": "output.dense.",
    "norm2.": "output.LayerNorm.",
}


# ----------------------------------------------------------------------------------------------
# config and checkpoint


def xlmr_config(raw: dict[str, Any], where: str):
    """transformers' `XLMRobertaConfig` from the checkpoint's config.json values (no remote code)."""
    from transformers import XLMRobertaConfig

    pos = raw.get("position_embedding_type", "absolute")
    if pos != "absolute":
        raise ModelError(f"{where}: position_embedding_type {pos!r}; jina-reranker-v2 uses absolute positions")
    act = raw.get("hidden_act", "gelu")
    if act != "gelu" and act not in _GELU_TANH:
        raise ModelError(f"{where}: hidden_act {act!r} is not supported (gelu or {', '.join(_GELU_TANH)})")
    if int(raw.get("num_labels", len(raw.get("id2label") or {0: 0}))) != 1:
        raise ModelError(f"{where}: a reranker has one output logit (num_labels 1)")
    try:
        vocab = int(raw["vocab_size"])
        multiple = int(raw.get("pad_vocab_size_multiple", 1))  # the reference rounds the vocabulary up
        conf = XLMRobertaConfig(
            vocab_size=vocab + (-vocab) % multiple,
            hidden_size=int(raw["hidden_size"]),
            num_hidden_layers=int(raw["num_hidden_layers"]),
            num_attention_heads=int(raw["num_attention_heads"]),
            intermediate_size=int(raw["intermediate_size"]),
            hidden_act="gelu" if act == "gelu" else "gelu_pytorch_tanh",
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
            classifier_dropout=0.0,
            max_position_embeddings=int(raw["max_position_embeddings"]),
            type_vocab_size=int(raw.get("type_vocab_size", 1)),
            layer_norm_eps=float(raw.get("layer_norm_eps", 1e-5)),
            pad_token_id=int(raw.get("pad_token_id", 1)),
            num_labels=1,
        )
    except KeyError as e:
        raise ModelError(f"{where}: missing {e.args[0]!r}") from None
    if conf.hidden_size % conf.num_attention_heads:
        raise ModelError(f"{where}: hidden_size is not a multiple of num_attention_heads")
    if conf.type_vocab_size < 1:
        raise ModelError(f"{where}: type_vocab_size {conf.type_vocab_size} (at least 1 expected)")
    conf._attn_implementation = "sdpa"
    return conf


def checkpoint_name(key: str) -> str | None:
    """Checkpoint key -> native key (`attention.self.qkv.*` stands for the fused Wqkv); None: ignored."""
    if key.startswith("roberta.pooler."):
        return None
    if key.startswith("roberta.emb_ln."):
        return "roberta.embeddings.LayerNorm." + key[len("roberta.emb_ln."):]
    m = _LAYER_KEY.match(key)
    if m:
        for old, new in _LAYER_RENAME.items():
            if m.group(2).startswith(old):
                return f"roberta.encoder.layer.{m.group(1)}.{new}{m.group(2)[len(old):]}"
    return key  # embeddings and classifier keep their names; anything else is reported as unexpected


def _fused_expected(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The native state dict's shapes with each layer's q/k/v replaced by one fused `qkv` tensor."""
    expected: dict[str, torch.Tensor] = {}
    for name, t in model.state_dict().items():
        m = re.match(r"^(.+\.attention\.self)\.(query|key|value)\.(weight|bias)$", name)
        if m is None:
            expected[name] = t
        elif m.group(2) == "query":
            expected[f"{m.group(1)}.qkv.{m.group(3)}"] = torch.empty(
                (3 * t.shape[0], *t.shape[1:]), device="meta")
    return expected


def load_model(path: str, conf, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """The native classifier with the checkpoint's weights (eval mode, no grads)."""
    from transformers import XLMRobertaForSequenceClassification

    with torch.device("meta"):  # no random init: the real tensors are assigned below
        model = XLMRobertaForSequenceClassification(conf)
    state = load_checked_state(path, _fused_expected(model), checkpoint_name, dtype, device, "jina-reranker-v2")
    for name in [k for k in state if ".attention.self.qkv." in k]:
        base, role = name.rsplit(".qkv.", 1)
        for part, t in zip(("query", "key", "value"), state.pop(name).chunk(3, dim=0)):
            state[f"{base}.{part}.{role}"] = t.contiguous()
    model.load_state_dict(state, strict=True, assign=True)
    emb = model.roberta.embeddings  # non-persistent buffers, rebuilt off the meta device
    n = conf.max_position_embeddings
    emb.position_ids = torch.arange(n, device=device).expand((1, -1))
    emb.token_type_ids = torch.zeros((1, n), dtype=torch.long, device=device)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


# ----------------------------------------------------------------------------------------------
# windows


@dataclass
class WindowScores:
    """`rerank` of one query: per document the max window score, and every window's input and logit."""

    scores: np.ndarray  # float64 [n_docs]: max over the document's windows of sigmoid(logit)
    doc_index: np.ndarray  # int64 [n_windows]
    input_ids: list[np.ndarray]  # per window, unpadded
    logits: np.ndarray  # float64 [n_windows]

    @property
    def window_scores(self) -> np.ndarray:
        return sigmoid(self.logits)

    def ranking(self) -> np.ndarray:
        """Document indices by descending score (ties: input order)."""
        return np.argsort(-self.scores, kind="stable")


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.asarray(x, dtype=np.float64)))


def window_starts(n: int, room: int, overlap: int) -> list[int]:
    """Start offsets of the windows of a document of `n` > `room` tokens (the last one is `n - room`)."""
    step = room - min(overlap, room // 4)
    starts, start = [], 0
    while start + room < n:
        starts.append(start)
        start += step
    return starts + [n - room]


def max_per_doc(n_docs: int, doc_index: np.ndarray, window_scores: np.ndarray) -> np.ndarray:
    out = np.full(n_docs, -np.inf)
    np.maximum.at(out, doc_index, window_scores)
    return out


# ----------------------------------------------------------------------------------------------
# the reranker


class JinaRerankerV2(Reranker):
    """jina-reranker-v2-base-multilingual (and checkpoints in its layout). Options: see DEFAULT_OPTIONS."""

    name = "jina-reranker-v2"
    modalities = ("text",)

    def __init__(self, path: str, device: str | torch.device | None = None, dtype: str = "auto",
                 force_dtype: bool = False, **options: Any):
        super().__init__(path, device, dtype, force_dtype)
        self.check_options(options, DEFAULT_OPTIONS)
        self.options = {**DEFAULT_OPTIONS, **{k: int(v) for k, v in options.items()}}
        self.conf = xlmr_config(read_config(path), f"{path}/config.json")
        # RoBERTa positions start at pad_token_id + 1
        self.max_positions = self.conf.max_position_embeddings - self.conf.pad_token_id - 1
        self._check_window_args(self.options["max_length"], self.options["max_query_length"],
                                self.options["overlap_tokens"], ModelError)
        if min(self.options["batch_size"], self.options["batch_tokens"]) < 1:
            raise ModelError(f"{self.name}: batch_size and batch_tokens must be positive")
        self._tok = load_tokenizer_file(path, self.options["max_length"])
        self._tok_lock = threading.Lock()
        tok_cfg = read_json(os.path.join(path, "tokenizer_config.json")) or {}
        self.sep_id = self._token_id(tok_cfg, "sep_token", "</s>")
        self.pad_id = self._token_id(tok_cfg, "pad_token", "<pad>")
        self.model = load_model(path, self.conf, self.device, self.dtype)
        self._hash: str | None = None

    # -- setup helpers

    def _token_id(self, tok_cfg: dict[str, Any], name: str, default: str) -> int:
        tok = tok_cfg.get(name, default)
        tok = tok.get("content") if isinstance(tok, dict) else tok
        tid = self._tok.token_to_id(tok)
        if tid is None:
            raise ModelError(f"{self.path}: the tokenizer has no {name} {tok!r}")
        return int(tid)

    def _check_window_args(self, max_length: int, max_query_length: int, overlap_tokens: int,
                           error: type[Exception] = ValueError) -> None:
        if max_length > self.max_positions:
            raise error(f"max_length {max_length} exceeds the model's {self.max_positions} positions")
        if max_query_length < 1 or max_length < 2 * max_query_length:
            raise error(f"max_length ({max_length}) must be >= 2 * max_query_length ({max_query_length})")
        if overlap_tokens < 0:
            raise error(f"overlap_tokens must be >= 0 (got {overlap_tokens})")

    def info(self) -> RerankerInfo:
        if self._hash is None:
            self._hash = self._checkpoint_hash()
        o = self.options
        return RerankerInfo(
            family=self.name,
            checkpoint=self._hash,
            max_length=o["max_length"],
            modalities=list(self.modalities),
            score="sigmoid(logit)",
            extra={
                "max_query_length": o["max_query_length"],
                "overlap_tokens": o["overlap_tokens"],
                "long_documents": "windows; score = max over windows",
                "position_embedding_type": "absolute",
                "dtype": str(self.dtype).removeprefix("torch."),
            },
        )

    # -- tokenisation

    def _encode(self, inputs: Sequence[str | tuple[str, str]], max_length: int | None,
                special: bool = True) -> list[np.ndarray]:
        """Token ids of texts or (query, document) pairs; `max_length` None: no truncation."""
        with self._tok_lock:  # truncation is tokenizer state
            if max_length is None:
                self._tok.no_truncation()
            else:
                self._tok.enable_truncation(max_length, strategy="longest_first")
            encs = self._tok.encode_batch(list(inputs), add_special_tokens=special)
        return [np.asarray(e.ids, dtype=np.int64) for e in encs]

    def tokenize_pairs(self, pairs: Sequence[tuple[str, str]], max_length: int = 1024) -> list[np.ndarray]:
        """`compute_score`'s inputs: each pair as `<s> q </s></s> d </s>`, `longest_first` truncation."""
        if max_length > self.max_positions:
            raise ValueError(f"max_length {max_length} exceeds the model's {self.max_positions} positions")
        return self._encode([(q, d) for q, d in pairs], max_length)

    def windows(self, query: str, documents: Sequence[str], max_length: int = 1024, max_query_length: int = 512,
                overlap_tokens: int = 80) -> tuple[np.ndarray, list[np.ndarray]]:
        """`rerank`'s inputs: (document index per window, window input ids)."""
        self._check_window_args(max_length, max_query_length, overlap_tokens)
        q = self._encode([query], max_query_length)[0]
        room = max_length - len(q) - 2
        if room < 1:
            raise ValueError(f"no room for document tokens (max_length {max_length}, query {len(q)} tokens)")
        sep = np.asarray([self.sep_id], dtype=np.int64)
        doc_index: list[int] = []
        ids: list[np.ndarray] = []
        for i, d in enumerate(self._encode(documents, None, special=False) if documents else []):
            starts = [0] if len(d) <= room else window_starts(len(d), room, overlap_tokens)
            for s in starts:
                doc_index.append(i)
                ids.append(np.concatenate([q, sep, d[s:s + room], sep]))
        return np.asarray(doc_index, dtype=np.int64), ids

    # -- forward

    @torch.inference_mode()
    def logits(self, ids: Sequence[np.ndarray], batch_size: int | None = None,
               batch_tokens: int | None = None) -> np.ndarray:
        """One logit (float64) per unpadded input, batched by length under a token budget, right-padded."""
        out = np.empty(len(ids), dtype=np.float64)
        rows = batch_size or self.options["batch_size"]
        budget = batch_tokens or self.options["batch_tokens"]
        for idx in token_budget_batches([len(x) for x in ids], budget, rows):
            batch, mask = pad_batch([ids[i] for i in idx], self.pad_id, "right")
            input_ids = torch.from_numpy(batch).to(self.device)
            logit = self.model(
                input_ids=input_ids,
                attention_mask=torch.from_numpy(mask).to(self.device),
                token_type_ids=torch.zeros_like(input_ids),
            ).logits[:, 0]
            out[idx] = logit.float().cpu().numpy()
        return out

    def compute_score(self, pairs: Sequence[tuple[str, str]], max_length: int = 1024,
                      batch_size: int = 32) -> tuple[np.ndarray, np.ndarray]:
        """(logits, sigmoid scores), float64 [n], of (query, document) pairs as the reference's compute_score."""
        logits = self.logits(self.tokenize_pairs(pairs, max_length), batch_size=batch_size)
        return logits, sigmoid(logits)

    def rerank_windows(self, query: str, documents: Sequence[str], max_length: int = 1024,
                       max_query_length: int = 512, overlap_tokens: int = 80) -> WindowScores:
        """The reference's `rerank`: per document the max over its windows of sigmoid(logit)."""
        doc_index, ids = self.windows(query, documents, max_length, max_query_length, overlap_tokens)
        logits = self.logits(ids)
        return WindowScores(max_per_doc(len(documents), doc_index, sigmoid(logits)), doc_index, ids, logits)

    # -- Reranker interface

    def _window_args(self) -> dict[str, int]:
        return {k: self.options[k] for k in ("max_length", "max_query_length", "overlap_tokens")}

    def _score(self, query: RerankDoc, docs: list[RerankDoc]) -> np.ndarray:
        return self.rerank_windows(query.text or "", [d.text or "" for d in docs], **self._window_args()).scores

    def _split(self, query: Any, docs: Sequence[Any]) -> tuple[str, list[int], list[str], list[str | None]]:
        """(query text, positions of valid candidates, their texts, per-candidate rejects) as `score` does."""
        q = self._prepare(as_doc(query))
        if isinstance(q, str):
            raise RerankInputError(f"query: {q}")
        prepared = [self._prepare(as_doc(d)) for d in docs]
        valid = [i for i, d in enumerate(prepared) if not isinstance(d, str)]
        rejects = [d if isinstance(d, str) else None for d in prepared]
        return q.text or "", valid, [prepared[i].text or "" for i in valid], rejects  # type: ignore[union-attr]

    def score_many(self, requests: Sequence[tuple[Any, Sequence[Any]]]) -> list[RerankScores | RerankInputError]:
        """Several queries: the windows of all of them run in shared token-budget batches."""
        out: list[RerankScores | RerankInputError] = []
        plans: list[tuple[int, list[int], int, np.ndarray, int]] = []  # (out pos, valid, n texts, doc index, offset)
        all_ids: list[np.ndarray] = []
        for query, docs in requests:
            try:
                q, valid, texts, rejects = self._split(query, docs)
            except RerankInputError as e:
                out.append(e)
                continue
            doc_index, ids = self.windows(q, texts, **self._window_args()) if texts else (np.zeros(0, np.int64), [])
            plans.append((len(out), valid, len(texts), doc_index, len(all_ids)))
            all_ids.extend(ids)
            out.append(RerankScores(np.full(len(rejects), np.nan), rejects))
        window_scores = sigmoid(self.logits(all_ids)) if all_ids else np.zeros(0)
        for pos, valid, n, doc_index, offset in plans:
            res = out[pos]
            assert isinstance(res, RerankScores)
            if n:
                res.scores[valid] = max_per_doc(n, doc_index, window_scores[offset:offset + len(doc_index)])
        return out
