"""jina-embeddings-v2 (JinaBERT): a post-norm BERT encoder with ALiBi attention and a GEGLU MLP.

Facts (MODELS.md §8; TEI `backends/candle/src/models/jina.rs`):

* Embeddings: word + token-type embeddings, LayerNorm; **no position embeddings** (`position_embedding_type
  "alibi"`). Token types are all 0.
* Attention: BERT self-attention (`attention.self.{query,key,value}`), scores `q·k/sqrt(d)` plus the symmetric
  ALiBi bias `-slope_h * |i - j|` plus the key padding mask, softmax, `attention.output.dense`, residual,
  `attention.output.LayerNorm` (post-norm). Run through `torch.nn.functional.scaled_dot_product_attention`
  with bias + mask as one additive float mask, one block of query rows at a time (`AlibiMask`): a block's
  ALiBi is a strided view of one `[H, 2L - 1]` table (no copy); padded rows attend one by one over their real
  keys (CPU) or get the padding added per block (`[B, H, rows, L]`, within `ATTN_BLOCK_BYTES` with the
  scores). Attention memory grows with L, not L² (a dense `[H, L, L]` bias is 3.2 GB at 12 heads, 8,192 tokens).
* MLP (`feed_forward_type "geglu"`): `mlp.gated_layers` (no bias, out = 2 x intermediate); GELU (exact, erf)
  of the first half times the second half; `mlp.wo`; + residual; `mlp.layernorm`. `"reglu"` uses ReLU.
* Pooling: mean over the attention mask (`emb_pooler "mean"`); the Embedder L2-normalises.
* Keys as in the reference checkpoints, optionally under `bert.`; a BERT `pooler.*` / MLM `cls.*` head is
  ignored. The jina-embeddings-v2-base-code layout (qk-LayerNorm, `mlp.up_gated_layer`) is a different
  architecture and is rejected with a clear error.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .base import ModelError, ModelFamily, ModelInfo, ModelSpec, Role, TextEncoder, TextTokenizer, TokenizedText
from .checkpoint_files import load_checked_state, load_tokenizer_file, read_config, read_json, safetensors_files
from .device import pick_device, resolve_dtype
from .pooling import POOLERS
from .tokenization import batch_ids, leading_prefix_tokens, text_offsets

# --------------------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------------------


@dataclass
class JinaBertConfig:
    """The config.json fields JinaBERT uses."""

    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    max_position_embeddings: int = 8192
    feed_forward_type: str = "geglu"

    @classmethod
    def from_dict(cls, cfg: dict[str, Any], where: str = "config.json") -> "JinaBertConfig":
        if cfg.get("model_type") != "bert":
            raise ModelError(f"{where}: model_type {cfg.get('model_type')!r}; JinaBERT expects 'bert'")
        if cfg.get("position_embedding_type") != "alibi":
            raise ModelError(
                f"{where}: position_embedding_type {cfg.get('position_embedding_type')!r}; jina-embeddings-v2 "
                "expects 'alibi' (use model.name 'hf-encoder' for ordinary BERT checkpoints)"
            )
        ff = cfg.get("feed_forward_type", "geglu")
        if ff not in ("geglu", "reglu"):
            raise ModelError(f"{where}: feed_forward_type {ff!r} is not supported (geglu or reglu)")
        try:
            config = cls(
                vocab_size=int(cfg["vocab_size"]),
                hidden_size=int(cfg["hidden_size"]),
                num_hidden_layers=int(cfg["num_hidden_layers"]),
                num_attention_heads=int(cfg["num_attention_heads"]),
                intermediate_size=int(cfg["intermediate_size"]),
                type_vocab_size=int(cfg.get("type_vocab_size", 2)),
                layer_norm_eps=float(cfg.get("layer_norm_eps", 1e-12)),
                max_position_embeddings=int(cfg.get("max_position_embeddings", 8192)),
                feed_forward_type=ff,
            )
        except KeyError as e:
            raise ModelError(f"{where}: missing field {e.args[0]!r}") from None
        if config.hidden_size % config.num_attention_heads:
            raise ModelError(f"{where}: hidden_size is not a multiple of num_attention_heads")
        return config


# --------------------------------------------------------------------------------------------------------
# ALiBi
# --------------------------------------------------------------------------------------------------------


def alibi_slopes(num_heads: int) -> torch.Tensor:
    """Per-head ALiBi slopes (Press et al.): for n a power of two, `2^(-8/n)`, `2^(-16/n)`, ...; otherwise
    the slopes of the nearest lower power of two followed by every other slope of the next power of two."""

    def power_of_two(n: int) -> list[float]:
        start = 2.0 ** (-8.0 / n)
        return [start ** (i + 1) for i in range(n)]

    if num_heads & (num_heads - 1) == 0:
        slopes = power_of_two(num_heads)
    else:
        closest = 2 ** int(math.floor(math.log2(num_heads)))
        slopes = power_of_two(closest) + power_of_two(2 * closest)[0::2][: num_heads - closest]
    return torch.tensor(slopes, dtype=torch.float32)


def alibi_table(slopes: torch.Tensor, length: int) -> torch.Tensor:
    """[H, 2L - 1] fp32: entry t of head h is `-slope_h * |t - (L - 1)|`, every ALiBi value of length L."""
    distance = (torch.arange(2 * length - 1, device=slopes.device) - (length - 1)).abs().float()
    return -slopes[:, None] * distance[None]


def reversed_rows(table: torch.Tensor, length: int) -> torch.Tensor:
    """[H, L, L] view of an `alibi_table` (no copy): row r is the bias of query L - 1 - r, i.e.
    `view[h, r, j] = table[h, r + j] = -slope_h * |(L - 1 - r) - j|`. Rows run backwards because a strided
    view cannot express i - j (it would need a negative stride), but r + j it can."""
    return table.unfold(1, length, 1)


def alibi_bias(num_heads: int, length: int, device: torch.device | None = None) -> torch.Tensor:
    """[H, L, L] fp32 symmetric bias `-slope_h * |i - j|` (dense; the model never builds it)."""
    table = alibi_table(alibi_slopes(num_heads).to(device), length)
    return reversed_rows(table, length).flip(1).contiguous()


# Bytes one block of query rows may take for its [B, H, rows, L] bias plus the attention scores it scales
# (fp32, 8 bytes a score: what the math fallback materialises; CUDA kernels copy a strided bias block). On
# CPU the bias view costs nothing; the budget only keeps blocks thick (12 heads at 8,192 tokens: 640 rows).
ATTN_BLOCK_BYTES = 512 * 2**20


def query_block_rows(batch: int, heads: int, length: int, budget: int = ATTN_BLOCK_BYTES) -> int:
    """Query rows per attention block within `budget`; a multiple of 64 (whole kernel tiles) when at least 64.
    Thin blocks are slow on CPU (v2-base widths at 8,192 tokens: 64-row blocks took ~2x as long as 320+)."""
    rows = budget // (batch * heads * length * 8)
    if rows >= 64:
        rows -= rows % 64
    return max(1, min(length, rows))


def key_ranges(attention_mask: torch.Tensor) -> list[tuple[int, int]] | None:
    """Per row of a [B, L] 0/1 mask the [start, end) of its real tokens, or None unless every row's real
    tokens are one non-empty run (left or right padding)."""
    real = attention_mask.bool()
    pos = torch.arange(real.shape[1], device=real.device)
    start = torch.where(real, pos, real.shape[1]).amin(1)
    end = torch.where(real, pos + 1, 0).amax(1)
    if bool(((end - start) != real.sum(1)).any()) or bool((end <= start).any()):
        return None
    return list(zip(start.tolist(), end.tolist()))


@dataclass
class AlibiMask:
    """The additive attention mask (ALiBi + key padding) of one batch, handed out one block of query rows
    at a time. Query rows are taken in reverse order (see `reversed_rows`), so a block's ALiBi is a view of
    one [H, 2L - 1] table. Padded batches take one of two routes:

    * `key_ranges` (CPU): each row attends on its own over its run of real keys; the mask stays a view.
    * `key_padding` (accelerators, or padding with holes): the whole batch at once, each block's mask
      materialised as ALiBi + padding, [B, H, rows, L] (built once for all layers when one block covers L).
      On CPU this measured 2-10x slower than the views (the kernel then streams the mask from memory).
    """

    table: torch.Tensor  # [H, 2L - 1] in the model dtype
    length: int
    key_padding: torch.Tensor | None = None  # [B, 1, 1, L] additive (0 or the dtype's minimum)
    key_ranges: list[tuple[int, int]] | None = None  # per row [start, end) of its real keys
    budget: int = ATTN_BLOCK_BYTES
    whole: torch.Tensor | None = None  # the padded mask when one block covers all query rows

    @classmethod
    def build(cls, slopes: torch.Tensor, attention_mask: torch.Tensor, dtype: torch.dtype,
              budget: int = ATTN_BLOCK_BYTES, per_row: bool | None = None) -> "AlibiMask":
        """For a [B, L] 0/1 attention mask; `per_row` (default: on CPU) lets padded rows attend one by one."""
        batch, length = attention_mask.shape
        device = attention_mask.device
        table = alibi_table(slopes.to(device), length).to(dtype)
        if bool(attention_mask.all()):
            return cls(table, length, budget=budget)
        ranges = key_ranges(attention_mask) if (device.type == "cpu" if per_row is None else per_row) else None
        if ranges is not None:
            return cls(table, length, key_ranges=ranges, budget=budget)
        padding = torch.zeros(attention_mask.shape, dtype=dtype, device=device)
        padding = padding.masked_fill(attention_mask == 0, torch.finfo(dtype).min)[:, None, None, :]
        mask = cls(table, length, key_padding=padding, budget=budget)
        if query_block_rows(batch, len(slopes), length, budget) == length:
            mask.whole = mask.bias(0, length)
        return mask

    def blocks(self, batch: int) -> Iterator[tuple[int, int]]:
        """[start, end) of each block of reversed query rows (row r is query L - 1 - r) for `batch` rows."""
        rows = query_block_rows(batch, self.table.shape[0], self.length, self.budget)
        for start in range(0, self.length, rows):
            yield start, min(start + rows, self.length)

    def bias(self, start: int, end: int, keys: slice = slice(None)) -> torch.Tensor:
        """Additive mask of reversed query rows start..end-1 over `keys`: [1, H, rows, keys], or
        [B, H, rows, L] with `key_padding`."""
        if self.whole is not None:
            return self.whole
        bias = reversed_rows(self.table, self.length)[None, :, start:end, keys]
        if self.key_padding is None:
            return bias
        return (bias + self.key_padding).clamp_(min=torch.finfo(self.table.dtype).min)


def alibi_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: AlibiMask,
                    keys: slice = slice(None)) -> torch.Tensor:
    """q [B, H, L, d], k / v [B, H, K, d] (keys `keys` of the L positions) -> context [B, L, H, d],
    scaled dot-product attention one block of query rows at a time (scale 1/sqrt(d))."""
    b, heads, n, d = q.shape
    q_reversed = q.flip(2)  # the mask's query rows run backwards
    ctx = q.new_empty(b, n, heads, d)
    for start, end in mask.blocks(b):
        block = F.scaled_dot_product_attention(q_reversed[:, :, start:end], k, v,
                                               attn_mask=mask.bias(start, end, keys))
        ctx[:, n - end : n - start] = block.flip(2).transpose(1, 2)
    return ctx


# --------------------------------------------------------------------------------------------------------
# Modules (attribute names follow the checkpoint keys)
# --------------------------------------------------------------------------------------------------------


class JinaBertEmbeddings(nn.Module):
    def __init__(self, config: JinaBertConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.word_embeddings(input_ids) + self.token_type_embeddings(token_type_ids))


class JinaBertSelfAttention(nn.Module):
    def __init__(self, config: JinaBertConfig):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.query = nn.Linear(config.hidden_size, config.hidden_size)
        self.key = nn.Linear(config.hidden_size, config.hidden_size)
        self.value = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, hidden: torch.Tensor, mask: AlibiMask) -> torch.Tensor:
        """hidden [B, L, D] -> context [B, L, D] (see `AlibiMask` for the two ways padded rows take)."""
        b, n, _ = hidden.shape

        def heads(x: torch.Tensor) -> torch.Tensor:
            return x.view(b, n, self.num_heads, self.head_dim).transpose(1, 2)

        q, k, v = heads(self.query(hidden)), heads(self.key(hidden)), heads(self.value(hidden))
        if mask.key_ranges is None:
            ctx = alibi_attention(q, k, v, mask)
        else:
            ctx = torch.cat([alibi_attention(q[r : r + 1], k[r : r + 1, :, lo:hi], v[r : r + 1, :, lo:hi], mask,
                                             slice(lo, hi)) for r, (lo, hi) in enumerate(mask.key_ranges)])
        return ctx.view(b, n, self.num_heads * self.head_dim)


class JinaBertSelfOutput(nn.Module):
    def __init__(self, config: JinaBertConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, context: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dense(context) + residual)


class JinaBertAttention(nn.Module):
    def __init__(self, config: JinaBertConfig):
        super().__init__()
        self.self = JinaBertSelfAttention(config)
        self.output = JinaBertSelfOutput(config)

    def forward(self, hidden: torch.Tensor, mask: AlibiMask) -> torch.Tensor:
        return self.output(self.self(hidden, mask), hidden)


class JinaBertGLUMLP(nn.Module):
    """GEGLU (or ReGLU) feed-forward with its own residual and post-LayerNorm."""

    def __init__(self, config: JinaBertConfig):
        super().__init__()
        self.intermediate_size = config.intermediate_size
        self.gated_layers = nn.Linear(config.hidden_size, 2 * config.intermediate_size, bias=False)
        self.act: nn.Module = nn.GELU() if config.feed_forward_type == "geglu" else nn.ReLU()
        self.wo = nn.Linear(config.intermediate_size, config.hidden_size)
        self.layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        h = self.gated_layers(hidden)
        gated, non_gated = h[..., : self.intermediate_size], h[..., self.intermediate_size :]
        return self.layernorm(self.wo(self.act(gated) * non_gated) + hidden)


class JinaBertLayer(nn.Module):
    def __init__(self, config: JinaBertConfig):
        super().__init__()
        self.attention = JinaBertAttention(config)
        self.mlp = JinaBertGLUMLP(config)

    def forward(self, hidden: torch.Tensor, mask: AlibiMask) -> torch.Tensor:
        return self.mlp(self.attention(hidden, mask))


class JinaBertEncoder(nn.Module):
    def __init__(self, config: JinaBertConfig):
        super().__init__()
        self.layer = nn.ModuleList(JinaBertLayer(config) for _ in range(config.num_hidden_layers))

    def forward(self, hidden: torch.Tensor, mask: AlibiMask) -> torch.Tensor:
        for layer in self.layer:
            hidden = layer(hidden, mask)
        return hidden


class JinaBertModel(nn.Module):
    """Token ids -> last hidden states [B, L, D]."""

    def __init__(self, config: JinaBertConfig):
        super().__init__()
        self.config = config
        self.embeddings = JinaBertEmbeddings(config)
        self.encoder = JinaBertEncoder(config)

    def attention_mask(self, attention_mask: torch.Tensor, dtype: torch.dtype) -> AlibiMask:
        """[B, L] 0/1 mask -> the blockwise ALiBi + key-padding mask every layer uses."""
        return AlibiMask.build(alibi_slopes(self.config.num_attention_heads), attention_mask, dtype)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        hidden = self.embeddings(input_ids, token_type_ids)
        return self.encoder(hidden, self.attention_mask(attention_mask, hidden.dtype))


# --------------------------------------------------------------------------------------------------------
# Checkpoint loading
# --------------------------------------------------------------------------------------------------------

_IGNORED_PREFIXES = ("pooler.", "cls.", "embeddings.position_ids")




def load_jina_bert_state_dict(
    path: str, expected: dict[str, torch.Tensor], dtype: torch.dtype, device: torch.device
) -> dict[str, torch.Tensor]:
    """Read safetensors weights into JinaBertModel keys (optional `bert.` prefix), checking names and shapes."""

    def rename(key: str) -> str | None:
        name = key[len("bert.") :] if key.startswith("bert.") else key
        if name.startswith(_IGNORED_PREFIXES):
            return None
        if ".mlp.up_gated_layer." in name or ".attention.self.layer_norm_q." in name:
            raise ModelError(
                f"{path}: {key} belongs to the jina-embeddings-v2-base-code layout "
                "(qk-LayerNorm, pre-MLP norm), which this family does not implement"
            )
        return name

    return load_checked_state(path, expected, rename, dtype, device, "JinaBERT")


# --------------------------------------------------------------------------------------------------------
# Family
# --------------------------------------------------------------------------------------------------------


class JinaBertTokenizer(TextTokenizer):
    """The checkpoint's BERT WordPiece `tokenizer.json` ([CLS] text [SEP]); no role prefixes."""

    padding_side = "right"

    def __init__(self, path: str, max_length: int):
        self.tok = load_tokenizer_file(path, max_length)
        self.max_length = max_length
        tok_cfg = read_json(os.path.join(path, "tokenizer_config.json")) or {}
        pad = tok_cfg.get("pad_token", "[PAD]")
        pad = pad.get("content") if isinstance(pad, dict) else pad
        pad_id = self.tok.token_to_id(pad) if pad is not None else None
        self.pad_token_id = int(pad_id if pad_id is not None else 0)

    def __call__(self, texts: Sequence[str], role: Role, task: str | None = None) -> list[np.ndarray]:
        if task is not None:
            raise ModelError(f"jina-embeddings-v2 takes no task (got {task!r})")
        return batch_ids(self.tok, texts)

    def encode_with_offsets(self, text: str, role: Role, task: str | None = None,
                            truncate: bool = True) -> TokenizedText:
        if task is not None:
            raise ModelError(f"jina-embeddings-v2 takes no task (got {task!r})")
        if not truncate:
            self.tok.no_truncation()
        try:
            enc = self.tok.encode(text, add_special_tokens=True)
        finally:
            self.tok.enable_truncation(max_length=self.max_length)
        offsets = text_offsets(enc.offsets, enc.special_tokens_mask, 0)
        return TokenizedText(np.asarray(enc.ids, dtype=np.int32), offsets, leading_prefix_tokens(offsets))


class JinaBertEncoderModel(TextEncoder):
    """JinaBertModel + pooling (mean by default)."""

    def __init__(
        self, path: str, config: JinaBertConfig, pooling: str, device: torch.device, dtype: torch.dtype
    ):
        self.device, self.dtype = device, dtype
        with torch.device("meta"):  # no random init; real tensors are assigned below
            model = JinaBertModel(config)
        state = load_jina_bert_state_dict(path, model.state_dict(), dtype, device)
        model.load_state_dict(state, strict=True, assign=True)
        self.model = model.eval()
        self.pool = POOLERS[pooling]

    @torch.inference_mode()
    def forward_token_states(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, task: str | None = None
    ) -> torch.Tensor:
        return self.model(input_ids.to(self.device), attention_mask.to(self.device))

    def forward_pooled(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, task: str | None = None,
        role: Role | None = None,
    ) -> torch.Tensor:
        mask = attention_mask.to(self.device)
        return self.pool(self.forward_token_states(input_ids, mask, task), mask)


class JinaEmbeddingsV2Family(ModelFamily):
    """`model.name: jina-embeddings-v2` (jina-embeddings-v2-small/base-en/-de/-es/-zh style JinaBERT)."""

    name = "jina-embeddings-v2"

    def __init__(self, spec: ModelSpec):
        super().__init__(spec)
        cfg = read_config(spec.path)
        self.config = JinaBertConfig.from_dict(cfg, f"{spec.path}/config.json")
        if spec.task is not None:
            raise ModelError(f"model family 'jina-embeddings-v2' takes no task (got {spec.task!r})")
        if not os.path.exists(os.path.join(spec.path, "tokenizer.json")):
            raise ModelError(f"{spec.path}: no tokenizer.json")
        safetensors_files(spec.path)
        pooling = spec.pooling if spec.pooling != "auto" else cfg.get("emb_pooler") or "mean"
        if pooling not in POOLERS:
            raise ModelError(f"unknown pooling {pooling!r}; choose one of {sorted(POOLERS)}")
        if spec.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ModelError(f"unknown dtype {spec.dtype!r}")
        self.pooling = pooling
        arch_max = self.config.max_position_embeddings
        self.max_length = int(spec.max_length or arch_max)
        if self.max_length > arch_max:
            raise ModelError(f"model.max_length {self.max_length} exceeds the model's {arch_max} positions")

    def info(self) -> ModelInfo:
        return ModelInfo(
            family=self.name,
            dim=self.config.hidden_size,
            max_length=self.max_length,
            pooling=self.pooling,
            extra={"model_type": "bert", "position_embedding_type": "alibi",
                   "feed_forward_type": self.config.feed_forward_type},
        )

    def load_tokenizer(self) -> JinaBertTokenizer:
        return JinaBertTokenizer(self.spec.path, self.max_length)

    def load_encoder(self, device: str | torch.device | None = None) -> JinaBertEncoderModel:
        dev = pick_device(device)
        return JinaBertEncoderModel(
            self.spec.path, self.config, self.pooling, dev, resolve_dtype(self.spec.dtype, dev)
        )
