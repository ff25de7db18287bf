"""jina-reranker-v3: a listwise Qwen3 reranker ("last but not late" interaction, arXiv 2509.25085).

Facts (the model repository's `modeling.py`: `JinaForRanking`, `format_docs_prompts_func`, `rerank`):

* Backbone: a Qwen3 causal decoder (Qwen3-0.6B: hidden 1024, 28 layers, 16 heads / 8 KV heads, head_dim 128,
  per-head q/k RMSNorm), run here as transformers' native `Qwen3Model` (SDPA attention) built from config.json
  (`model_type "qwen3"`; the `auto_map` / remote code is never used). Weights are read with safetensors in the
  real key layout: `model.*` (Qwen3ForCausalLM names) plus the projector `projector.0.weight [h/2, h]` and
  `projector.2.weight [512, h/2]`, both without bias; there is no `lm_head` (an `lm_head.*` tensor is ignored).
* Truncation: each document is tokenised alone (no special tokens are added by Qwen's tokenizer) and cut at
  `max_doc_length` tokens (default 2048); when it reaches that many it is replaced by the decoded ids (a cut
  inside a multi-byte character gives U+FFFD). The query likewise at `max_query_length` (default 512). The
  token counts are taken before marker stripping.
* Blocks: documents are added in order until a block has 125 documents or the budget
  `max_length - 2 * query_tokens - sum(doc_tokens)` drops to <= `max_doc_length`; `max_length` is the
  tokenizer's `model_max_length` (131072). Each block is one prompt and one forward (no padding).
* Prompt: Qwen chat format with a fixed system message, the query once in the instruction sentence, every
  document as `<passage id="i">\\n{doc}<|embed_token|>\\n</passage>`, then `<query>\\n{query}<|rerank_token|>\\n
  </query>` and an empty `<think>` block (see `format_prompt`). Literal marker strings are removed from the
  query and the documents first.
* Embeddings: last hidden state (after the final RMSNorm) at each `<|embed_token|>` (one per document) and at
  the `<|rerank_token|>`, through `W2 relu(W1 h)` -> 512-d, not normalised. The marker ids come from the
  tokenizer (real: 151670 / 151671).
* Scores: per block, cosine(document, query). Block weight `w_b = max_i (1 + cos_i) / 2`; the final query
  embedding is `sum_b w_b q_b / sum_b w_b` and each document's relevance score is its cosine with it: a raw
  cosine in [-1, 1], no sigmoid. With one block this is the block's cosine.

Our choices: the projector runs in fp32 and the scoring in float64 whatever the backbone dtype (the reference runs
the projector in the model dtype; its weights are loaded through the backbone dtype, which is exact for the real
bf16 checkpoint); a zero embedding scores 0 instead of NaN; ties in `order` put the later document first.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from .base import ModelError
from .checkpoint_files import load_checked_state, load_tokenizer_file, read_config, read_json
from .reranker import RerankDoc, Reranker, RerankerInfo

DOC_MARKER = "<|embed_token|>"
QUERY_MARKER = "<|rerank_token|>"
PROJECTOR_DIM = 512
BLOCK_SIZE = 125  # documents per listwise forward (the reference's `block_size`)
DEFAULT_MAX_QUERY_LENGTH = 512
DEFAULT_MAX_DOC_LENGTH = 2048

SYSTEM_PROMPT = (
    "<|im_start|>system\n"
    "You are a search relevance expert who can determine a ranking of the passages based on how relevant they are "
    "to the query. If the query is a question, how relevant a passage is depends on how well it answers the "
    "question. If not, try to analyze the intent of the query and assess how well each passage satisfies the "
    "intent. If an instruction is provided, you should follow the instruction when determining the ranking."
    "<|im_end|>\n<|im_start|>user\n"
)
ASSISTANT_SUFFIX = "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
OPTIONS = ("max_query_length", "max_doc_length", "max_length", "block_size")


def strip_markers(text: str) -> str:
    """The text without literal marker strings (repeated until none re-forms from the pieces)."""
    while True:
        out = text.replace(QUERY_MARKER, "").replace(DOC_MARKER, "")
        if out == text:
            return out
        text = out


def format_prompt(query: str, docs: Sequence[str]) -> str:
    """The listwise prompt of one block (no instruction, thinking disabled), markers stripped from the inputs."""
    query = strip_markers(query)
    passages = "\n".join(f'<passage id="{i}">\n{strip_markers(d)}{DOC_MARKER}\n</passage>' for i, d in enumerate(docs))
    body = (
        f"I will provide you with {len(docs)} passages, each indicated by a numerical identifier. "
        f"Rank the passages based on their relevance to query: {query}\n"
        f"{passages}\n<query>\n{query}{QUERY_MARKER}\n</query>"
    )
    return SYSTEM_PROMPT + body + ASSISTANT_SUFFIX


def split_blocks(doc_lengths: Sequence[int], query_length: int, max_doc_length: int, max_length: int,
                 block_size: int = BLOCK_SIZE) -> list[list[int]]:
    """Document positions per block, by the reference's rule (see the module docstring)."""
    blocks: list[list[int]] = []
    current: list[int] = []
    capacity = max_length - 2 * query_length
    for i, length in enumerate(doc_lengths):
        current.append(i)
        capacity -= length
        if len(current) >= block_size or capacity <= max_doc_length:
            blocks.append(current)
            current, capacity = [], max_length - 2 * query_length
    if current:
        blocks.append(current)
    return blocks


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine of `a` [n, d] with `b` [d] in float64 (0 for a zero vector)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    norms = np.maximum(np.linalg.norm(a, axis=-1) * np.linalg.norm(b), 1e-12)
    return (a @ b) / norms


@dataclass
class BlockOutput:
    """One listwise forward: its prompt, token ids, marker positions, hidden states and projected embeddings."""

    docs: list[int]  # positions of the block's documents in the input list
    prompt: str
    input_ids: np.ndarray  # [L] int64
    doc_positions: np.ndarray  # [n] positions of <|embed_token|>
    query_position: int  # position of <|rerank_token|>
    hidden_docs: np.ndarray  # [n, h] float32, after the final norm
    hidden_query: np.ndarray  # [h]
    doc_embeds: np.ndarray  # [n, 512] float32
    query_embed: np.ndarray  # [512]
    scores: np.ndarray  # [n] float64 cosine(doc, query) of this block

    @property
    def weight(self) -> float:
        """max_i (1 + cos_i) / 2."""
        return float(((1.0 + self.scores) / 2.0).max())


@dataclass
class RerankResult:
    """Everything `rerank` computes, in input order."""

    query: str  # truncated (not yet stripped of markers)
    documents: list[str]  # truncated
    query_length: int  # tokens before truncation, capped at max_query_length
    doc_lengths: list[int]
    blocks: list[BlockOutput]
    query_embed: np.ndarray  # [512] float64, block-weighted
    doc_embeds: np.ndarray  # [N, 512] float32
    scores: np.ndarray  # [N] float64 relevance scores

    def order(self) -> np.ndarray:
        """Document positions, best first (ties: the later document first, like the reference's reversed argsort)."""
        return np.argsort(self.scores, kind="stable")[::-1]


class JinaRerankerV3(Reranker):
    """`jina-reranker-v3`: one listwise forward per block of up to 125 documents."""

    name = "jina-reranker-v3"
    fp16_safe = False  # Qwen decoder: float16 activations overflow
    modalities = ("text",)

    def __init__(self, path: str, device: str | torch.device | None = None, dtype: str = "auto",
                 force_dtype: bool = False, **options: Any):
        super().__init__(path, device, dtype, force_dtype)
        self.check_options(options, OPTIONS)
        self.config = read_config(path)
        if self.config.get("model_type") != "qwen3":
            raise ModelError(f"{path}: model_type {self.config.get('model_type')!r}; {self.name} expects 'qwen3'")
        arch_max = int(self.config.get("max_position_embeddings", 131072))
        tok_cfg = read_json(os.path.join(path, "tokenizer_config.json")) or {}
        self.max_length = int(options.get("max_length") or tok_cfg.get("model_max_length") or arch_max)
        self.max_query_length = int(options.get("max_query_length") or DEFAULT_MAX_QUERY_LENGTH)
        self.max_doc_length = int(options.get("max_doc_length") or DEFAULT_MAX_DOC_LENGTH)
        self.block_size = int(options.get("block_size") or BLOCK_SIZE)
        if self.max_length > arch_max:
            raise ModelError(f"{self.name}: max_length {self.max_length} exceeds the model's {arch_max} positions")
        if min(self.max_query_length, self.max_doc_length, self.block_size) < 1:
            raise ModelError(f"{self.name}: max_query_length, max_doc_length and block_size must be >= 1")
        self.tok = self._load_tokenizer(path)
        self.doc_marker_id, self.query_marker_id = (self._marker_id(m) for m in (DOC_MARKER, QUERY_MARKER))
        self.model, self.projector = self._load_model(path)

    # -- loading --------------------------------------------------------------------------------------------

    @staticmethod
    def _load_tokenizer(path: str) -> Any:
        tok = load_tokenizer_file(path, 1)
        tok.no_truncation()  # prompts are never truncated; texts are cut by `truncate`
        if tok.num_special_tokens_to_add(False):
            raise ModelError(f"{path}: the tokenizer adds special tokens; the reranker prompt expects none")
        return tok

    def _marker_id(self, marker: str) -> int:
        ids = self.tok.encode(marker, add_special_tokens=False).ids
        if len(ids) != 1 or self.tok.token_to_id(marker) != ids[0]:
            raise ModelError(f"{self.path}: the tokenizer has no single token {marker!r}; "
                             f"not a {self.name} tokenizer")
        return int(ids[0])

    def _load_model(self, path: str) -> tuple[torch.nn.Module, torch.nn.Module]:
        """Qwen3Model (self.dtype) + projector (fp32) from the checkpoint's safetensors, strictly checked."""
        from transformers import Qwen3Config, Qwen3Model
        from transformers.models.qwen3.modeling_qwen3 import Qwen3RotaryEmbedding

        config = Qwen3Config.from_pretrained(path, local_files_only=True)
        config._attn_implementation = "sdpa"
        h = int(config.hidden_size)
        with torch.device("meta"):  # no random init; real tensors are assigned below
            model = Qwen3Model(config)
            projector = torch.nn.Sequential(
                torch.nn.Linear(h, h // 2, bias=False),
                torch.nn.ReLU(),
                torch.nn.Linear(h // 2, PROJECTOR_DIM, bias=False),
            )
        expected = {f"model.{k}": v for k, v in model.state_dict().items()}
        expected.update({f"projector.{k}": v for k, v in projector.state_dict().items()})

        def rename(key: str) -> str | None:
            return None if key.startswith("lm_head.") else key

        state = load_checked_state(path, expected, rename, self.dtype, self.device, self.name)
        model.load_state_dict({k[6:]: v for k, v in state.items() if k.startswith("model.")}, strict=True, assign=True)
        projector.load_state_dict(
            {k[10:]: v.float() for k, v in state.items() if k.startswith("projector.")}, strict=True, assign=True
        )
        model.rotary_emb = Qwen3RotaryEmbedding(config).to(self.device)  # non-persistent buffers, rebuilt off meta
        return model.eval(), projector.eval()

    # -- the reference's steps ------------------------------------------------------------------------------

    def truncate(self, text: str, max_tokens: int) -> tuple[str, int]:
        """(text, its token count capped at `max_tokens`); a text that reaches `max_tokens` is replaced by
        the decoded first `max_tokens` ids."""
        ids = self.tok.encode(text, add_special_tokens=True).ids[:max_tokens]
        if len(ids) >= max_tokens:
            text = self.tok.decode(ids, skip_special_tokens=False)
        return text, len(ids)

    @torch.inference_mode()
    def forward_block(self, query: str, docs: Sequence[str], positions: Sequence[int] | None = None) -> BlockOutput:
        """One listwise forward of `query` with `docs` (already truncated)."""
        prompt = format_prompt(query, docs)
        ids = np.asarray(self.tok.encode(prompt, add_special_tokens=True).ids, dtype=np.int64)
        doc_pos = np.flatnonzero(ids == self.doc_marker_id)
        query_pos = np.flatnonzero(ids == self.query_marker_id)
        if len(doc_pos) != len(docs) or len(query_pos) != 1:
            raise ModelError(f"{self.name}: prompt has {len(doc_pos)} document / {len(query_pos)} query markers "
                             f"for {len(docs)} documents")
        input_ids = torch.from_numpy(ids).to(self.device).unsqueeze(0)
        hidden = self.model(input_ids=input_ids, use_cache=False).last_hidden_state[0]
        at = torch.from_numpy(np.append(doc_pos, query_pos)).to(self.device)
        marked = hidden[at].float()
        embeds = self.projector(marked)
        scores = torch.nn.functional.cosine_similarity(embeds[:-1], embeds[-1:], dim=-1)
        marked_np, embeds_np = marked.cpu().numpy(), embeds.cpu().numpy()
        return BlockOutput(
            docs=list(positions) if positions is not None else list(range(len(docs))),
            prompt=prompt, input_ids=ids, doc_positions=doc_pos, query_position=int(query_pos[0]),
            hidden_docs=marked_np[:-1], hidden_query=marked_np[-1], doc_embeds=embeds_np[:-1],
            query_embed=embeds_np[-1], scores=scores.cpu().double().numpy(),
        )

    def rerank_details(self, query: str, documents: Sequence[str], max_query_length: int | None = None,
                       max_doc_length: int | None = None) -> RerankResult:
        """Truncation, blocks, forwards and block-weighted scores (the instance's limits unless given)."""
        mq = self.max_query_length if max_query_length is None else int(max_query_length)
        md = self.max_doc_length if max_doc_length is None else int(max_doc_length)
        query, query_length = self.truncate(query, mq)
        cut = [self.truncate(d, md) for d in documents]
        docs, doc_lengths = [c[0] for c in cut], [c[1] for c in cut]
        blocks = [
            self.forward_block(query, [docs[i] for i in idx], idx)
            for idx in split_blocks(doc_lengths, query_length, md, self.max_length, self.block_size)
        ]
        doc_embeds = np.zeros((len(docs), PROJECTOR_DIM), dtype=np.float32)
        for b in blocks:
            doc_embeds[b.docs] = b.doc_embeds
        q = _weighted_query(blocks)
        scores = cosine(doc_embeds, q) if blocks else np.zeros(0)
        return RerankResult(query, docs, query_length, doc_lengths, blocks, q, doc_embeds, scores)

    def rerank(self, query: str, documents: Sequence[str], max_query_length: int = DEFAULT_MAX_QUERY_LENGTH,
               max_doc_length: int = DEFAULT_MAX_DOC_LENGTH, return_embeddings: bool = False,
               top_n: int | None = None) -> list[dict[str, Any]]:
        """The reference's `rerank`: dicts with `document`, `relevance_score`, `index`, `embedding` (the
        512-d document embedding with `return_embeddings`, else None), best first."""
        res = self.rerank_details(query, documents, max_query_length, max_doc_length)
        order = res.order()[: len(documents) if top_n is None else top_n]
        return [
            {
                "document": documents[i],
                "relevance_score": float(res.scores[i]),
                "index": int(i),
                "embedding": res.doc_embeds[i] if return_embeddings else None,
            }
            for i in order
        ]

    # -- the Reranker interface -----------------------------------------------------------------------------

    def _score(self, query: RerankDoc, docs: list[RerankDoc]) -> np.ndarray:
        return self.rerank_details(query.text or "", [d.text or "" for d in docs]).scores.astype(np.float64)

    def info(self) -> RerankerInfo:
        return RerankerInfo(
            family=self.name,
            checkpoint=self._checkpoint_hash(),
            max_length=self.max_length,
            modalities=["text"],
            score="cosine",
            extra={
                "model_type": "qwen3",
                "hidden_size": int(self.config["hidden_size"]),
                "projector_dim": PROJECTOR_DIM,
                "block_size": self.block_size,
                "max_query_length": self.max_query_length,
                "max_doc_length": self.max_doc_length,
                "marker_ids": {DOC_MARKER: self.doc_marker_id, QUERY_MARKER: self.query_marker_id},
                "dtype": str(self.dtype).removeprefix("torch."),
            },
        )


def _weighted_query(blocks: Sequence[BlockOutput]) -> np.ndarray:
    """sum_b w_b q_b / sum_b w_b in float64 (a plain mean if every weight is 0)."""
    if not blocks:
        return np.zeros(PROJECTOR_DIM)
    q = np.stack([b.query_embed for b in blocks]).astype(np.float64)
    w = np.asarray([b.weight for b in blocks], dtype=np.float64)
    if w.sum() <= 0:
        w = np.ones_like(w)
    return (w[:, None] * q).sum(0) / w.sum()
