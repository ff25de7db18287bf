"""A sentence-transformers checkpoint's module list (`modules.json`), run as sentence-transformers runs it.

Supported modules, in the checkpoint's order: `Transformer` (first, at the checkpoint root), `Pooling` (every
mode, concatenations, `include_prompt`), `Dense` (a `torch.` activation class, weights from model.safetensors
or a weights-only `torch.load` of pytorch_model.bin) and `Normalize`. Any other module is a ModelError at load.
The modules pass a feature dict (`token_embeddings`, `sentence_embedding`, `attention_mask`, `prompt_length`)
as sentence-transformers does; they compute in float32 whatever dtype the transformer runs in.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from typing import Any, Sequence, Union

import torch
from torch import nn

from .base import ModelError, Role
from .checkpoint_files import read_json

SUPPORTED = ("Transformer", "Pooling", "Dense", "Normalize")
POOLING_MODES = ("cls", "max", "mean", "mean_sqrt_len_tokens", "weightedmean", "lasttoken")
# legacy boolean keys of 1_Pooling/config.json, in sentence-transformers' concatenation order
LEGACY_POOLING_KEYS = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
    "pooling_mode_weightedmean_tokens": "weightedmean",
    "pooling_mode_lasttoken": "lasttoken",
}
TRANSFORMER_CONFIGS = ("sentence_bert_config.json", "sentence_roberta_config.json", "sentence_distilbert_config.json",
                       "sentence_camembert_config.json", "sentence_albert_config.json",
                       "sentence_xlm-roberta_config.json", "sentence_xlnet_config.json")
FEATURES = ("token_embeddings", "sentence_embedding")
# role -> the prompt names sentence-transformers' encode_query / encode_document look for, in order
ROLE_PROMPT_NAMES: dict[Role, tuple[str, ...]] = {"query": ("query",), "document": ("document", "passage", "corpus")}


# -- configuration ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class PoolingSpec:
    modes: tuple[str, ...]
    include_prompt: bool = True


@dataclass(frozen=True)
class DenseSpec:
    folder: str
    in_features: int
    out_features: int
    bias: bool = True
    activation: str | None = "torch.nn.modules.activation.Tanh"  # None: identity
    use_residual: bool = False
    input_name: str = "sentence_embedding"
    output_name: str = "sentence_embedding"


@dataclass(frozen=True)
class NormalizeSpec:
    input_name: str = "sentence_embedding"
    output_name: str = "sentence_embedding"


ModuleSpec = Union[PoolingSpec, DenseSpec, NormalizeSpec]


@dataclass(frozen=True)
class STPipeline:
    """The modules after the Transformer, the Transformer's own settings and the output width."""

    transformer: dict[str, Any]
    modules: tuple[ModuleSpec, ...]
    dim: int

    @property
    def pooling_name(self) -> str:
        """What `ModelInfo.pooling` records: the pooling modes ("last" for lasttoken), "+dense" with a Dense.
        Exactly "mean" only where the token states' masked mean is the vector's direction (late chunking)."""
        modes = [m for s in self.modules if isinstance(s, PoolingSpec) for m in s.modes]
        name = "+".join("last" if m == "lasttoken" else m for m in modes)
        return name + ("+dense" if any(isinstance(s, DenseSpec) for s in self.modules) else "")

    @property
    def excludes_prompt(self) -> bool:
        return any(isinstance(s, PoolingSpec) and not s.include_prompt for s in self.modules)

    @property
    def max_length(self) -> int | None:
        """The truncation length the Transformer module sets, if any (processor kwargs win, as in ST)."""
        proc = self.transformer.get("processor_kwargs") or self.transformer.get("tokenizer_args") or {}
        value = proc.get("model_max_length") or self.transformer.get("max_seq_length")
        return int(value) if value else None

    @property
    def do_lower_case(self) -> bool:
        return bool(self.transformer.get("do_lower_case"))


def module_kind(path: str, type_ref: str) -> str:
    """The supported class a `modules.json` type names ("Pooling" for any sentence_transformers path to it)."""
    parts = str(type_ref).split(".")
    if parts[0] == "sentence_transformers" and parts[-1] in SUPPORTED:
        return parts[-1]
    raise ModelError(f"{path}: unsupported sentence-transformers module {type_ref} in modules.json "
                     f"(supported: {', '.join(SUPPORTED)})")


def pooling_modes(cfg: dict[str, Any]) -> tuple[str, ...]:
    """`pooling_mode` (a mode or a list), else the legacy boolean keys (none set: mean), as ST reads them."""
    mode = cfg.get("pooling_mode")
    if mode is None:
        modes = tuple(m for key, m in LEGACY_POOLING_KEYS.items() if cfg.get(key)) or ("mean",)
    else:
        modes = (mode,) if isinstance(mode, str) else tuple(mode)
    bad = [m for m in modes if m not in POOLING_MODES]
    if bad or not modes:
        raise ModelError(f"unknown pooling mode {bad or modes}; sentence-transformers has {list(POOLING_MODES)}")
    return modes


def _check_transformer(path: str, cfg: dict[str, Any]) -> None:
    """Refuse Transformer settings that change the output and that this code does not reproduce."""
    task = cfg.get("transformer_task") or "feature-extraction"
    if task != "feature-extraction":
        raise ModelError(f"{path}: sentence-transformers Transformer with transformer_task {task!r} is not supported")
    text = (cfg.get("modality_config") or {"text": {"method": "forward", "method_output_name": "last_hidden_state"}})
    text = text.get("text") or {}
    out_name = text.get("method_output_name")
    if text.get("method") != "forward" or out_name not in ("last_hidden_state", ["last_hidden_state"]):
        raise ModelError(f"{path}: sentence-transformers Transformer modality_config {cfg.get('modality_config')} "
                         "is not supported (text through forward -> last_hidden_state only)")
    if cfg.get("module_output_name", "token_embeddings") != "token_embeddings":
        raise ModelError(f"{path}: sentence-transformers Transformer module_output_name "
                         f"{cfg['module_output_name']!r} is not supported")
    for key in ("query_length", "document_length", "query_expansion", "processing_kwargs"):
        if cfg.get(key):
            raise ModelError(f"{path}: sentence-transformers Transformer option {key}={cfg[key]!r} is not supported")


def _dense_spec(path: str, folder: str, cfg: dict[str, Any]) -> DenseSpec:
    act = cfg.get("activation_function", DenseSpec.activation)
    if act is not None:
        activation(act)  # fail at load on an activation that cannot be built
    spec = DenseSpec(folder=folder, in_features=int(cfg["in_features"]), out_features=int(cfg["out_features"]),
                     bias=bool(cfg.get("bias", True)), activation=act, use_residual=bool(cfg.get("use_residual")),
                     input_name=cfg.get("module_input_name") or "sentence_embedding",
                     output_name=cfg.get("module_output_name") or cfg.get("module_input_name")
                     or "sentence_embedding")
    if not any(os.path.exists(os.path.join(folder, f)) for f in ("model.safetensors", "pytorch_model.bin")):
        raise ModelError(f"{folder}: Dense module without model.safetensors or pytorch_model.bin")
    return spec


def read_pipeline(path: str, hidden_size: int, pooling: str | None = None) -> STPipeline | None:
    """The checkpoint's `modules.json` pipeline (None without modules.json), validated: every module
    supported, feature widths consistent (Dense in_features), a Pooling present. `pooling` (mean, cls, last)
    replaces the Pooling modules' modes (the job's `model.pooling`)."""
    entries = read_json(os.path.join(path, "modules.json"))
    if entries is None:
        return None
    entries = sorted(entries, key=lambda e: int(e.get("idx", 0)))
    kinds = [module_kind(path, e.get("type", "")) for e in entries]
    if not kinds or kinds[0] != "Transformer" or kinds.count("Transformer") != 1:
        raise ModelError(f"{path}: modules.json must start with the one Transformer module (got {kinds})")
    if entries[0].get("path", ""):
        raise ModelError(f"{path}: sentence-transformers Transformer stored in {entries[0]['path']!r} is not "
                         "supported (only at the checkpoint root)")
    tcfg = next((c for c in (read_json(os.path.join(path, f)) for f in TRANSFORMER_CONFIGS) if c), {})
    _check_transformer(path, tcfg)
    dims: dict[str, int] = {"token_embeddings": hidden_size}
    modules: list[ModuleSpec] = []
    for entry, kind in zip(entries[1:], kinds[1:]):
        folder = os.path.join(path, entry.get("path", ""))
        cfg = read_json(os.path.join(folder, "config.json")) or {}
        spec: ModuleSpec
        if kind == "Pooling":
            modes = pooling_modes(cfg) if pooling is None else ({"last": "lasttoken"}.get(pooling, pooling),)
            spec = PoolingSpec(modes, bool(cfg.get("include_prompt", True)))
            dims["sentence_embedding"] = len(modes) * dims["token_embeddings"]
        elif kind == "Dense":
            spec = _dense_spec(path, folder, cfg)
            if spec.input_name not in FEATURES or spec.output_name not in FEATURES:
                raise ModelError(f"{folder}: Dense on {spec.input_name!r} -> {spec.output_name!r} is not supported")
            if dims.get(spec.input_name) != spec.in_features:
                raise ModelError(f"{folder}: Dense in_features {spec.in_features} but {spec.input_name} has "
                                 f"{dims.get(spec.input_name)} dimensions")
            dims[spec.output_name] = spec.out_features
        elif kind == "Normalize":
            spec = NormalizeSpec(cfg.get("module_input_name") or "sentence_embedding",
                                 cfg.get("module_output_name") or cfg.get("module_input_name") or "sentence_embedding")
            if spec.input_name not in FEATURES or spec.output_name not in FEATURES:
                raise ModelError(f"{folder}: Normalize of {spec.input_name!r} is not supported")
            if spec.input_name in dims:
                dims[spec.output_name] = dims[spec.input_name]
        else:  # a second Transformer is refused above
            raise ModelError(f"{path}: unsupported sentence-transformers module {entry.get('type')} in modules.json")
        modules.append(spec)
    if "sentence_embedding" not in dims:
        raise ModelError(f"{path}: modules.json has no Pooling module (no sentence embedding)")
    return STPipeline(tcfg, tuple(modules), dims["sentence_embedding"])


def role_prompts(cfg: dict[str, Any]) -> dict[Role, str]:
    """Each role's prompt from `config_sentence_transformers.json`: the first of the role's prompt names
    (query; document, passage, corpus) listed in `prompts`, even when empty; a role with none listed gets
    the `default_prompt_name` prompt."""
    prompts = {k: v or "" for k, v in (cfg.get("prompts") or {}).items()}
    default = cfg.get("default_prompt_name")
    if default is not None and default not in prompts:
        raise ModelError(f"default_prompt_name {default!r} is not one of the prompts {sorted(prompts)}")
    out: dict[Role, str] = {}
    for role, names in ROLE_PROMPT_NAMES.items():
        name = next((n for n in names if n in prompts), default)
        out[role] = prompts[name] if name is not None else ""
    return out


# -- modules --------------------------------------------------------------------------------------------
def activation(ref: str | None) -> nn.Module:
    """A Dense activation from its stored class path (`torch.` nn.Module classes only; None: identity)."""
    if ref is None:
        return nn.Identity()
    module, _, name = str(ref).rpartition(".")
    if not str(ref).startswith("torch."):
        raise ModelError(f"Dense activation_function {ref!r} is not supported (torch.nn module classes only)")
    try:
        cls = getattr(importlib.import_module(module), name)
        if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
            raise TypeError(f"{ref} is not an nn.Module class")
        return cls()
    except (ImportError, AttributeError, TypeError) as e:
        raise ModelError(f"Dense activation_function {ref!r} cannot be built: {e}") from None


def _dense_state(folder: str) -> dict[str, torch.Tensor]:
    safetensors_file = os.path.join(folder, "model.safetensors")
    if os.path.exists(safetensors_file):
        from safetensors.torch import load_file

        return load_file(safetensors_file)
    return torch.load(os.path.join(folder, "pytorch_model.bin"), map_location="cpu", weights_only=True)


def exclude_prompt(mask: torch.Tensor, prompt_length: torch.Tensor) -> torch.Tensor:
    """Zero each row's first `prompt_length[b]` attended positions (left padding included), on a copy."""
    first = mask.int().argmax(1, keepdim=True)
    pos = torch.arange(mask.shape[1], device=mask.device).unsqueeze(0)
    return mask.masked_fill((pos >= first) & (pos < first + prompt_length.unsqueeze(1)), 0)


def pool(hidden: torch.Tensor, mask: torch.Tensor, modes: Sequence[str],
         prompt_length: torch.Tensor | None = None) -> torch.Tensor:
    """sentence-transformers' Pooling: [B, L, H] states, [B, L] mask -> [B, len(modes) * H], the modes
    concatenated in order. With `prompt_length` ([B], 0: none) those leading tokens are not pooled."""
    original = mask
    if prompt_length is not None and bool(prompt_length.any()):
        mask = exclude_prompt(mask, prompt_length)
    rows = torch.arange(hidden.shape[0], device=hidden.device)
    m = mask.unsqueeze(-1).to(hidden.dtype)
    out = []
    for mode in modes:
        if mode == "cls":  # the first pooled token
            out.append(hidden[rows, mask.int().argmax(1)])
        elif mode == "max":
            out.append(hidden.masked_fill(m == 0, float("-inf")).max(1).values)
        elif mode in ("mean", "mean_sqrt_len_tokens"):
            n = m.sum(1).clamp(min=1e-9)
            out.append((hidden * m).sum(1) / (n if mode == "mean" else n.sqrt()))
        elif mode == "weightedmean":  # weights 1, 2, ... from the first attended token
            pos = torch.arange(1, hidden.shape[1] + 1, device=hidden.device, dtype=hidden.dtype)
            w = m * (pos.view(1, -1, 1) - original.int().argmax(1).view(-1, 1, 1).to(hidden.dtype))
            out.append((hidden * w).sum(1) / w.sum(1).clamp(min=1e-9))
        elif mode == "lasttoken":  # the last pooled token; zeros when none
            seen, back = mask.flip(1).max(1)
            last = hidden.shape[1] - 1 - torch.where(seen == 0, hidden.shape[1] - 1, back)
            out.append((hidden * m)[rows, last])
        else:
            raise ModelError(f"unknown pooling mode {mode!r}")
    return torch.cat(out, dim=-1)


class Pooling(nn.Module):
    def __init__(self, spec: PoolingSpec):
        super().__init__()
        self.modes, self.include_prompt = spec.modes, spec.include_prompt

    def forward(self, features: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        prompt_length = None if self.include_prompt else features.get("prompt_length")
        features["sentence_embedding"] = pool(features["token_embeddings"], features["attention_mask"], self.modes,
                                              prompt_length)
        return features


class Dense(nn.Module):
    """activation(linear(x)) (+ x, or its projection, with `use_residual`)."""

    def __init__(self, spec: DenseSpec):
        super().__init__()
        self.spec = spec
        self.linear = nn.Linear(spec.in_features, spec.out_features, bias=spec.bias)
        self.activation = activation(spec.activation)
        self.residual = (nn.Linear(spec.in_features, spec.out_features, bias=False)
                         if spec.use_residual and spec.in_features != spec.out_features else None)
        state = _dense_state(spec.folder)
        expected = self.state_dict()
        missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
        wrong = [k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
        if missing or unexpected or wrong:
            raise ModelError(f"{spec.folder}: Dense weights do not match its config.json: missing {missing}, "
                             f"unexpected {unexpected}, wrong shape {wrong}")
        self.load_state_dict({k: v.float() for k, v in state.items()})

    def forward(self, features: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        x = features[self.spec.input_name]
        out = self.activation(self.linear(x))
        if self.spec.use_residual:
            out = out + (x if self.residual is None else self.residual(x))
        features[self.spec.output_name] = out
        return features


class Normalize(nn.Module):
    def __init__(self, spec: NormalizeSpec):
        super().__init__()
        self.spec = spec

    def forward(self, features: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        x = features.get(self.spec.input_name)
        if x is not None:
            features[self.spec.output_name] = nn.functional.normalize(x, p=2, dim=-1)
        return features


def build_modules(pipeline: STPipeline) -> nn.ModuleList:
    """The pipeline's modules after the Transformer, weights loaded, float32 on CPU."""
    kinds = {PoolingSpec: Pooling, DenseSpec: Dense, NormalizeSpec: Normalize}
    return nn.ModuleList([kinds[type(s)](s) for s in pipeline.modules]).float().eval()


# -- prompts excluded from pooling --------------------------------------------------------------------
@dataclass(frozen=True)
class PromptPrefix:
    """A prompt as the tokenizer writes it at the start of a row: its first `length` ids (sentence-
    transformers' prompt_length: the prompt tokenized alone, less a trailing special token).
    `loose_last`: the last one is whitespace only, which the text's first token may absorb."""

    ids: tuple[int, ...]
    loose_last: bool

    @property
    def length(self) -> int:
        return len(self.ids)


def prompt_lengths(prefixes: Sequence[PromptPrefix], input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[B] the prompt tokens each row starts with (the longest matching prefix), or all 0 when any row starts
    with none: a batch holds one role, and a role without a prompt may have texts that start like a prompt.
    Callers that know the rows' role pass only that role's prompt (none: all 0), which leaves no ambiguity;
    given every role's prompts, a batch of prompt-less texts that all start like a prompt is misread."""
    out = torch.zeros(input_ids.shape[0], dtype=torch.long, device=input_ids.device)
    first = mask.int().argmax(1, keepdim=True)
    count = mask.sum(1)
    for p in sorted(prefixes, key=lambda p: -p.length):
        n = p.length
        if n == 0:
            continue
        idx = (first + torch.arange(n, device=input_ids.device)).clamp(max=input_ids.shape[1] - 1)
        same = input_ids.gather(1, idx) == torch.tensor(p.ids, device=input_ids.device)
        hit = same[:, : n - 1].all(1) & (same[:, n - 1] | p.loose_last) & (count >= n) & (out == 0)
        out[hit] = n
    return out if bool((out > 0).all()) else torch.zeros_like(out)
