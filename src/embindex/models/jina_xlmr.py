"""Jina-XLM-RoBERTa with rotary positions: the backbone of jina-embeddings-v3 and jina-colbert-v2.

The network is transformers' native `JinaEmbeddingsV3Model` (post-norm blocks, split q/k/v, rotate-half
RoPE). Its built-in conversion mapping only knows plain `.weight` keys, so the ORIGINAL Jina checkpoint
(`roberta.encoder.layers.N.mixer.Wqkv.parametrizations.weight.original`, stacked LoRA tensors
`...parametrizations.weight.0.lora_A/lora_B`) is read here with `safetensors` (never pickle), renamed,
`Wqkv` split in three along dim 0, and loaded with `load_state_dict(strict=True)`. The only checkpoint
keys allowed to stay unused are the HF pooler's (`roberta.pooler.*`) and the extra head keys a family
asks for (e.g. ColBERT's `linear.weight`).

Task LoRA (v3, and jina-clip-v2's text tower): the checkpoint stacks the adapters of all T tasks per module
(Linear: A [T, r, in], B [T, out, r]; Embedding: A [T, vocab, r], B [T, r, dim], the roles swapped with
respect to linears; Wqkv's LoRA is split by output rows into q/k/v). At load they are converted once into
peft's layout, one peft LoRA adapter per task (`lora.attach_task_adapters`, adapter name = the task name
with '.' -> '_', scaling lora_alpha / lora_rank), on ONE copy of the base weights:

* Linear:    peft A = A[t] [r, in], B = B[t] [out, r]      y = x W^T + b + (x A^T) B^T * s
* Embedding: peft A = A[t]^T [r, vocab], B = B[t]^T [dim, r]  e = E[ids] + A^T[ids] B^T * s

which is the reference's merged-weight math without a merged copy per task. A forward takes one task for
the batch (peft's active adapter), no task (base weights), or one task per row (peft's mixed batch with
`adapter_names`, "__base__" for rows without a task).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import torch
from torch import nn

from .base import ModelError
from .checkpoint_files import read_json
from .lora import LoRAWeights, TaskAdapters, attach_task_adapters

WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"
SUPPORTED_ACTS = ("gelu",)  # the reference uses exact (erf) GELU
_PARAM_ORIGINAL = ".parametrizations.weight.original"
_PARAM_LORA = re.compile(r"^(?P<module>.+)\.parametrizations\.weight\.0\.lora_(?P<ab>[AB])$")


# ----------------------------------------------------------------------------------------------
# config


@dataclass(frozen=True)
class XLMRConfig:
    """The architecture values the backbone needs, read from a Jina checkpoint's config.json."""

    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    layer_norm_eps: float
    rotary_base: float
    max_position_embeddings: int
    type_vocab_size: int
    pad_token_id: int
    raw: dict[str, Any]

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


def parse_config(path: str) -> XLMRConfig:
    """Read and validate `<path>/config.json` for a Jina-XLM-RoBERTa + RoPE checkpoint."""
    raw = read_json(os.path.join(path, "config.json"))
    if raw is None:
        raise ModelError(f"{path}: no config.json; not a Jina-XLM-RoBERTa checkpoint directory")
    return config_from_dict(raw, f"{path}/config.json")


def config_from_dict(raw: dict[str, Any], where: str) -> XLMRConfig:
    """Validate the backbone fields of `raw` (a config.json, or a nested dict such as jina-clip-v2's
    `text_config.hf_model_config_kwargs`); `where` names that dict in error messages."""

    def need(key: str) -> Any:
        if raw.get(key) is None:
            raise ModelError(f"{where}: missing {key!r}")
        return raw[key]

    pos = raw.get("position_embedding_type", "rotary")
    if pos != "rotary":
        raise ModelError(
            f"{where}: position_embedding_type {pos!r} is not supported by this family "
            "(it implements the rotary Jina-XLM-RoBERTa only)"
        )
    act = raw.get("hidden_act", "gelu")
    if act not in SUPPORTED_ACTS:
        raise ModelError(f"{where}: hidden_act {act!r} not supported (expected one of {SUPPORTED_ACTS})")
    if float(raw.get("rotary_emb_fraction", 1.0)) != 1.0:
        raise ModelError(f"{where}: partial rotary (rotary_emb_fraction != 1) is not supported")
    if raw.get("rotary_emb_interleaved"):
        raise ModelError(f"{where}: interleaved rotary embeddings are not supported")
    if raw.get("rotary_emb_scale_base") is not None:
        raise ModelError(f"{where}: rotary_emb_scale_base (xPos) is not supported")
    if raw.get("rotary_emb_base") is None:
        raise ModelError(
            f"{where}: missing 'rotary_emb_base'; the RoPE base differs between Jina checkpoints "
            "(e.g. 20000.0 for jina-embeddings-v3), so it is not guessed"
        )
    try:
        cfg = XLMRConfig(
            vocab_size=int(need("vocab_size")),
            hidden_size=int(need("hidden_size")),
            num_hidden_layers=int(need("num_hidden_layers")),
            num_attention_heads=int(need("num_attention_heads")),
            intermediate_size=int(need("intermediate_size")),
            layer_norm_eps=float(raw.get("layer_norm_eps", 1e-5)),
            rotary_base=float(raw["rotary_emb_base"]),
            max_position_embeddings=int(raw.get("max_position_embeddings", 8194)),
            type_vocab_size=int(raw.get("type_vocab_size", 1)),
            pad_token_id=int(raw.get("pad_token_id", 1)),
            raw=raw,
        )
    except (TypeError, ValueError) as e:
        raise ModelError(f"{where}: bad value ({e})") from None
    if cfg.hidden_size % cfg.num_attention_heads:
        raise ModelError(
            f"{where}: hidden_size {cfg.hidden_size} is not a multiple of "
            f"num_attention_heads {cfg.num_attention_heads}"
        )
    if cfg.head_dim % 2:
        raise ModelError(f"{where}: head_dim {cfg.head_dim} must be even for rotary embeddings")
    return cfg


def native_config(cfg: XLMRConfig, attn_implementation: str = "sdpa"):
    """transformers' `JinaEmbeddingsV3Config` built from the checkpoint's own values (the Jina config.json
    has no usable `model_type`, so AutoConfig cannot read it)."""
    try:
        from transformers import JinaEmbeddingsV3Config
    except ImportError as e:  # pragma: no cover - depends on the installed transformers
        raise ModelError(f"this transformers has no JinaEmbeddingsV3Model (need a recent 5.x): {e}") from None
    conf = JinaEmbeddingsV3Config(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        intermediate_size=cfg.intermediate_size,
        hidden_act="gelu",
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        max_position_embeddings=cfg.max_position_embeddings,
        type_vocab_size=cfg.type_vocab_size,
        layer_norm_eps=cfg.layer_norm_eps,
        pad_token_id=cfg.pad_token_id,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rotary_base},
    )
    conf._attn_implementation = attn_implementation
    return conf


# ----------------------------------------------------------------------------------------------
# checkpoint reading and key conversion


def load_safetensors(path: str) -> dict[str, torch.Tensor]:
    """All tensors of `model.safetensors` (or of the shards listed by `model.safetensors.index.json`)."""
    from safetensors.torch import load_file

    single = os.path.join(path, WEIGHTS_FILE)
    if os.path.exists(single):
        return load_file(single)
    index = read_json(os.path.join(path, WEIGHTS_INDEX))
    if index is None:
        raise ModelError(f"{path}: no {WEIGHTS_FILE} or {WEIGHTS_INDEX} (only safetensors checkpoints are read)")
    out: dict[str, torch.Tensor] = {}
    for shard in sorted(set(index.get("weight_map", {}).values())):
        out.update(load_file(os.path.join(path, shard)))
    return out


# original module path (after the "roberta." prefix) -> native module path
_RENAMES: list[tuple[re.Pattern[str], str]] = [
    (re.compile(r"^emb_ln$"), "embeddings.LayerNorm"),
    (re.compile(r"^embeddings\.(word_embeddings|token_type_embeddings)$"), r"embeddings.\1"),
    (re.compile(r"^encoder\.layers\.(\d+)\.mixer\.out_proj$"), r"layers.\1.self_attn.o_proj"),
    (re.compile(r"^encoder\.layers\.(\d+)\.norm1$"), r"layers.\1.post_attention_layernorm"),
    (re.compile(r"^encoder\.layers\.(\d+)\.norm2$"), r"layers.\1.post_mlp_layernorm"),
    (re.compile(r"^encoder\.layers\.(\d+)\.mlp\.(fc1|fc2)$"), r"layers.\1.mlp.\2"),
]
_WQKV = re.compile(r"^encoder\.layers\.(\d+)\.mixer\.Wqkv$")
_UNUSED = re.compile(r"^pooler\.")  # HF pooler (dense + tanh): present in the checkpoints, unused for embeddings


@dataclass
class LoRAPair:
    """Stacked task LoRA of one module as read from the checkpoint (converted to peft by `peft_task_weights`).

    Linear: A [T, r, in], B [T, out, r]. Embedding: A [T, vocab, r], B [T, r, dim]."""

    A: torch.Tensor
    B: torch.Tensor
    kind: str  # "linear" | "embedding"


def _split_key(key: str) -> tuple[str, str]:
    """(module path, tensor role) with role in weight | bias | lora_A | lora_B | <other leaf>."""
    if key.endswith(_PARAM_ORIGINAL):
        return key[: -len(_PARAM_ORIGINAL)], "weight"
    m = _PARAM_LORA.match(key)
    if m:
        return m.group("module"), "lora_" + m.group("ab")
    module, _, leaf = key.rpartition(".")
    return module, leaf


def _rename(module: str) -> str | None:
    for pat, repl in _RENAMES:
        if pat.match(module):
            return pat.sub(repl, module)
    return None


def convert_checkpoint(
    tensors: dict[str, torch.Tensor], cfg: XLMRConfig, path: str, extra_keys: Iterable[str] = ()
) -> tuple[dict[str, torch.Tensor], dict[str, LoRAPair], dict[str, torch.Tensor]]:
    """Original Jina keys -> (native backbone state dict, LoRA per native module, requested extra tensors).

    `extra_keys` are non-backbone keys the caller consumes (e.g. "linear.weight"); any other unknown key
    raises ModelError, as do half-present LoRA pairs."""
    extra_keys = set(extra_keys)
    prefix = "roberta." if any(k.startswith("roberta.") for k in tensors) else ""
    state: dict[str, torch.Tensor] = {}
    lora_parts: dict[str, dict[str, torch.Tensor]] = {}
    extras: dict[str, torch.Tensor] = {}
    unexpected: list[str] = []
    h = cfg.hidden_size
    for key, t in tensors.items():
        if key in extra_keys:
            extras[key] = t
            continue
        if prefix and not key.startswith(prefix):
            unexpected.append(key)
            continue
        module, role = _split_key(key[len(prefix):])
        if _UNUSED.match(module):
            continue
        wqkv = _WQKV.match(module)
        if wqkv:
            i = wqkv.group(1)
            names = [f"layers.{i}.self_attn.{p}_proj" for p in "qkv"]
            if role in ("weight", "bias"):
                if t.shape[0] != 3 * h:
                    raise ModelError(
                        f"{path}: {key} has {t.shape[0]} rows, expected 3*hidden_size = {3 * h} "
                        "(config.json does not match the weights)"
                    )
                for name, part in zip(names, t.split(h, dim=0)):
                    state[f"{name}.{role}"] = part
            elif role in ("lora_A", "lora_B"):
                lora_parts.setdefault(f"layers.{i}.self_attn.qkv", {})[role] = t
            else:
                unexpected.append(key)
            continue
        native = _rename(module)
        if native is None:
            unexpected.append(key)
        elif role in ("weight", "bias"):
            if f"{native}.{role}" in state:
                raise ModelError(f"{path}: {key} duplicates another tensor of {module!r}")
            state[f"{native}.{role}"] = t
        elif role in ("lora_A", "lora_B"):
            lora_parts.setdefault(native, {})[role] = t
        else:
            unexpected.append(key)
    if unexpected:
        raise ModelError(f"{path}: unexpected checkpoint keys (not a Jina-XLM-RoBERTa checkpoint?): {unexpected[:8]}")
    missing_extra = sorted(extra_keys - set(extras))
    if missing_extra:
        raise ModelError(f"{path}: checkpoint lacks {missing_extra}")

    lora: dict[str, LoRAPair] = {}
    for native, parts in lora_parts.items():
        if set(parts) != {"lora_A", "lora_B"}:
            raise ModelError(f"{path}: LoRA of {native!r} has only {sorted(parts)}; the adapter tensors are incomplete")
        kind = "embedding" if native.startswith("embeddings.") else "linear"
        A, B = parts["lora_A"], parts["lora_B"]
        if native.endswith(".qkv"):  # one Wqkv LoRA -> q/k/v: same A, B split by output rows
            base = native[: -len(".qkv")]
            if B.dim() != 3 or B.shape[1] != 3 * h:
                raise ModelError(
                    f"{path}: Wqkv lora_B of layer {base} has shape {tuple(B.shape)}, expected [T, {3 * h}, r]"
                )
            for p, Bp in zip("qkv", B.split(h, dim=1)):
                lora[f"{base}.{p}_proj"] = LoRAPair(A, Bp, kind)
        else:
            lora[native] = LoRAPair(A, B, kind)
    return state, lora, extras


def check_shapes(state: dict[str, torch.Tensor], expected: dict[str, torch.Size], path: str) -> None:
    """Fail with one clear message listing missing keys, unexpected keys and config/shape mismatches."""
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs config {tuple(expected[k])}"
        for k in sorted(set(state) & set(expected))
        if tuple(state[k].shape) != tuple(expected[k])
    ]
    problems = []
    if wrong:
        problems.append("shape mismatches (config.json does not describe these weights): " + "; ".join(wrong[:6]))
    if missing:
        more = f" (+{len(missing) - 8} more)" if len(missing) > 8 else ""
        problems.append(f"missing tensors: {missing[:8]}{more}")
    if unexpected:
        problems.append(f"unexpected tensors: {unexpected[:8]}")
    if problems:
        raise ModelError(f"{path}: checkpoint does not fit its config: " + " | ".join(problems))


def check_lora(
    lora: dict[str, LoRAPair], expected: dict[str, torch.Size], n_tasks: int, rank: int, path: str
) -> None:
    """Validate stacked LoRA shapes against the base weights, the task count and the configured rank."""
    for name, pair in lora.items():
        w = expected.get(f"{name}.weight")
        if w is None:
            raise ModelError(f"{path}: LoRA tensors for unknown module {name!r}")
        if pair.kind == "linear":
            out_f, in_f = w
            want_a, want_b = (n_tasks, rank, in_f), (n_tasks, out_f, rank)
        else:
            num, dim = w
            want_a, want_b = (n_tasks, num, rank), (n_tasks, rank, dim)
        if tuple(pair.A.shape) != want_a or tuple(pair.B.shape) != want_b:
            raise ModelError(
                f"{path}: LoRA of {name!r} has A {tuple(pair.A.shape)}, B {tuple(pair.B.shape)}; expected "
                f"A {want_a}, B {want_b} from config (lora_adaptations: {n_tasks} tasks, lora_rank {rank})"
            )


def peft_task_weights(lora: dict[str, LoRAPair], tasks: Sequence[str]) -> dict[str, LoRAWeights]:
    """Stacked checkpoint LoRA -> {task: {module: (A, B)}} in peft's layout (views, no copies): Linear
    A [r, in], B [out, r]; Embedding A [r, vocab], B [dim, r] (the checkpoint's per-task A/B transposed)."""
    out: dict[str, LoRAWeights] = {}
    for t, task in enumerate(tasks):
        out[task] = {
            name: (p.A[t], p.B[t]) if p.kind == "linear" else (p.A[t].T, p.B[t].T) for name, p in lora.items()
        }
    return out


# ----------------------------------------------------------------------------------------------
# the backbone


class JinaXLMRBackbone(nn.Module):
    """Native `JinaEmbeddingsV3Model` (no pooler), with its task LoRA as peft adapters when the checkpoint has
    them; returns last_hidden_state."""

    def __init__(self, model: nn.Module, adapters: TaskAdapters | None = None):
        super().__init__()
        self.model = model  # with adapters: its LoRA'd modules are peft LoRA layers (adapters.peft wraps it)
        self.adapters = adapters

    @property
    def has_lora(self) -> bool:
        return self.adapters is not None

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        task: str | Sequence[str | None] | None = None,
    ) -> torch.Tensor:
        """[B, L] ids/mask -> [B, L, H] hidden states in the model dtype. `task`: None (base weights), a
        task name for all rows, or a sequence of B task names (None = base weights for that row)."""
        if self.adapters is None:
            if task is not None:
                raise ModelError("this checkpoint has no task LoRA")
            out = self.model(input_ids=input_ids, attention_mask=attention_mask)
        else:
            out = self.adapters(task, input_ids=input_ids, attention_mask=attention_mask)
        return out.last_hidden_state


def _materialize_buffers(model: nn.Module, conf, device: torch.device) -> None:
    """Non-persistent buffers of a model built on the meta device, recomputed on `device`."""
    emb = model.embeddings
    n = conf.max_position_embeddings
    emb.position_ids = torch.arange(n, device=device).expand((1, -1))
    emb.token_type_ids = torch.zeros((1, n), dtype=torch.long, device=device)
    rot = model.rotary_emb
    inv_freq, scaling = rot.compute_default_rope_parameters(conf)
    rot.inv_freq = inv_freq.to(device)
    rot.original_inv_freq = inv_freq.clone().to(device)
    rot.attention_scaling = scaling


@dataclass
class PreparedCheckpoint:
    """A converted and validated checkpoint (tensors may be meta tensors when only validating)."""

    model: nn.Module  # the native model on the meta device
    conf: Any  # its JinaEmbeddingsV3Config
    state: dict[str, torch.Tensor]
    lora: dict[str, LoRAPair]
    extras: dict[str, torch.Tensor]
    lora_tasks: list[str]
    lora_rank: int | None
    lora_alpha: float | None


def header_tensors(path: str) -> dict[str, torch.Tensor]:
    """Meta tensors with the names and shapes of the checkpoint's safetensors headers (no data read)."""
    from safetensors import safe_open

    files = [os.path.join(path, WEIGHTS_FILE)]
    if not os.path.exists(files[0]):
        index = read_json(os.path.join(path, WEIGHTS_INDEX))
        if index is None:
            raise ModelError(f"{path}: no {WEIGHTS_FILE} or {WEIGHTS_INDEX} (only safetensors checkpoints are read)")
        files = [os.path.join(path, s) for s in sorted(set(index.get("weight_map", {}).values()))]
    out: dict[str, torch.Tensor] = {}
    try:
        for file in files:
            with safe_open(file, "pt") as f:
                for k in f.keys():
                    out[k] = torch.empty(f.get_slice(k).get_shape(), device="meta")
    except Exception as e:  # safetensors raises its own error types for damaged files
        raise ModelError(f"{path}: cannot read safetensors header ({e})") from None
    return out


def prepare_checkpoint(
    path: str,
    cfg: XLMRConfig,
    tensors: dict[str, torch.Tensor],
    *,
    lora_tasks: Sequence[str] = (),
    lora_rank: int | None = None,
    lora_alpha: float | None = None,
    extra_keys: Iterable[str] = (),
    require_lora: bool = False,
    attn_implementation: str = "sdpa",
) -> PreparedCheckpoint:
    """Convert `tensors` (original Jina keys) and validate them against the config-built native model.

    With `require_lora`, every Linear/Embedding of the backbone must have task LoRA tensors for
    `lora_tasks` with rank `lora_rank`; without it, any LoRA tensor in the checkpoint is an error."""
    from transformers import JinaEmbeddingsV3Model

    conf = native_config(cfg, attn_implementation)
    with torch.device("meta"):
        model = JinaEmbeddingsV3Model(conf, add_pooling_layer=False)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    state, lora, extras = convert_checkpoint(tensors, cfg, path, extra_keys)
    check_shapes(state, expected, path)
    if require_lora:
        if lora_rank is None or lora_alpha is None:
            raise ModelError(f"{path}/config.json: lora_rank and lora_alpha are required for task LoRA")
        targets = sorted(n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Embedding)))
        missing = [n for n in targets if n not in lora]
        if missing:
            raise ModelError(
                f"{path}: task LoRA tensors missing for {missing[:6]}"
                + (f" (+{len(missing) - 6} more)" if len(missing) > 6 else "")
                + "; the checkpoint's adapters are incomplete (expected "
                "`<module>.parametrizations.weight.0.lora_A/lora_B` for every Linear and Embedding)"
            )
        check_lora(lora, expected, len(lora_tasks), int(lora_rank), path)
        return PreparedCheckpoint(model, conf, state, lora, extras, list(lora_tasks), int(lora_rank),
                                  float(lora_alpha))
    if lora:
        raise ModelError(f"{path}: checkpoint has LoRA tensors ({sorted(lora)[:3]}...) this family does not use")
    return PreparedCheckpoint(model, conf, state, lora, extras, [], None, None)


def build_backbone(
    path: str,
    cfg: XLMRConfig,
    device: torch.device,
    dtype: torch.dtype,
    tensors: dict[str, torch.Tensor] | None = None,
    **kwargs: Any,
) -> tuple[JinaXLMRBackbone, dict[str, torch.Tensor]]:
    """Load the original Jina checkpoint at `path` into the native model on `device` in `dtype`.

    `tensors`: the checkpoint's tensors already read (original Jina key names, e.g. with an outer
    prefix stripped by the caller); None reads `path`'s safetensors. `kwargs` go to
    `prepare_checkpoint`. Returns the backbone (eval mode, no grads) and the requested `extra_keys`
    tensors on `device` in their checkpoint dtype (the caller picks their precision)."""
    if tensors is None:
        tensors = load_safetensors(path)
    prep = prepare_checkpoint(path, cfg, tensors, **kwargs)
    model = prep.model
    state = {k: v.to(device=device, dtype=dtype) for k, v in prep.state.items()}
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as e:  # pragma: no cover - check_shapes catches these first
        raise ModelError(f"{path}: {e}") from None
    _materialize_buffers(model, prep.conf, device)
    adapters = None
    if prep.lora:  # peft copies the tensors into adapters on each layer's device, in the model dtype
        adapters = attach_task_adapters(
            model, peft_task_weights(prep.lora, prep.lora_tasks), r=int(prep.lora_rank),
            lora_alpha=float(prep.lora_alpha), where=path, autocast_adapter_dtype=False,
        )
    extras = {k: v.to(device=device) for k, v in prep.extras.items()}
    backbone = JinaXLMRBackbone(model, adapters)
    backbone.eval()
    for p in backbone.parameters():
        p.requires_grad_(False)
    return backbone, extras


def load_tokenizer_json(path: str):
    """`tokenizers.Tokenizer` from `<path>/tokenizer.json` with the file's own normalizer (transformers'
    AutoTokenizer may rebuild the pipeline without it); padding/truncation from the file are cleared."""
    from tokenizers import Tokenizer

    file = os.path.join(path, "tokenizer.json")
    if not os.path.exists(file):
        raise ModelError(f"{path}: no tokenizer.json")
    tok = Tokenizer.from_file(file)
    tok.no_padding()
    tok.no_truncation()
    return tok


def tokenizer_max_length(path: str, default: int) -> int:
    """`model_max_length` from tokenizer_config.json when it is a real number, else `default`."""
    tc = read_json(os.path.join(path, "tokenizer_config.json")) or {}
    v = tc.get("model_max_length")
    if isinstance(v, (int, float)) and 0 < v < 1_000_000:
        return int(v)
    return default
