"""`model.name: jina-embeddings-v4`: Qwen2.5-VL backbone + one LoRA per task + a multi-vector projector.

Facts (MODELS.md §2; the tiny fixture's README; all [UNVERIFIED] values are read from the checkpoint):

* Backbone: transformers' native `Qwen2_5_VLModel` (no lm_head: embeddings are tied and unused) built from the
  checkpoint's config.json, SDPA attention. Weights are read with safetensors (never pickle) in either key
  layout: legacy (`model.layers...`, `model.embed_tokens`, `model.norm`, `visual...`) or transformers >= 4.52
  (`model.language_model...`, `model.visual...`); `lm_head.weight` is ignored. `multi_vector_projector.{weight,
  bias}` is a separate `nn.Linear(hidden, multi_vector_projector_dim)`.
* Adapters (`adapters/adapter_config.json` + `adapter_model.safetensors`): Jina's `MultiAdapterLinear` holds
  one LoRA A/B per task inside one peft adapter (`...<module>.lora_A.<task>.weight`). Here they become one
  ordinary named peft LoRA adapter per task (same r / lora_alpha / use_rslora; target modules = the module
  paths present in the file, projector included) on ONE copy of the base weights (`lora.attach_task_adapters`);
  the adapter is chosen per call (peft's active adapter), or per row when `task` is a list (peft
  `adapter_names=`). Adapter keys may read `base_model.model.model.language_model.layers...` (peft with
  transformers >= 4.52) or the older `base_model.model.model.layers...`.
* Text: `f"{prefix}: {text}"`, prefix "Query" for role query and for both roles of text-matching, "Passage"
  for retrieval / code documents; no special tokens; right padding with `<|endoftext|>`. Single vector =
  attention-masked mean of the last hidden state (after the final norm, prefix included), fp32, not normalised.
  Multi-vector = L2-normalised `projector(h)` of every non-pad token (task LoRA on the projector too).
* Images: the chat template `<|im_start|>user\\n<|vision_start|><|image_pad|><|vision_end|>Describe the
  image.<|im_end|>\\n` with `<|image_pad|>` expanded to grid_h*grid_w/merge² tokens; 3-D M-RoPE positions
  from the native `get_rope_index` (image tokens marked by `mm_token_type_ids`). Single vector = mean over
  `<|vision_start|>` .. `<|vision_end|>` inclusive; multi-vector = every non-pad token of the template.
* Matryoshka: `matryoshka_dims` from config (truncate, then normalise — done by the pipeline).
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from .base import ModelError, ModelFamily, ModelInfo, ModelSpec, Role, TextEncoder
from .checkpoint_files import check_no_meta_tensors, load_checked_state, load_tokenizer_file, read_config, read_json
from .device import pick_device, resolve_dtype
from .pooling import mean_pool
from .tokenization import PrefixTokenizer
from .lora import attach_task_adapters
from .qwen2_vl_images import QwenVLImageConfig, QwenVLImageProcessor, flatten_patches, load_vl_config

DEFAULT_MAX_LENGTH = 8192  # the reference allows 32768; long inputs cost quadratic attention memory
DEFAULT_TASK = "retrieval"
SYMMETRIC_TASKS = ("text-matching",)  # "Query" prefix for both roles
IMAGE_TEMPLATE = "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Describe the image.<|im_end|>\n"
ADAPTER_DIR = "adapters"
_ADAPTER_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<ab>[AB])\.(?P<task>[^.]+)\.weight$")


def task_prefix(task: str, role: str) -> str:
    """The prefix (with its ": ") of a text of `role` ("query", or "document"/"passage") under `task`."""
    if role not in ("query", "document", "passage"):
        raise ModelError(f"unknown role {role!r}; expected 'query' or 'document'")
    return "Query: " if role == "query" or task in SYMMETRIC_TASKS else "Passage: "


def _check_task(task: str | None, default: str, tasks: Sequence[str]) -> str:
    t = default if task is None else task
    if t not in tasks:
        raise ModelError(f"jina-embeddings-v4 has no task {t!r}; choose one of {list(tasks)}")
    return t


def base_key(key: str) -> str | None:
    """Checkpoint key (legacy or >= 4.52 layout) -> key of `_V4Module`; None for ignored tensors."""
    if key.startswith("lm_head."):
        return None
    if key.startswith(("multi_vector_projector.", "model.language_model.", "model.visual.")):
        return key
    if key.startswith("visual."):
        return "model." + key
    if key.startswith("model."):
        return "model.language_model." + key[len("model."):]
    return key  # reported as unexpected


def adapter_module(module: str) -> str:
    """Adapter module path (either layout) -> module path in `_V4Module`."""
    if module.startswith("model.") and not module.startswith(("model.language_model.", "model.visual.")):
        return "model.language_model." + module[len("model."):]
    if module.startswith("visual."):
        return "model." + module
    return module


class _V4Module(nn.Module):
    """What peft wraps: the Qwen2.5-VL model and the multi-vector projector."""

    def __init__(self, config: Any, token_dim: int):
        super().__init__()
        from transformers import Qwen2_5_VLModel

        self.model = Qwen2_5_VLModel(config)
        self.multi_vector_projector = nn.Linear(config.text_config.hidden_size, token_dim)

    def forward(self, input_ids, attention_mask, position_ids, pixel_values=None, image_grid_thw=None,
                project: bool = False):
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         pixel_values=pixel_values, image_grid_thw=image_grid_thw, use_cache=False)
        h = out.last_hidden_state
        return h, (self.multi_vector_projector(h) if project else None)


def _qwen_config(path: str) -> Any:
    from transformers import Qwen2_5_VLConfig

    return load_vl_config(Qwen2_5_VLConfig, path)


def _meta_module(config: Any, token_dim: int) -> _V4Module:
    with torch.device("meta"):
        return _V4Module(config, token_dim)


def _read_adapters(path: str, module: nn.Module, tasks: Sequence[str], load: bool
                   ) -> tuple[dict[str, Any], dict[str, dict[str, torch.Tensor]], list[str]]:
    """Validate `<path>/adapters` against `module`: (adapter_config, {task: {"<module>.lora_A": tensor}} (empty
    tensors dict when not `load`), sorted target module paths)."""
    from safetensors import safe_open

    adir = os.path.join(path, ADAPTER_DIR)
    cfg = read_json(os.path.join(adir, "adapter_config.json"))
    file = os.path.join(adir, "adapter_model.safetensors")
    if cfg is None or not os.path.exists(file):
        raise ModelError(f"{adir}: needs adapter_config.json and adapter_model.safetensors (the task LoRAs)")
    if str(cfg.get("peft_type", "LORA")).upper() != "LORA" or cfg.get("use_dora"):
        raise ModelError(f"{adir}/adapter_config.json: only plain LoRA adapters are supported")
    for key in ("r", "lora_alpha"):
        if not isinstance(cfg.get(key), (int, float)) or cfg[key] <= 0:
            raise ModelError(f"{adir}/adapter_config.json: missing or invalid {key!r}")
    if cfg.get("rank_pattern") or cfg.get("alpha_pattern"):
        raise ModelError(f"{adir}/adapter_config.json: rank_pattern/alpha_pattern are not supported")
    r = int(cfg["r"])
    modules = dict(module.named_modules())
    found: dict[str, dict[str, torch.Tensor | None]] = {t: {} for t in tasks}
    with safe_open(file, framework="pt", device="cpu") as f:
        for key in f.keys():  # noqa: SIM118 (safe_open is not iterable)
            m = _ADAPTER_KEY.match(key)
            if m is None:
                raise ModelError(f"{file}: unexpected tensor {key} (expected ...lora_A/B.<task>.weight)")
            task, mod = m["task"], adapter_module(m["module"])
            if task not in found:
                raise ModelError(f"{file}: tensor {key} is for task {task!r}, not in config task_names {list(tasks)}")
            target = modules.get(mod)
            if not isinstance(target, nn.Linear):
                raise ModelError(f"{file}: tensor {key} targets {mod!r}, which is not a linear layer of the model")
            want = (r, target.in_features) if m["ab"] == "A" else (target.out_features, r)
            shape = tuple(f.get_slice(key).get_shape())
            if shape != want:
                raise ModelError(f"{file}: tensor {key} has shape {shape}, expected {want} (r={r})")
            found[task][f"{mod}.lora_{m['ab']}"] = f.get_tensor(key) if load else None
    targets = sorted({k.rsplit(".lora_", 1)[0] for k in found[tasks[0]]})
    for task in tasks:
        names = set(found[task])
        if not names:
            raise ModelError(f"{file}: no LoRA tensors for task {task!r} (config task_names {list(tasks)})")
        want = {f"{t}.lora_{ab}" for t in targets for ab in "AB"}
        if names != want:
            diff = sorted(names ^ want)
            raise ModelError(f"{file}: task {task!r} LoRA tensors differ from task {tasks[0]!r}'s: {diff[:5]}")
    return cfg, found, targets  # type: ignore[return-value]


def load_base_state(path: str, expected: dict[str, torch.Tensor], dtype: torch.dtype | None = None,
                    device: torch.device | None = None) -> dict[str, torch.Tensor]:
    """The base weights in `_V4Module` names (either key layout), checked against `expected` (built from
    config.json); with `dtype=None` only the headers are checked."""
    return load_checked_state(path, expected, base_key, dtype, device, "jina-embeddings-v4")


class JinaV4Tokenizer(PrefixTokenizer):
    """`f"{prefix}: {text}"` -> ids with the checkpoint's tokenizer.json (no special tokens added)."""

    add_special_tokens = False

    def __init__(self, path: str, max_length: int, tasks: Sequence[str], default_task: str):
        self.tok = load_tokenizer_file(path, max_length)
        self.max_length = max_length
        self.tasks = list(tasks)
        self.default_task = default_task
        tok_cfg = read_json(os.path.join(path, "tokenizer_config.json")) or {}
        self.padding_side = str(tok_cfg.get("padding_side") or "right").lower()
        if self.padding_side not in ("left", "right"):
            raise ModelError(f"unsupported padding_side {self.padding_side!r} in tokenizer_config.json")
        pad = tok_cfg.get("pad_token") or "<|endoftext|>"
        pad = pad.get("content") if isinstance(pad, dict) else pad
        pad_id = self.tok.token_to_id(pad)
        if pad_id is None:
            raise ModelError(f"{path}: pad token {pad!r} is not in tokenizer.json")
        self.pad_token_id = int(pad_id)

    def prefix(self, role: Role, task: str | None = None) -> str:
        return task_prefix(_check_task(task, self.default_task, self.tasks), role)

    def image_template_ids(self) -> list[int]:
        """Ids of the image chat template (one `<|image_pad|>`, expanded by the encoder); never truncated."""
        self.tok.no_truncation()
        try:
            return list(self.tok.encode(IMAGE_TEMPLATE, add_special_tokens=False).ids)
        finally:
            self.tok.enable_truncation(self.max_length)


class JinaV4Encoder(TextEncoder):
    """Qwen2.5-VL + per-task peft LoRA (backbone and projector); text and image inputs."""

    def __init__(self, family: JinaEmbeddingsV4Family, device: torch.device, dtype: torch.dtype):
        from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import (
            Qwen2_5_VLRotaryEmbedding,
            Qwen2_5_VLVisionRotaryEmbedding,
        )

        path, config = family.spec.path, family.qwen_config
        self.device, self.dtype = device, dtype
        self.tasks, self.default_task = list(family.tasks), family.task
        self.image_config = family.image_config
        self.template_ids, self.pad_token_id = family.template_ids, family.pad_token_id
        self.vision_start, self.vision_end = family.vision_start_id, family.vision_end_id
        self.image_token_id, self.merge = family.image_token_id, family.image_config.merge_size

        module = _meta_module(config, family.token_dim)
        state = load_base_state(path, module.state_dict(), dtype, device)
        module.load_state_dict(state, strict=True, assign=True)
        # non-persistent rotary buffers, rebuilt off the meta device
        module.model.language_model.rotary_emb = Qwen2_5_VLRotaryEmbedding(config.text_config).to(device)
        module.model.visual.rotary_pos_emb = Qwen2_5_VLVisionRotaryEmbedding(config.vision_config).to(device)
        check_no_meta_tensors(module, path)

        acfg, loras, targets = _read_adapters(path, module, self.tasks, load=True)
        self.lora_r, self.lora_alpha = int(acfg["r"]), float(acfg["lora_alpha"])
        weights = {task: {t: (loras[task][f"{t}.lora_A"], loras[task][f"{t}.lora_B"]) for t in targets}
                   for task in self.tasks}
        self.adapters = attach_task_adapters(module, weights, r=self.lora_r, lora_alpha=acfg["lora_alpha"],
                                             use_rslora=bool(acfg.get("use_rslora", False)),
                                             where=f"{path}/{ADAPTER_DIR}")
        self.peft = self.adapters.peft
        self.peft.to(device)
        self.module = module

    # ---- internals -------------------------------------------------------------------------------------
    def _run(self, task: str | Sequence[str] | None, input_ids: torch.Tensor, mask: torch.Tensor,
             position_ids: torch.Tensor, project: bool, **vision: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
        if task is None or isinstance(task, str):
            tasks: str | list[str] = _check_task(task, self.default_task, self.tasks)
        else:
            tasks = [_check_task(n, self.default_task, self.tasks) for n in task]
            if len(tasks) != input_ids.shape[0]:
                raise ModelError(f"got {len(tasks)} per-row tasks for a batch of {input_ids.shape[0]} rows")
        return self.adapters(tasks, input_ids=input_ids, attention_mask=mask, position_ids=position_ids,
                             project=project, **vision)

    def _text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, task: Any, project: bool):
        ids = input_ids.to(self.device, torch.long)
        mask = attention_mask.to(self.device, torch.long)
        position_ids = (mask.cumsum(1) - 1).clamp(min=0)  # left padding gives the same positions as right
        h, proj = self._run(task, ids, mask, position_ids, project)
        return h, proj, mask

    @staticmethod
    def _unit(proj: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return nn.functional.normalize(proj.float(), p=2, dim=-1) * mask.unsqueeze(-1).float()

    # ---- TextEncoder -----------------------------------------------------------------------------------
    @torch.inference_mode()
    def forward_pooled(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                       task: str | Sequence[str] | None = None, role: Role | None = None) -> torch.Tensor:
        h, _, mask = self._text(input_ids, attention_mask, task, project=False)
        return mean_pool(h, mask)

    @torch.inference_mode()
    def forward_token_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                             task: str | Sequence[str] | None = None) -> torch.Tensor:
        return self._text(input_ids, attention_mask, task, project=False)[0]

    @torch.inference_mode()
    def forward_tokens(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                       task: str | Sequence[str] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        _, proj, mask = self._text(input_ids, attention_mask, task, project=True)
        return self._unit(proj, mask), mask.bool()

    @torch.inference_mode()
    def forward_multi(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                      task: str | Sequence[str] | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        h, proj, mask = self._text(input_ids, attention_mask, task, project=True)
        return mean_pool(h, mask), self._unit(proj, mask), mask.bool()

    def image_batch(self, pixels: Sequence[np.ndarray]) -> dict[str, torch.Tensor]:
        """Prepared uint8 images -> the model inputs of one batch: input_ids, attention_mask (right padded),
        mm_token_type_ids, pixel_values, image_grid_thw."""
        if not len(pixels):
            raise ModelError("forward_images got no images")
        patches, grids, rows = [], [], []
        pad_at = self.template_ids.index(self.image_token_id)
        for px in pixels:
            flat, grid = flatten_patches(px, self.image_config, self.device)
            patches.append(flat)
            grids.append(grid)
            n = grid[0] * grid[1] * grid[2] // (self.merge * self.merge)
            rows.append(self.template_ids[:pad_at] + [self.image_token_id] * n + self.template_ids[pad_at + 1:])
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r)
            mask[i, : len(r)] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        return {
            "input_ids": ids,
            "attention_mask": mask,
            "mm_token_type_ids": ((ids == self.image_token_id) & mask.bool()).long(),
            "pixel_values": torch.cat(patches).to(self.dtype),
            "image_grid_thw": torch.tensor(grids, dtype=torch.long, device=self.device),
        }

    @torch.inference_mode()
    def forward_images(self, pixels: Sequence[np.ndarray], task: str | Sequence[str] | None = None,
                       tokens: bool = False) -> tuple[torch.Tensor, list[torch.Tensor] | None]:
        b = self.image_batch(pixels)
        ids, mask = b["input_ids"], b["attention_mask"]
        position_ids, _ = self.module.model.get_rope_index(
            ids, mm_token_type_ids=b["mm_token_type_ids"], image_grid_thw=b["image_grid_thw"], attention_mask=mask
        )
        h, proj = self._run(task, ids, mask, position_ids, tokens,
                            pixel_values=b["pixel_values"], image_grid_thw=b["image_grid_thw"])
        # mean over <|vision_start|> .. <|vision_end|> inclusive, per row
        pos = torch.arange(ids.shape[1], device=ids.device)
        start = torch.where(ids == self.vision_start, pos, ids.shape[1]).min(1).values
        end = torch.where(ids == self.vision_end, pos, -1).max(1).values
        span = ((pos >= start[:, None]) & (pos <= end[:, None]) & mask.bool()).long()
        single = mean_pool(h, span)
        if not tokens:
            return single, None
        unit = self._unit(proj, mask)
        return single, [unit[i][mask[i].bool()] for i in range(ids.shape[0])]


class JinaEmbeddingsV4Family(ModelFamily):
    """`model.name: jina-embeddings-v4` (text and images; single- and multi-vector)."""

    name = "jina-embeddings-v4"
    fp16_safe = False  # Qwen decoder: float16 activations overflow

    def __init__(self, spec: ModelSpec):
        super().__init__(spec)
        path = spec.path
        raw = read_config(path)
        if raw.get("model_type") != "qwen2_5_vl":
            raise ModelError(f"{path}: model_type {raw.get('model_type')!r}; jina-embeddings-v4 expects 'qwen2_5_vl'")
        text = raw.get("text_config") or raw
        tasks = raw.get("task_names") or text.get("task_names")
        if not tasks or not isinstance(tasks, list):
            raise ModelError(f"{path}/config.json: no 'task_names'; not a jina-embeddings-v4 checkpoint")
        self.tasks: list[str] = [str(t) for t in tasks]
        if raw.get("multi_vector_projector_dim") is None:
            raise ModelError(f"{path}/config.json: missing 'multi_vector_projector_dim'")
        self.token_dim = int(raw["multi_vector_projector_dim"])
        if raw.get("single_vector_pool_strategy", "mean") != "mean":
            raise ModelError(f"{path}/config.json: single_vector_pool_strategy "
                             f"{raw['single_vector_pool_strategy']!r} is not supported (mean only)")
        if spec.pooling not in ("auto", "mean"):
            raise ModelError(f"jina-embeddings-v4 uses mean pooling (got pooling {spec.pooling!r})")
        if spec.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ModelError(f"unknown dtype {spec.dtype!r}")
        self.task = _check_task(spec.task, DEFAULT_TASK if DEFAULT_TASK in self.tasks else self.tasks[0], self.tasks)
        self.qwen_config = _qwen_config(path)
        tc, vc = self.qwen_config.text_config, self.qwen_config.vision_config
        self.dim = int(tc.hidden_size)
        if int(vc.out_hidden_size) != self.dim:
            raise ModelError(f"{path}/config.json: vision_config.out_hidden_size {vc.out_hidden_size} != "
                             f"text hidden_size {self.dim}")
        ids = {k: raw.get(k, text.get(k)) for k in ("vision_start_token_id", "vision_end_token_id", "image_token_id")}
        for k, v in ids.items():
            if v is None:
                raise ModelError(f"{path}/config.json: missing {k!r}")
        self.vision_start_id, self.vision_end_id = int(ids["vision_start_token_id"]), int(ids["vision_end_token_id"])
        self.image_token_id = int(ids["image_token_id"])
        mrl = raw.get("matryoshka_dims") or text.get("matryoshka_dims")
        self.matryoshka = sorted(int(d) for d in mrl) if mrl else None
        if self.matryoshka and (self.matryoshka[0] <= 0 or self.matryoshka[-1] > self.dim):
            raise ModelError(f"{path}/config.json: matryoshka_dims {mrl} must lie within 1..{self.dim}")
        arch_max = int(tc.max_position_embeddings)
        self.max_length = int(spec.max_length or min(DEFAULT_MAX_LENGTH, arch_max))
        if self.max_length > arch_max:
            raise ModelError(f"model.max_length {self.max_length} exceeds the model's {arch_max} positions")
        self.image_config = QwenVLImageConfig.from_dir(path, raw.get("vision_config"))
        tok = self.load_tokenizer()
        self.pad_token_id = tok.pad_token_id
        self.template_ids = tok.image_template_ids()
        for name, tid in (("vision_start_token_id", self.vision_start_id), ("vision_end_token_id", self.vision_end_id),
                          ("image_token_id", self.image_token_id)):
            if self.template_ids.count(tid) != 1:
                raise ModelError(f"{path}: config {name} {tid} does not match the tokenizer's image template tokens "
                                 f"{self.template_ids}")
        # fail now (not in the actor) on shape/key mismatches: headers only
        meta = _meta_module(self.qwen_config, self.token_dim)
        load_base_state(path, meta.state_dict())
        acfg, _, _ = _read_adapters(path, meta, self.tasks, load=False)
        self.lora_r, self.lora_alpha = int(acfg["r"]), float(acfg["lora_alpha"])

    def check_task(self, task: str | None) -> None:
        _check_task(task, self.task, self.tasks)

    def query_task_for(self, task: str | None) -> str | None:
        """v4 uses one adapter per task for both roles: queries use the index's own task."""
        return task if task is not None else self.task

    def info(self) -> ModelInfo:
        return ModelInfo(
            family=self.name,
            dim=self.dim,
            max_length=self.max_length,
            pooling="mean",
            tasks=list(self.tasks),
            matryoshka_dims=list(self.matryoshka) if self.matryoshka else None,
            prefixes={"query": task_prefix(self.task, "query"), "document": task_prefix(self.task, "document")},
            modalities=["text", "image"],
            token_dim=self.token_dim,
            extra={
                "model_type": "qwen2_5_vl",
                "task": self.task,
                "multi_vector": False,  # single vectors by default; multi-vector on request
                "multi_vector_capable": True,
                "query_task": {t: t for t in self.tasks},
                "query_prefixes": {t: task_prefix(t, "query") for t in self.tasks},
                "document_prefixes": {t: task_prefix(t, "document") for t in self.tasks},
                "image_template": IMAGE_TEMPLATE,
                "lora_rank": self.lora_r,
                "lora_alpha": self.lora_alpha,
                "image_min_pixels": self.image_config.min_pixels,
                "image_max_pixels": self.image_config.max_pixels,
            },
        )

    def load_tokenizer(self) -> JinaV4Tokenizer:
        return JinaV4Tokenizer(self.spec.path, self.max_length, self.tasks, self.task)

    def load_image_processor(self) -> QwenVLImageProcessor:
        return QwenVLImageProcessor(self.image_config, text_tokens=len(self.template_ids) - 1)

    def load_encoder(self, device: str | torch.device | None = None) -> JinaV4Encoder:
        dev = pick_device(device)
        return JinaV4Encoder(self, dev, resolve_dtype(self.spec.dtype, dev))
