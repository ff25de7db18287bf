"""jina-vlm: image (or text) -> caption / alt text, a generator for the `caption` stage (arXiv 2512.04032).

Facts (the model repository's `modeling_jvlm.py`, `blocks_jvlm.py`, `configuration_jvlm.py`, the model card;
the tiny fixture's README). Checkpoint: `model_type "jvlm"`, `architectures ["JinaVLMForConditionalGeneration"]`,
safetensors with `model.vision_model.*`, `model.language_model.*` and `lm_head.weight`.

* Vision tower (SigLIP2-style): `x = patches @ patch_embed + b + pos_embed` (no CLS token); pre-LN blocks
  (LayerNorm -> attention with fused `qkv_w` + `q_b|k_b|v_b`, scale `head_dim^-0.5`, no mask -> `out` (+bias),
  residual; LayerNorm -> `down(gelu_tanh(up x))`, residual). The hidden-state list is `[block 0 out, ...,
  block L-1 out, post_lnorm(last)]` and the features are `concat(list[k] for k in vit_layers)` (real
  `[-4, -10]`: blocks 24 and 18; later blocks and `post_lnorm` are not run here). A crop whose pixels are all
  -1 (padding, or a black crop) gets zero features.
* Connector: `pad_embed[0]` added where the patch mask is 0, `pad_embed[1]` where it is not 0 but < 1; the
  patch grid zero-padded to a multiple of the pooling (bottom/right); per 2x2 window (row-major, inside
  `(dh, dw)`) the window mean queries a cross-attention over the window (`q_w`, `kv_w` -> k|v, biases) ->
  `out` (+bias) -> gated projector: `up` -> first half value, second half gate -> `down(silu(gate) * value)`.
* Text decoder: Qwen3-style (RMSNorm, fused `qkv_w` split q|k|v, per-head RMS `q_lnorm`/`k_lnorm`, RoPE
  rotate-half with `rope_theta`, GQA, gated SiLU FFN with `up` = value|gate), run here as transformers' native
  `Qwen3Model` (SDPA) with re-mapped weights (`embed_tokens = embedding ++ new_embedding`, the
  `additional_vocab_size` image-token rows); `lm_head` has `embedding_size` rows (image tokens are never
  generated). The stored text `q_b|k_b|v_b` are zero in the real checkpoint; nonzero ones are applied (the
  reference always adds them). Image features are ADDED to the `<im_patch>` embeddings at `image_input_idx`
  (prefill only). Positions `clamp(cumsum(mask) - 1, 0)` (left padding).
* Generation (model card): greedy, no repetition penalty, stop on `eos_token_id` (`<|endoftext|>`); in a batch
  finished rows continue with the pad id until all are done.

Preprocessing and the prompt: `jina_vlm_processor`. An input is an image (+ the `prompt` option, default
"Describe this image", or the input's own `text` when given) or a text alone (the user turn is that text).
The context is `text_config.max_sequence_length`: a prompt (image tokens included) whose tokens plus
`max_new_tokens` exceed it is rejected as `too_long` (images above `max_pixels` are already scaled down by
smart_resize, so this only happens with very long texts or tiny contexts).

Rejects (per input, the others are generated): `image_decode_error` (undecodable image), `image_not_supported`
(no pixels or an aspect ratio over 200, which smart_resize refuses), `no_input` (neither an image nor a
non-blank text), `too_long` (see above).

Our choices: everything runs in the generator's dtype (bf16 on CUDA; float32 on CPU is the parity mode) with
logits in float32; crops of one batch go through the vision tower together; batches are length-bucketed by
prompt tokens (`length_batches`) and stop as soon as every row has emitted a stop id.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Sequence, cast

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .base import ModelError
from .checkpoint_files import check_no_meta_tensors, load_checked_state, load_tokenizer_file, read_config, read_json
from .generator import Generation, GenerationInput, Generator, GeneratorInfo, greedy_decode, length_batches
from .jina_vlm_processor import (IMAGE_PROMPT, IMAGE_TOKENS, ImageLayout, JinaVLMImageConfig, JinaVLMImageProcessor,
                                 PromptBatch, PromptInput, build_prompt, chat_prompt, collate,
                                 image_token_count, prompt_token_ids)
from .images import load_upright_rgb

ARCHITECTURE = "JinaVLMForConditionalGeneration"
DEFAULT_PROMPT = "Describe this image"
OPTIONS = ("prompt", "max_crops", "min_pixels", "max_pixels")


# -- config ---------------------------------------------------------------------------------------------------

def _require(cfg: dict[str, Any], where: str, **want: Any) -> None:
    """ModelError when a config value this implementation relies on differs (absent keys take the default)."""
    for key, value in want.items():
        if key in cfg and cfg[key] != value:
            raise ModelError(f"{where}.{key} = {cfg[key]!r} is not supported (expected {value!r})")


def _attn_dims(attn: dict[str, Any], hidden: int) -> tuple[int, int, int]:
    heads = int(attn["n_heads"])
    head_dim = int(attn.get("head_dim") or hidden // heads)
    return heads, int(attn.get("n_kv_heads") or heads), head_dim


@dataclass(frozen=True)
class VisionConfig:
    hidden: int
    layers: int
    heads: int
    head_dim: int
    ffn: int
    ffn_bias: bool
    o_bias: bool
    eps: float
    patch_dim: int
    n_patches: int  # per side
    vit_layers: tuple[int, ...]
    post_lnorm: bool
    pool_heads: int
    pool_head_dim: int
    pool_o_bias: bool
    pooling: tuple[int, int]
    proj_size: int
    proj_bias: bool
    output: int

    @property
    def feature_dim(self) -> int:
        return self.hidden * len(self.vit_layers)

    def hidden_index(self, k: int) -> int:
        """`vit_layers` entry -> index into [block 0 out, ..., block L-1 out, post_lnorm(last)]."""
        n = self.layers + 1
        if not -n <= k < n:
            raise ModelError(f"vit_layers entry {k} is out of range for {self.layers} layers")
        return k % n


def vision_config(raw: dict[str, Any], where: str) -> VisionConfig:
    block = raw["block_config"]
    attn, ffn, conn = block["attn_config"], block["ffn_config"], raw["vl_connector_config"]
    pool, proj = conn["attn_pooling_config"], conn["mlp_projector_config"]
    _require(raw, where, use_cls_token=False, linear_patch_embedding=True, pre_lnorm=False,
             use_absolute_positional_embeddings=True, n_channels=3)
    _require(block, f"{where}.block_config", postnorm=False, attn_lscale_init=None, ffn_lscale_init=None)
    _require(block["lnorm_config"], f"{where}.block_config.lnorm_config", type="default", with_affine=True, bias=True)
    for name, a in (("attn_config", attn), ("attn_pooling_config", pool)):
        _require(a, f"{where}.{name}", q_lnorm=False, k_lnorm=False, v_lnorm=False, inner_lnorm=False,
                 clip_qkv=None, softmax_scale=None, sliding_window=-1)
    _require(ffn, f"{where}.ffn_config", gated_activation=False, activation_type="gelu_pytorch_tanh", inner_lnorm=False)
    _require(conn, f"{where}.vl_connector_config", pooling_type="attention_meanq",
             padding_embed_type="pad_and_partial_pad", projector_type="mlp")
    _require(proj, f"{where}.mlp_projector_config", gated_activation=True, activation_type="silu", inner_lnorm=False)
    hidden = int(raw["hidden_size"])
    heads, kv_heads, head_dim = _attn_dims(attn, hidden)
    size = raw["input_size"]
    patch = int(raw["patch_size"])
    if kv_heads != heads or size[0] != size[1] or size[0] % patch:
        raise ModelError(f"{where}: n_kv_heads / input_size {size} / patch_size {patch} are not supported")
    pool_in = hidden * len(raw["vit_layers"])
    pool_heads, pool_kv, pool_head_dim = _attn_dims(pool, pool_in)
    if pool_kv != pool_heads:
        raise ModelError(f"{where}: attention pooling with n_kv_heads != n_heads is not supported")
    cfg = VisionConfig(
        hidden=hidden, layers=int(raw["n_layers"]), heads=heads, head_dim=head_dim,
        ffn=int(ffn.get("size") or ffn["ratio"] * hidden), ffn_bias=bool(ffn["bias"]), o_bias=bool(attn["o_bias"]),
        eps=float(block["lnorm_config"]["eps"]), patch_dim=3 * patch * patch, n_patches=size[0] // patch,
        vit_layers=tuple(int(k) for k in raw["vit_layers"]), post_lnorm=bool(raw.get("post_lnorm", True)),
        pool_heads=pool_heads, pool_head_dim=pool_head_dim, pool_o_bias=bool(pool["o_bias"]),
        pooling=(int(conn["pooling_h"]), int(conn["pooling_w"])),
        proj_size=int(proj.get("size") or proj["ratio"] * hidden), proj_bias=bool(proj["bias"]),
        output=int(raw["output_size"]),
    )
    for k in cfg.vit_layers:
        cfg.hidden_index(k)
    return cfg


@dataclass(frozen=True)
class TextConfig:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    ffn: int
    eps: float
    vocab: int  # lm_head rows (`embedding_size`)
    extra_vocab: int  # `additional_vocab_size`
    rope_theta: float
    max_length: int


def text_config(raw: dict[str, Any], where: str) -> TextConfig:
    block = raw["block_config"]
    attn, ffn = block["attn_config"], block["ffn_config"]
    _require(raw, where, rope=True, rope_scaling=None, normalize_input_embeds=False, partial_rotary_factor=1.0,
             rope_partial_factor=1.0)
    _require(block, f"{where}.block_config", postnorm=False, attn_lscale_init=None, ffn_lscale_init=None)
    for name, ln in (("lnorm_config", block["lnorm_config"]), ("attn_config.lnorm_config", attn["lnorm_config"])):
        _require(ln, f"{where}.block_config.{name}", type="rms", with_affine=True, bias=False)
    _require(attn, f"{where}.attn_config", q_lnorm=True, k_lnorm=True, qkv_lnorm_on_heads=True, v_lnorm=False,
             inner_lnorm=False, o_lnorm=False, o_bias=False, clip_qkv=None, softmax_scale=None, sliding_window=-1)
    _require(ffn, f"{where}.ffn_config", gated_activation=True, activation_type="silu", bias=False, inner_lnorm=False)
    hidden = int(raw["hidden_size"])
    heads, kv_heads, head_dim = _attn_dims(attn, hidden)
    eps = float(block["lnorm_config"]["eps"])
    if float(attn["lnorm_config"]["eps"]) != eps:
        raise ModelError(f"{where}: q/k norm eps differs from the block norm eps (not supported)")
    return TextConfig(
        hidden=hidden, layers=int(raw["n_layers"]), heads=heads, kv_heads=kv_heads, head_dim=head_dim,
        ffn=int(ffn.get("size") or ffn["ratio"] * hidden), eps=eps,
        vocab=int(raw.get("embedding_size") or raw["vocab_size"]),
        extra_vocab=int(raw.get("additional_vocab_size") or 0),
        rope_theta=float(raw["rope_theta"]), max_length=int(raw["max_sequence_length"]),
    )


# -- vision tower + connector ---------------------------------------------------------------------------------

class _Linear(nn.Linear):
    """nn.Linear without random init (weights always come from the checkpoint)."""

    def reset_parameters(self) -> None:
        pass


class _VisionAttention(nn.Module):
    def __init__(self, c: VisionConfig):
        super().__init__()
        inner = c.heads * c.head_dim
        self.heads = c.heads
        self.qkv_w = _Linear(c.hidden, 3 * inner, bias=False)
        self.q_b, self.k_b, self.v_b = (nn.Parameter(torch.empty(inner)) for _ in range(3))
        self.out = _Linear(inner, c.hidden, bias=c.o_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, _ = x.shape
        qkv = F.linear(x, self.qkv_w.weight, torch.cat((self.q_b, self.k_b, self.v_b)))
        q, k, v = (y.reshape(n, t, self.heads, -1).transpose(1, 2) for y in qkv.chunk(3, dim=-1))
        return self.out(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(n, t, -1))


class _VisionFFN(nn.Module):
    def __init__(self, c: VisionConfig):
        super().__init__()
        self.up = _Linear(c.hidden, c.ffn, bias=c.ffn_bias)
        self.down = _Linear(c.ffn, c.hidden, bias=c.ffn_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.gelu(self.up(x), approximate="tanh"))


class _VisionBlock(nn.Module):
    def __init__(self, c: VisionConfig):
        super().__init__()
        self.attn_lnorm = nn.LayerNorm(c.hidden, eps=c.eps)
        self.attn = _VisionAttention(c)
        self.ffn_lnorm = nn.LayerNorm(c.hidden, eps=c.eps)
        self.ffn = _VisionFFN(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.attn_lnorm(x))
        return x + self.ffn(self.ffn_lnorm(x))


class _AttentionPooling(nn.Module):
    """Cross-attention of one query (the window mean) over a pooling window."""

    def __init__(self, c: VisionConfig):
        super().__init__()
        inner = c.pool_heads * c.pool_head_dim
        self.heads = c.pool_heads
        self.q_w = _Linear(c.feature_dim, inner, bias=False)
        self.kv_w = _Linear(c.feature_dim, 2 * inner, bias=False)
        self.q_b, self.k_b, self.v_b = (nn.Parameter(torch.empty(inner)) for _ in range(3))
        self.out = _Linear(inner, c.hidden, bias=c.pool_o_bias)

    def forward(self, windows: torch.Tensor) -> torch.Tensor:
        n, t, _ = windows.shape
        q = F.linear(windows.mean(1, keepdim=True), self.q_w.weight, self.q_b)
        k, v = F.linear(windows, self.kv_w.weight, torch.cat((self.k_b, self.v_b))).chunk(2, dim=-1)
        q = q.reshape(n, 1, self.heads, -1).transpose(1, 2)
        k, v = (y.reshape(n, t, self.heads, -1).transpose(1, 2) for y in (k, v))
        return self.out(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(n, -1))


class _Projector(nn.Module):
    """Gated MLP: `up` -> (value, gate) halves -> `down(silu(gate) * value)`."""

    def __init__(self, c: VisionConfig):
        super().__init__()
        self.up = _Linear(c.hidden, 2 * c.proj_size, bias=c.proj_bias)
        self.down = _Linear(c.proj_size, c.output, bias=c.proj_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        value, gate = self.up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * value)


class _Connector(nn.Module):
    def __init__(self, c: VisionConfig):
        super().__init__()
        self.c = c
        self.pad_embed = nn.Parameter(torch.empty(2, c.feature_dim))
        self.pooling = _AttentionPooling(c)
        self.projector = _Projector(c)

    def forward(self, feats: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """[n, P, feature_dim] ViT features, [n, P] patch masks -> [n, pooled cells, output]."""
        all_pad = (masks == 0).to(feats.dtype)[..., None]
        partial = ((masks < 1) & (masks != 0)).to(feats.dtype)[..., None]
        feats = feats + self.pad_embed[0] * all_pad + self.pad_embed[1] * partial
        n, s, (ph, pw) = feats.shape[0], self.c.n_patches, self.c.pooling
        grid = feats.reshape(n, s, s, -1)
        grid = F.pad(grid, (0, 0, 0, (-s) % pw, 0, (-s) % ph))  # zero rows/cols at the bottom/right
        gh, gw = grid.shape[1] // ph, grid.shape[2] // pw
        windows = grid.reshape(n, gh, ph, gw, pw, -1).permute(0, 1, 3, 2, 4, 5).reshape(n * gh * gw, ph * pw, -1)
        return self.projector(self.pooling(windows)).reshape(n, gh * gw, -1)


class _PatchEmbed(nn.Module):
    def __init__(self, c: VisionConfig):
        super().__init__()
        self.proj = _Linear(c.patch_dim, c.hidden, bias=True)


class VisionTower(nn.Module):
    """The vision model and connector; parameter names as in the checkpoint under `model.vision_model.`."""

    def __init__(self, c: VisionConfig):
        super().__init__()
        self.c = c
        self.patch_embed = _PatchEmbed(c)
        self.pos_embed = nn.Parameter(torch.empty(c.n_patches ** 2, c.hidden))
        self.layers = nn.ModuleList(_VisionBlock(c) for _ in range(c.layers))
        if c.post_lnorm:
            self.post_lnorm = nn.LayerNorm(c.hidden, eps=c.eps)
        self.vl_connector = _Connector(c)

    def features(self, crops: torch.Tensor) -> torch.Tensor:
        """[n, P, patch_dim] -> [n, P, feature_dim]: the `vit_layers` hidden states concatenated."""
        wanted = [self.c.hidden_index(k) for k in self.c.vit_layers]
        x = self.patch_embed.proj(crops) + self.pos_embed
        states: dict[int, torch.Tensor] = {}
        for i, layer in enumerate(self.layers[: min(max(wanted) + 1, self.c.layers)]):
            x = layer(x)
            states[i] = x
        if self.c.layers in wanted:
            states[self.c.layers] = self.post_lnorm(x) if self.c.post_lnorm else x
        return torch.cat([states[i] for i in wanted], dim=-1)

    def forward(self, crops: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """[n, P, patch_dim] crops, [n, P] masks -> [n, pooled cells, output] image features."""
        real = ~(crops == -1).flatten(1).all(1)  # all -1 crops (padding) get zero features
        feats = self.features(crops) * real[:, None, None].to(crops.dtype)
        return self.vl_connector(feats, masks.to(crops.dtype))


# -- checkpoint -----------------------------------------------------------------------------------------------

def text_layout(t: TextConfig) -> dict[str, tuple[int, ...]]:
    """The checkpoint's text tensors (names under `model.language_model.`) and shapes."""
    q, kv = t.heads * t.head_dim, t.kv_heads * t.head_dim
    out: dict[str, tuple[int, ...]] = {"embedding.embedding": (t.vocab, t.hidden), "ln_f.weight": (t.hidden,)}
    if t.extra_vocab:
        out["embedding.new_embedding"] = (t.extra_vocab, t.hidden)
    for i in range(t.layers):
        p = f"layers.{i}."
        out.update({
            p + "attn.qkv_w.weight": (q + 2 * kv, t.hidden), p + "attn.q_b": (q,), p + "attn.k_b": (kv,),
            p + "attn.v_b": (kv,), p + "attn.q_lnorm.weight": (t.head_dim,), p + "attn.k_lnorm.weight": (t.head_dim,),
            p + "attn.out.weight": (t.hidden, q), p + "attn_lnorm.weight": (t.hidden,),
            p + "ffn.up.weight": (2 * t.ffn, t.hidden), p + "ffn.down.weight": (t.hidden, t.ffn),
            p + "ffn_lnorm.weight": (t.hidden,),
        })
    return out


def qwen3_state(src: dict[str, torch.Tensor], t: TextConfig, bias: bool) -> dict[str, torch.Tensor]:
    """Checkpoint text tensors (prefix stripped) -> `Qwen3Model` names: q|k|v split, up = value (first
    half) and gate (second half), the embedding table with the extra rows appended."""
    q, kv = t.heads * t.head_dim, t.kv_heads * t.head_dim
    table = [src["embedding.embedding"]] + ([src["embedding.new_embedding"]] if t.extra_vocab else [])
    out = {"embed_tokens.weight": torch.cat(table), "norm.weight": src["ln_f.weight"]}
    for i in range(t.layers):
        s, d = f"layers.{i}.", f"layers.{i}."
        wq, wk, wv = src[s + "attn.qkv_w.weight"].split((q, kv, kv))
        up, gate = src[s + "ffn.up.weight"].chunk(2)
        out.update({
            d + "self_attn.q_proj.weight": wq, d + "self_attn.k_proj.weight": wk, d + "self_attn.v_proj.weight": wv,
            d + "self_attn.o_proj.weight": src[s + "attn.out.weight"],
            d + "self_attn.q_norm.weight": src[s + "attn.q_lnorm.weight"],
            d + "self_attn.k_norm.weight": src[s + "attn.k_lnorm.weight"],
            d + "mlp.up_proj.weight": up, d + "mlp.gate_proj.weight": gate,
            d + "mlp.down_proj.weight": src[s + "ffn.down.weight"],
            d + "input_layernorm.weight": src[s + "attn_lnorm.weight"],
            d + "post_attention_layernorm.weight": src[s + "ffn_lnorm.weight"],
        })
        if bias:
            w = src[s + "attn.out.weight"]
            out.update({d + "self_attn.q_proj.bias": src[s + "attn.q_b"],
                        d + "self_attn.k_proj.bias": src[s + "attn.k_b"],
                        d + "self_attn.v_proj.bias": src[s + "attn.v_b"],
                        d + "self_attn.o_proj.bias": torch.zeros(w.shape[0], dtype=w.dtype, device=w.device)})
    return out


def qwen3_config(t: TextConfig, bias: bool) -> Any:
    from transformers import Qwen3Config

    config = Qwen3Config(
        vocab_size=t.vocab + t.extra_vocab, hidden_size=t.hidden, intermediate_size=t.ffn, num_hidden_layers=t.layers,
        num_attention_heads=t.heads, num_key_value_heads=t.kv_heads, head_dim=t.head_dim, rms_norm_eps=t.eps,
        rope_parameters={"rope_type": "default", "rope_theta": t.rope_theta}, max_position_embeddings=t.max_length,
        attention_bias=bias, tie_word_embeddings=False, hidden_act="silu",
    )
    config._attn_implementation = "sdpa"
    return config


@dataclass
class Prepared:
    """An input ready for batching: prompt ids (placeholder included), its image (smart-resized) and length."""

    text_ids: list[int]
    placeholder: int  # index of the image placeholder in text_ids, -1: text only
    pixels: np.ndarray | None
    layout: ImageLayout | None
    length: int  # tokens of the final prompt (BOS and image tokens included)


class JinaVLM(Generator):
    """`jina-vlm`: image -> caption (or a text prompt -> answer), greedy, batched with a KV cache.

    Options: `prompt` (the text after the image, default "Describe this image"), `max_crops`, `min_pixels`,
    `max_pixels` (default: preprocessor_config.json's)."""

    name = "jina-vlm"
    modalities = ("image",)
    fp16_safe = False  # Qwen3 decoder: float16 activations overflow
    options = OPTIONS

    def __init__(self, path: str, device: str | torch.device | None = None, dtype: str = "auto",
                 force_dtype: bool = False, **options: Any):
        super().__init__(path, device, dtype, force_dtype, **options)
        raw = read_config(path)
        archs = raw.get("architectures") or []
        if ARCHITECTURE not in archs or raw.get("model_type") != "jvlm":
            raise ModelError(f"{path}: architectures {archs} / model_type {raw.get('model_type')!r}; {self.name} "
                             f"expects {ARCHITECTURE} ('jvlm')")
        if not raw.get("vision_config") or not raw.get("text_config"):
            raise ModelError(f"{path}/config.json: vision_config and text_config are required")
        try:
            self.vision_cfg = vision_config(raw["vision_config"], f"{path}/config.json vision_config")
            self.text_cfg = text_config(raw["text_config"], f"{path}/config.json text_config")
        except ModelError:
            raise
        except (KeyError, TypeError, ValueError) as e:
            raise ModelError(f"{path}/config.json: unreadable jina-vlm config ({type(e).__name__}: {e})") from e
        if self.vision_cfg.output != self.text_cfg.hidden:
            raise ModelError(f"{path}: vision output_size {self.vision_cfg.output} != text hidden_size "
                             f"{self.text_cfg.hidden}")
        self.prompt = str(options.get("prompt") or DEFAULT_PROMPT)
        self.context_length = self.text_cfg.max_length
        self._load_tokenizer(path, raw)
        self.image_config = JinaVLMImageConfig.from_dir(
            path, **{k: options.get(k) for k in ("max_crops", "min_pixels", "max_pixels")})
        if self.image_config.crop_patches != self.vision_cfg.n_patches:
            raise ModelError(f"{path}: preprocessor crop size {self.image_config.crop_size} does not match the "
                             f"vision input size ({self.vision_cfg.n_patches} patches per side)")
        self.images = JinaVLMImageProcessor(self.image_config, self.image_ids)
        self.vision, self.decoder, self.lm_head = self._load_model(path)
        self._hash: str | None = None

    # -- loading --------------------------------------------------------------------------------------------

    def _load_tokenizer(self, path: str, raw: dict[str, Any]) -> None:
        tok = load_tokenizer_file(path, 1)
        tok.no_truncation()
        tok.encode_special_tokens = True  # special-token strings in prompts stay plain text
        if tok.num_special_tokens_to_add(False):
            raise ModelError(f"{path}: the tokenizer adds special tokens; the jina-vlm prompt expects none")
        ids: dict[str, int] = {}
        for token in IMAGE_TOKENS + (IMAGE_PROMPT,):
            tid = tok.token_to_id(token)
            if tid is None:
                raise ModelError(f"{path}: the tokenizer has no {token!r}; not a jina-vlm tokenizer")
            ids[token] = int(tid)
        pre = read_json(os.path.join(path, "preprocessor_config.json")) or {}
        for key, token in (("patch_token_id", "<im_patch>"), ("column_token_id", "<im_col>"),
                           ("start_token_id", "<im_start>"), ("end_token_id", "<im_end>")):
            if key in pre and int(pre[key]) != ids[token]:
                raise ModelError(f"{path}: preprocessor_config {key} {pre[key]} is not the tokenizer's {token} "
                                 f"({ids[token]})")
        gen = read_json(os.path.join(path, "generation_config.json")) or {}
        eos = gen.get("eos_token_id", raw.get("eos_token_id"))
        eos_ids = [int(e) for e in (eos if isinstance(eos, list) else [eos]) if e is not None]
        if not eos_ids:
            raise ModelError(f"{path}: no eos_token_id in generation_config.json or config.json")
        pad = gen.get("pad_token_id", raw.get("pad_token_id"))
        tok_cfg = read_json(os.path.join(path, "tokenizer_config.json")) or {}
        bos = tok_cfg.get("bos_token") or tok_cfg.get("eos_token")  # no BOS: the processor prepends the EOS
        bos = bos.get("content") if isinstance(bos, dict) else bos
        bos_id = tok.token_to_id(bos) if bos else eos_ids[0]
        if bos_id is None:
            raise ModelError(f"{path}: tokenizer_config token {bos!r} is not in tokenizer.json")
        self.tok, self.image_ids = tok, ids
        self.eos_ids, self.bos_id = eos_ids, int(bos_id)
        self.pad_id = int(pad) if pad is not None else eos_ids[0]
        self.always_start_with_space = bool(
            (read_json(os.path.join(path, "processor_config.json")) or {}).get("always_start_with_space", False))

    def _load_model(self, path: str) -> tuple[VisionTower, nn.Module, nn.Linear]:
        """Vision tower, Qwen3Model and lm_head from the safetensors, names and shapes checked."""
        from transformers import Qwen3Model
        from transformers.models.qwen3.modeling_qwen3 import Qwen3RotaryEmbedding

        t = self.text_cfg
        with torch.device("meta"):
            vision = VisionTower(self.vision_cfg)
        expected = {f"model.vision_model.{k}": v for k, v in vision.state_dict().items()}
        expected.update({f"model.language_model.{k}": torch.empty(s, device="meta") for k, s in text_layout(t).items()})
        expected["lm_head.weight"] = torch.empty(t.vocab, t.hidden, device="meta")
        state = load_checked_state(path, expected, lambda k: k, self.dtype, self.device, self.name)
        vision.load_state_dict({k[len("model.vision_model."):]: v for k, v in state.items()
                                if k.startswith("model.vision_model.")}, strict=True, assign=True)
        text = {k[len("model.language_model."):]: v for k, v in state.items() if k.startswith("model.language_model.")}
        bias = any(bool(v.any()) for k, v in text.items() if k.endswith(("attn.q_b", "attn.k_b", "attn.v_b")))
        config = qwen3_config(t, bias)
        with torch.device("meta"):
            decoder = Qwen3Model(config)
        decoder.load_state_dict(qwen3_state(text, t, bias), strict=True, assign=True)
        decoder.rotary_emb = Qwen3RotaryEmbedding(config).to(self.device)  # non-persistent buffers, off meta
        lm_head = _Linear(t.hidden, t.vocab, bias=False, device="meta")
        lm_head.load_state_dict({"weight": state["lm_head.weight"]}, assign=True)
        for module in (vision, decoder, lm_head):
            check_no_meta_tensors(module, path)
        return vision.eval(), decoder.eval(), lm_head.eval()

    # -- inputs ---------------------------------------------------------------------------------------------

    def prepare(self, inp: GenerationInput) -> Prepared | str:
        """An input ready for batching, or the reject reason. The image is decoded and smart-resized here."""
        text = inp.text if inp.text is not None and inp.text.strip() else None
        if inp.image is None:
            if text is None:
                return "no_input: neither an image nor a text"
            ids, _ = prompt_token_ids(self.tok, text, False, self.always_start_with_space)
            return Prepared(ids, -1, None, None, len(ids) + 1)
        try:
            image = load_upright_rgb(inp.image)
        except Exception as e:  # noqa: BLE001 - any decoder failure is this input's reject
            return f"image_decode_error: {type(e).__name__}: {e}"[:300]
        try:
            pixels = self.images.prepare(image)
        except ModelError as e:
            return f"image_not_supported: {e}"[:300]
        layout = self.images.layout(int(pixels.shape[0]), int(pixels.shape[1]))
        ids, ph = prompt_token_ids(self.tok, text if text is not None else self.prompt, True,
                                   self.always_start_with_space)
        return Prepared(ids, ph, pixels, layout, len(ids) + 1 + image_token_count(layout))

    def prompt_input(self, p: Prepared) -> PromptInput:
        """The model input of a prepared input (crops computed here)."""
        if p.pixels is None:
            return build_prompt(p.text_ids, -1, self.bos_id)
        crops, layout = self.images.crops(p.pixels)
        return build_prompt(p.text_ids, p.placeholder, self.bos_id, layout, crops)

    # -- model ----------------------------------------------------------------------------------------------

    @torch.inference_mode()
    def image_features(self, crops: np.ndarray | torch.Tensor, masks: np.ndarray | torch.Tensor) -> torch.Tensor:
        """[n, P, D] crops and [n, P] masks -> [n, pooled cells, hidden] features (model dtype)."""
        crops = torch.as_tensor(crops, device=self.device).to(self.dtype)
        return self.vision(crops, torch.as_tensor(masks, device=self.device))

    @torch.inference_mode()
    def input_embeddings(self, batch: PromptBatch) -> torch.Tensor:
        """[B, L, hidden]: token embeddings (padding as id 0) with the image features added at their tokens."""
        ids = torch.as_tensor(batch.input_ids, device=self.device)
        embeds = self.decoder.embed_tokens(ids.clamp(min=0))
        if batch.images is not None:
            rows = [i for i, n in enumerate(batch.n_crops) for _ in range(n)]
            crops = np.concatenate([batch.images[i, :n] for i, n in enumerate(batch.n_crops) if n])
            masks = np.concatenate([batch.image_masks[i, :n] for i, n in enumerate(batch.n_crops) if n])
            idx = torch.as_tensor(np.concatenate([batch.image_input_idx[i, :n] for i, n in enumerate(batch.n_crops)
                                                  if n]), device=self.device)
            feats = self.image_features(crops, masks)
            row = torch.as_tensor(rows, device=self.device)[:, None].expand_as(idx)
            valid = idx >= 0
            embeds[row[valid], idx[valid]] += feats[valid].to(embeds.dtype)
        return embeds

    @torch.inference_mode()
    def prefill(self, batch: PromptBatch) -> tuple[torch.Tensor, torch.Tensor, Any]:
        """(final-norm hidden state at the last position [B, hidden], its logits [B, vocab] fp32, KV cache)."""
        from transformers import DynamicCache

        mask = torch.as_tensor(batch.attention_mask, device=self.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache(config=self.decoder.config)
        out = self.decoder(inputs_embeds=self.input_embeddings(batch), attention_mask=mask, position_ids=positions,
                           past_key_values=cache, use_cache=True)
        last = out.last_hidden_state[:, -1]
        return last, self.lm_head(last).float(), out.past_key_values

    @torch.inference_mode()
    def greedy(self, batch: PromptBatch, max_new_tokens: int) -> list[tuple[list[int], bool]]:
        """(greedy ids up to and including the first stop id, stopped) per row (at most `max_new_tokens`)."""
        _, logits, cache = self.prefill(batch)
        state = {"mask": torch.as_tensor(batch.attention_mask, device=self.device), "cache": cache}

        def step(nxt: torch.Tensor) -> torch.Tensor:
            mask = state["mask"] = torch.cat([state["mask"], torch.ones_like(state["mask"][:, :1])], dim=1)
            out = self.decoder(inputs_embeds=self.decoder.embed_tokens(nxt[:, None]), attention_mask=mask,
                               position_ids=mask.sum(-1, keepdim=True) - 1, past_key_values=state["cache"],
                               use_cache=True)
            state["cache"] = out.past_key_values
            return self.lm_head(out.last_hidden_state[:, -1]).float()

        return greedy_decode(logits, step, self.eos_ids, self.pad_id, max_new_tokens)

    # -- the Generator interface ----------------------------------------------------------------------------

    def generate(self, inputs: Sequence[GenerationInput], max_new_tokens: int,
                 batch_tokens: int | None = None) -> list[Generation]:
        if max_new_tokens < 1:
            raise ModelError(f"{self.name}: max_new_tokens must be >= 1")
        out: list[Generation | None] = [None] * len(inputs)
        ready: dict[int, Prepared] = {}
        for i, inp in enumerate(inputs):
            p = self.prepare(inp)
            if isinstance(p, str):
                out[i] = Generation(reject=p)
            elif p.length + max_new_tokens > self.context_length:
                out[i] = Generation(prompt_tokens=p.length, reject=(
                    f"too_long: {p.length} prompt tokens + max_new_tokens {max_new_tokens} exceed the context "
                    f"of {self.context_length}"))
            else:
                ready[i] = p
        keys = list(ready)
        for group in length_batches([ready[k].length for k in keys], max_new_tokens, batch_tokens):
            rows = [keys[g] for g in group]
            batch = collate([self.prompt_input(ready[i]) for i in rows])
            for i, (ids, finished) in zip(rows, self.greedy(batch, max_new_tokens)):
                out[i] = Generation(text=self.tok.decode(ids, skip_special_tokens=True), ids=ids, finished=finished,
                                    prompt_tokens=ready[i].length)
        return cast(list[Generation], out)  # every position is set above

    def info(self) -> GeneratorInfo:
        if self._hash is None:
            self._hash = self._checkpoint_hash()
        c = self.image_config
        return GeneratorInfo(
            family=self.name,
            checkpoint=self._hash,
            context_length=self.context_length,
            modalities=list(self.modalities),
            output="caption",
            extra={
                "prompt": self.prompt,
                "prompt_template": chat_prompt("{prompt}", True, self.always_start_with_space),
                "decoding": "greedy",
                "max_crops": c.max_crops,
                "min_pixels": c.min_pixels,
                "max_pixels": c.max_pixels,
                "dtype": str(self.dtype).removeprefix("torch."),
            },
        )
