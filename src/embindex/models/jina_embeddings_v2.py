"""jina-embeddings-v2 (JinaBERT): a post-norm BERT encoder with ALiBi attention and a GEGLU MLP.

Facts (MODELS.md §8; TEI `backends/candle/src/models/jina.rs`):

* Embeddings: word + token-type embeddings, LayerNorm; **no position embeddings** (`position_embedding_type
  "alibi"`). Token types are all 0.
* Attention: BERT self-attention (`attention.self.{query,key,value}`), scores `q·k/sqrt(d)` plus the symmetric
  ALiBi bias `-slope_h * |i - j|` plus the key padding mask, softmax, `attention.output.dense`, residual,
  `attention.output.LayerNorm` (post-norm). Run through `torch.nn.functional.scaled_dot_product_attention`
  with bias + mask as one additive float mask.
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
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .base import (
    POOLERS,
    ModelError,
    ModelFamily,
    ModelInfo,
    ModelSpec,
    Role,
    TextEncoder,
    TextTokenizer,
    TokenizedText,
    leading_prefix_tokens,
    load_checked_state,
    load_tokenizer_file,
    pick_device,
    read_config,
    read_json,
    resolve_dtype,
    safetensors_files,
    text_offsets,
)

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


def alibi_bias(num_heads: int, length: int, device: torch.device | None = None) -> torch.Tensor:
    """[H, L, L] fp32 symmetric bias `-slope_h * |i - j|`."""
    pos = torch.arange(length, device=device)
    distance = (pos[None, :] - pos[:, None]).abs().float()
    return -alibi_slopes(num_heads).to(device)[:, None, None] * distance[None]


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

    def forward(self, hidden: torch.Tensor, attn_bias: torch.Tensor) -> torch.Tensor:
        """hidden [B, L, D], attn_bias [B, H, L, L] additive (ALiBi + padding) -> context [B, L, D]."""
        b, n, _ = hidden.shape

        def heads(x: torch.Tensor) -> torch.Tensor:
            return x.view(b, n, self.num_heads, self.head_dim).transpose(1, 2)

        q, k, v = heads(self.query(hidden)), heads(self.key(hidden)), heads(self.value(hidden))
        ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_bias)  # scale 1/sqrt(head_dim)
        return ctx.transpose(1, 2).reshape(b, n, self.num_heads * self.head_dim)


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

    def forward(self, hidden: torch.Tensor, attn_bias: torch.Tensor) -> torch.Tensor:
        return self.output(self.self(hidden, attn_bias), hidden)


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

    def forward(self, hidden: torch.Tensor, attn_bias: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.attention(hidden, attn_bias))


class JinaBertEncoder(nn.Module):
    def __init__(self, config: JinaBertConfig):
        super().__init__()
        self.layer = nn.ModuleList(JinaBertLayer(config) for _ in range(config.num_hidden_layers))

    def forward(self, hidden: torch.Tensor, attn_bias: torch.Tensor) -> torch.Tensor:
        for layer in self.layer:
            hidden = layer(hidden, attn_bias)
        return hidden


class JinaBertModel(nn.Module):
    """Token ids -> last hidden states [B, L, D]."""

    def __init__(self, config: JinaBertConfig):
        super().__init__()
        self.config = config
        self.embeddings = JinaBertEmbeddings(config)
        self.encoder = JinaBertEncoder(config)

    def attention_bias(self, attention_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """[B, L] 0/1 mask -> additive bias: ALiBi [1, H, L, L], plus the dtype's minimum on padded keys
        ([B, H, L, L]) when any row is padded."""
        length = attention_mask.shape[1]
        bias = alibi_bias(self.config.num_attention_heads, length, attention_mask.device).to(dtype)[None]
        if bool(attention_mask.all()):
            return bias
        lowest = torch.finfo(dtype).min
        pad = torch.zeros(attention_mask.shape, dtype=dtype, device=attention_mask.device)
        pad = pad.masked_fill(attention_mask == 0, lowest)[:, None, None, :]
        return (bias + pad).clamp_(min=lowest)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        hidden = self.embeddings(input_ids, token_type_ids)
        return self.encoder(hidden, self.attention_bias(attention_mask, hidden.dtype))


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
        encs = self.tok.encode_batch(list(texts), add_special_tokens=True)
        return [np.asarray(e.ids, dtype=np.int32) for e in encs]

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
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, task: str | None = None
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
