"""EVA02 vision transformer, as used by jina-clip-v2's vision tower (`vision_model.*` keys).

Plain torch, inference only, written after the inference path of the EVA02 `EVAVisionTransformer`
(jina-clip-implementation `eva_model.py` / `rope_embeddings.py`) with the options jina-clip-v2 uses:

* patch embedding: Conv2d(kernel = stride = patch_size, bias) -> [B, N, width]; CLS prepended;
  absolute `pos_embed` [1, N + 1, width] added.
* blocks (pre-norm, LayerNorm eps 1e-6 everywhere):
    x = x + proj(inner_attn_ln(attn(norm1(x))))
    x = x + w3(ffn_ln(silu(w1(h)) * w2(h)))      with h = norm2(x)
  attention: q = q_proj(x) + q_bias, k = k_proj(x) (no bias), v = v_proj(x) + v_bias;
  softmax(q k^T * head_dim^-0.5) v; 2-D RoPE applied to q and k of the PATCH tokens only (CLS untouched).
* output: final `norm`, then the CLS token; `head` is the identity (width == embed_dim, proj_type null).

2-D RoPE (`VisionRotaryEmbeddingFast`): per axis dim = head_dim / 2, freqs = 1 / 10000^(arange(0, dim, 2) / dim),
positions t = arange(ft) / ft * pt_hw_seq_len with ft = image_size / patch_size (`intp_freq`; else ft =
pt_hw_seq_len), each frequency repeated twice (interleaved pairs), [h-part | w-part] concatenated per patch
(row-major), applied as `t * cos + rotate_half(t) * sin` with the INTERLEAVED rotate_half
((x0, x1, x2, x3, ...) -> (-x1, x0, -x3, x2, ...)).

Checkpoint variants recognised from tensor shapes: split `attn.{q,k,v}_proj.weight` or a fused
`attn.qkv.weight` [3 * width, width] (split on load); SwiGLU `mlp.w1`/`mlp.w2` or a fused `mlp.w12`
[2 * hidden, width] (split on load). Anything else that the config or the tensors ask for and this module
does not implement (post-norm, layer scale, a projection head, a non-SwiGLU MLP, ...) is a ModelError.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from .base import ModelError

LAYER_NORM_EPS = 1e-6
ROPE_THETA = 10000.0


# ----------------------------------------------------------------------------------------------
# config


@dataclass(frozen=True)
class EVA02Config:
    """The EVA02 architecture values, read from jina-clip's `vision_config` (and checked against the weights)."""

    width: int
    layers: int
    num_heads: int
    head_dim: int
    mlp_hidden: int
    patch_size: int
    image_size: int
    embed_dim: int
    pt_hw_seq_len: int
    intp_freq: bool
    rope: bool
    subln: bool
    qkv_bias: bool
    layer_norm_eps: float = LAYER_NORM_EPS

    @property
    def grid(self) -> int:
        """Patches per side."""
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid * self.grid

    @property
    def seq_len(self) -> int:
        """Tokens per image (patches + CLS)."""
        return self.num_patches + 1

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any], where: str = "vision_config") -> EVA02Config:
        """Validate `raw` (jina-clip's `vision_config`); every unsupported option is a ModelError naming it."""

        def need(key: str) -> Any:
            if raw.get(key) is None:
                raise ModelError(f"{where}: missing {key!r}")
            return raw[key]

        try:
            width = int(need("width"))
            layers = int(need("layers"))
            head_width = int(need("head_width"))
            mlp_ratio = float(need("mlp_ratio"))
            patch_size = int(need("patch_size"))
            image_size = int(need("image_size"))
            embed_dim = int(raw.get("embed_dim") or width)
            pt_hw_seq_len = int(raw.get("pt_hw_seq_len", 16))
        except (TypeError, ValueError) as e:
            raise ModelError(f"{where}: bad value ({e})") from None
        if width % head_width:
            raise ModelError(f"{where}: width {width} is not a multiple of head_width {head_width}")
        if head_width % 4:
            raise ModelError(f"{where}: head_width {head_width} must be a multiple of 4 for the 2-D rotary embedding")
        # image_size need not be a multiple of patch_size (jina-clip-v2: 512 / 14): the stride-patch
        # convolution covers image_size // patch_size patches per side and ignores the remainder pixels
        for key, want in (("post_norm", False), ("naive_swiglu", True)):
            if key in raw and raw[key] is not None and bool(raw[key]) != want:
                hint = {"post_norm": "post-norm blocks", "naive_swiglu": "the fused xformers SwiGLU variant"}[key]
                raise ModelError(f"{where}: {key}={raw[key]!r} ({hint}) is not supported by this EVA02 implementation")
        if raw.get("ls_init_value") is not None:
            raise ModelError(f"{where}: ls_init_value={raw['ls_init_value']!r} (layer scale) is not supported")
        if raw.get("proj_type") is not None:
            raise ModelError(f"{where}: proj_type={raw['proj_type']!r} (a vision projection head) is not supported")
        if embed_dim != width:
            raise ModelError(
                f"{where}: embed_dim {embed_dim} != width {width} implies a linear head, which is not supported"
            )
        if raw.get("use_mean_pooling"):
            raise ModelError(f"{where}: use_mean_pooling is not supported (CLS-token pooling only)")
        return cls(
            width=width,
            layers=layers,
            num_heads=width // head_width,
            head_dim=head_width,
            mlp_hidden=int(width * mlp_ratio),
            patch_size=patch_size,
            image_size=image_size,
            embed_dim=embed_dim,
            pt_hw_seq_len=pt_hw_seq_len,
            intp_freq=bool(raw.get("intp_freq", True)),
            rope=bool(raw.get("rope_embeddings", True)),
            subln=bool(raw.get("subln", True)),
            qkv_bias=bool(raw.get("qkv_bias", True)),
        )


# ----------------------------------------------------------------------------------------------
# rotary embedding


def rotate_half_interleaved(x: torch.Tensor) -> torch.Tensor:
    """(x0, x1, x2, x3, ...) -> (-x1, x0, -x3, x2, ...): EVA's `rotate_half` on interleaved pairs."""
    x = x.unflatten(-1, (-1, 2))
    x1, x2 = x.unbind(-1)
    return torch.stack((-x2, x1), dim=-1).flatten(-2)


def rope_tables(cfg: EVA02Config, device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin), each [num_patches, head_dim] fp32, in row-major patch order."""
    dim = cfg.head_dim // 2  # per axis
    freqs = 1.0 / (ROPE_THETA ** (torch.arange(0, dim, 2, dtype=torch.float32)[: dim // 2] / dim))
    ft = cfg.grid if cfg.intp_freq else cfg.pt_hw_seq_len
    if ft != cfg.grid:
        raise ModelError(
            f"vision_config: intp_freq false with pt_hw_seq_len {cfg.pt_hw_seq_len} != {cfg.grid} patches per side "
            "is not supported"
        )
    t = torch.arange(ft, dtype=torch.float32) / ft * cfg.pt_hw_seq_len
    f = torch.outer(t, freqs).repeat_interleave(2, dim=-1)  # [ft, dim]
    grid = torch.cat((f[:, None, :].expand(ft, ft, dim), f[None, :, :].expand(ft, ft, dim)), dim=-1)
    grid = grid.reshape(ft * ft, 2 * dim)
    return grid.cos().to(device), grid.sin().to(device)


# ----------------------------------------------------------------------------------------------
# modules


class EVA02Attention(nn.Module):
    def __init__(self, cfg: EVA02Config):
        super().__init__()
        d = cfg.width
        self.num_heads, self.head_dim = cfg.num_heads, cfg.head_dim
        self.q_proj = nn.Linear(d, d, bias=False)
        self.k_proj = nn.Linear(d, d, bias=False)
        self.v_proj = nn.Linear(d, d, bias=False)
        if cfg.qkv_bias:
            self.q_bias = nn.Parameter(torch.zeros(d))
            self.v_bias = nn.Parameter(torch.zeros(d))
        else:
            self.q_bias = self.v_bias = None
        self.inner_attn_ln = nn.LayerNorm(d, eps=cfg.layer_norm_eps) if cfg.subln else nn.Identity()
        self.proj = nn.Linear(d, d)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        b, n, _ = x.shape
        q = F.linear(x, self.q_proj.weight, self.q_bias)
        k = self.k_proj(x)
        v = F.linear(x, self.v_proj.weight, self.v_bias)
        q, k, v = (t.view(b, n, self.num_heads, self.head_dim).transpose(1, 2) for t in (q, k, v))
        if rope is not None:  # patch tokens only; CLS (index 0) keeps its q/k
            cos, sin = rope
            q = torch.cat((q[:, :, :1], _apply_rope(q[:, :, 1:], cos, sin)), dim=2)
            k = torch.cat((k[:, :, :1], _apply_rope(k[:, :, 1:], cos, sin)), dim=2)
        out = F.scaled_dot_product_attention(q, k, v, scale=self.head_dim**-0.5)
        out = out.transpose(1, 2).reshape(b, n, -1)
        return self.proj(self.inner_attn_ln(out))


def _apply_rope(t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    tf = t.float()
    return (tf * cos + rotate_half_interleaved(tf) * sin).to(t.dtype)


class EVA02SwiGLU(nn.Module):
    def __init__(self, cfg: EVA02Config):
        super().__init__()
        d, h = cfg.width, cfg.mlp_hidden
        self.w1 = nn.Linear(d, h)
        self.w2 = nn.Linear(d, h)
        self.ffn_ln = nn.LayerNorm(h, eps=cfg.layer_norm_eps) if cfg.subln else nn.Identity()
        self.w3 = nn.Linear(h, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w3(self.ffn_ln(F.silu(self.w1(x)) * self.w2(x)))


class EVA02Block(nn.Module):
    def __init__(self, cfg: EVA02Config):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.attn = EVA02Attention(cfg)
        self.norm2 = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.mlp = EVA02SwiGLU(cfg)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), rope)
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    def __init__(self, cfg: EVA02Config):
        super().__init__()
        self.proj = nn.Conv2d(3, cfg.width, kernel_size=cfg.patch_size, stride=cfg.patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # [B, N, width], row-major patches


class EVA02VisionTransformer(nn.Module):
    """[B, 3, S, S] normalised pixels -> [B, embed_dim] (final-norm CLS token)."""

    def __init__(self, cfg: EVA02Config):
        super().__init__()
        self.config = cfg
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.width))
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.seq_len, cfg.width))
        self.patch_embed = PatchEmbed(cfg)
        self.blocks = nn.ModuleList(EVA02Block(cfg) for _ in range(cfg.layers))
        self.norm = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.rope_cos: torch.Tensor
        self.rope_sin: torch.Tensor
        cos, sin = rope_tables(cfg) if cfg.rope else (torch.empty(0), torch.empty(0))
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def forward_tokens(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """All tokens after the last block, before the final norm: [B, N + 1, width] (CLS first)."""
        cfg = self.config
        if pixel_values.shape[-2:] != (cfg.image_size, cfg.image_size):
            raise ModelError(
                f"EVA02 expects {cfg.image_size}x{cfg.image_size} pixels, got {tuple(pixel_values.shape[-2:])}"
            )
        x = self.patch_embed(pixel_values.to(self.pos_embed.dtype))
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1) + self.pos_embed
        rope = (self.rope_cos.float(), self.rope_sin.float()) if cfg.rope else None
        for block in self.blocks:
            x = block(x, rope)
        return x

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.norm(self.forward_tokens(pixel_values))[:, 0]


# ----------------------------------------------------------------------------------------------
# checkpoint


def convert_state(tensors: Mapping[str, torch.Tensor], cfg: EVA02Config, where: str) -> dict[str, torch.Tensor]:
    """EVA02 checkpoint tensors (prefix already stripped) -> this module's state dict.

    Fused variants are detected from the keys/shapes (`attn.qkv.weight` [3*width, width], `mlp.w12.*`
    [2*hidden, ...]) and split; then every name and shape is checked against `cfg` (ModelError naming the
    key and the config field it contradicts)."""
    state: dict[str, torch.Tensor] = {}
    for key, t in tensors.items():
        parts = key.split(".")
        if len(parts) >= 5 and parts[0] == "blocks" and parts[2] == "attn" and parts[3] == "qkv":
            if parts[4] != "weight":
                raise ModelError(f"{where}: {key}: a bias on the fused qkv projection is not supported")
            if t.dim() != 2 or t.shape[0] % 3:
                raise ModelError(f"{where}: fused {key} has shape {tuple(t.shape)}, expected [3 * width, width]")
            base = ".".join(parts[:3])
            for p, chunk in zip("qkv", t.chunk(3, dim=0)):
                state[f"{base}.{p}_proj.weight"] = chunk
        elif len(parts) >= 5 and parts[0] == "blocks" and parts[2] == "mlp" and parts[3] == "w12":
            if t.shape[0] % 2:
                raise ModelError(f"{where}: fused {key} has shape {tuple(t.shape)}, expected [2 * hidden, ...]")
            base = ".".join(parts[:3])
            for p, chunk in zip(("w1", "w2"), t.chunk(2, dim=0)):
                state[f"{base}.{p}.{parts[4]}"] = chunk
        else:
            state[key] = t
    return state


def check_state(state: Mapping[str, torch.Tensor], cfg: EVA02Config, model: nn.Module, where: str) -> None:
    """Every expected tensor present with its config-implied shape; nothing left over."""
    pw = state.get("patch_embed.proj.weight")
    if pw is not None and tuple(pw.shape[1:]) != (3, cfg.patch_size, cfg.patch_size):
        raise ModelError(
            f"{where}: patch_embed.proj.weight has shape {tuple(pw.shape)}, but vision_config.patch_size is "
            f"{cfg.patch_size} (expected [width, 3, {cfg.patch_size}, {cfg.patch_size}])"
        )
    pe = state.get("pos_embed")
    if pe is not None and pe.dim() == 3 and pe.shape[1] != cfg.seq_len:
        raise ModelError(
            f"{where}: pos_embed has {pe.shape[1]} positions, but vision_config image_size {cfg.image_size} / "
            f"patch_size {cfg.patch_size} implies {cfg.seq_len} (position interpolation is not supported)"
        )
    w1 = state.get("blocks.0.mlp.w1.weight")
    if w1 is not None and w1.shape[0] != cfg.mlp_hidden:
        raise ModelError(
            f"{where}: blocks.0.mlp.w1.weight has {w1.shape[0]} rows, but vision_config width * mlp_ratio gives "
            f"{cfg.mlp_hidden}"
        )
    expected = {k: v.shape for k, v in model.state_dict().items()}
    extra_blocks = sorted({k.split(".")[1] for k in state if k.startswith("blocks.")} -
                          {str(i) for i in range(cfg.layers)}, key=lambda s: int(s) if s.isdigit() else -1)
    if extra_blocks:
        raise ModelError(
            f"{where}: checkpoint has blocks {extra_blocks} beyond vision_config.layers = {cfg.layers}"
        )
    wrong = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs vision_config {tuple(expected[k])}"
        for k in sorted(set(state) & set(expected))
        if tuple(state[k].shape) != tuple(expected[k])
    ]
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    problems = []
    if wrong:
        problems.append("shape mismatches: " + "; ".join(wrong[:6]))
    if missing:
        problems.append(f"missing tensors {missing[:8]}" + (f" (+{len(missing) - 8} more)" if len(missing) > 8 else ""))
    if unexpected:
        hint = ""
        if any(k.startswith("head.") for k in unexpected):
            hint = " (a vision projection head is not supported)"
        elif any(".gamma" in k for k in unexpected):
            hint = " (layer scale is not supported)"
        problems.append(f"unexpected tensors {unexpected[:8]}{hint}")
    if problems:
        raise ModelError(f"{where}: EVA02 weights do not fit vision_config: " + " | ".join(problems))


def build_eva02(
    cfg: EVA02Config,
    tensors: Mapping[str, torch.Tensor],
    device: torch.device,
    dtype: torch.dtype,
    where: str = "vision_model",
) -> EVA02VisionTransformer:
    """Build the tower from checkpoint tensors (prefix stripped; meta tensors allowed when only validating
    with `device=meta`). Returns it in eval mode without grads."""
    with torch.device("meta"):  # module tree without memory; weights are assigned below
        model = EVA02VisionTransformer(cfg)
    state = convert_state(tensors, cfg, where)
    check_state(state, cfg, model, where)
    if device.type == "meta":
        return model
    model.load_state_dict({k: v.to(device=device, dtype=dtype) for k, v in state.items()}, strict=True, assign=True)
    cos, sin = rope_tables(cfg, device) if cfg.rope else (torch.empty(0, device=device),) * 2
    model.rope_cos, model.rope_sin = cos, sin
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


__all__ = [
    "EVA02Config",
    "EVA02VisionTransformer",
    "build_eva02",
    "check_state",
    "convert_state",
    "rope_tables",
    "rotate_half_interleaved",
]
