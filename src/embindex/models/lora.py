"""Task LoRA with peft: one named peft LoRA adapter per task on ONE copy of the base weights.

A family converts its checkpoint's adapter tensors once, at load, into peft's layout and hands them to
`attach_task_adapters`: the model's target modules become peft LoRA layers (one `LoraConfig` adapter per
task, scaling lora_alpha / r, or lora_alpha / sqrt(r) with rsLoRA) and the tensors are loaded with
`set_peft_model_state_dict`. `TaskAdapters` then runs the model with

* one task for the whole batch (a name, or a per-row list naming one task): that adapter active (peft's
  single-adapter path, no per-layer row routing);
* a task per row: peft's mixed batch (`adapter_names`), `BASE_ADAPTER` for rows without a task (None). A
  batch without any task also goes this way (every row `BASE_ADAPTER`: the base weights).

Used by jina-embeddings-v3 and jina-clip-v2's text tower (`jina_xlmr`) and by jina-embeddings-v4.
"""

from __future__ import annotations

import threading
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from .base import ModelError

BASE_ADAPTER = "__base__"
"""peft's name for "no adapter" in `adapter_names` (the row runs on the base weights)."""

LoRAWeights = Mapping[str, tuple[torch.Tensor, torch.Tensor]]
"""Module path -> (A, B) in peft's layout: Linear A [r, in], B [out, r]; Embedding A [r, num], B [dim, r]."""

_PREFIX = "base_model.model."


def adapter_name(task: str) -> str:
    """The peft adapter name of `task`: the task name with '.' -> '_' (torch module names cannot hold dots)."""
    return task.replace(".", "_")


def _peft_slots(module: nn.Module, path: str, r: int) -> tuple[str, str, tuple[int, int], tuple[int, int]]:
    """peft state-dict keys (without adapter name) and shapes of A and B for the base `module` at `path`."""
    if isinstance(module, nn.Embedding):
        return (f"{_PREFIX}{path}.lora_embedding_A", f"{_PREFIX}{path}.lora_embedding_B",
                (r, module.num_embeddings), (module.embedding_dim, r))
    return (f"{_PREFIX}{path}.lora_A.weight", f"{_PREFIX}{path}.lora_B.weight",
            (r, module.in_features), (module.out_features, r))


def attach_task_adapters(
    model: nn.Module,
    weights: Mapping[str, LoRAWeights],
    *,
    r: int,
    lora_alpha: float,
    where: str,
    use_rslora: bool = False,
    autocast_adapter_dtype: bool = True,
) -> TaskAdapters:
    """Inject one peft LoRA adapter per task of `weights` ({task: {module path: (A, B)}}, peft's layout,
    every task on the same modules) into `model` and load the tensors; returns the runner.

    The adapters are created on each base layer's device; with `autocast_adapter_dtype` (peft's default)
    float16/bfloat16 adapters are kept in float32, otherwise in the base layer's dtype. `where` names the
    checkpoint in error messages."""
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict

    tasks = list(weights)
    if not tasks:
        raise ModelError(f"{where}: no task LoRA to load")
    names = [adapter_name(t) for t in tasks]
    if len(set(names)) != len(names) or BASE_ADAPTER in names:
        raise ModelError(f"{where}: task names {tasks} do not map to distinct peft adapter names")
    targets = sorted(weights[tasks[0]])
    modules = dict(model.named_modules())
    states: dict[str, dict[str, torch.Tensor]] = {}
    for task, name in zip(tasks, names):
        if sorted(weights[task]) != targets:
            diff = sorted(set(weights[task]) ^ set(targets))
            raise ModelError(f"{where}: task {task!r} LoRA modules differ from task {tasks[0]!r}'s: {diff[:5]}")
        state = states[name] = {}
        for path in targets:
            base = modules.get(path)
            if not isinstance(base, (nn.Linear, nn.Embedding)):
                raise ModelError(f"{where}: LoRA targets {path!r}, which is not a Linear or Embedding of the model")
            key_a, key_b, want_a, want_b = _peft_slots(base, path, int(r))
            A, B = weights[task][path]
            if tuple(A.shape) != want_a or tuple(B.shape) != want_b:
                raise ModelError(
                    f"{where}: LoRA of task {task!r} for {path!r} has A {tuple(A.shape)}, B {tuple(B.shape)}; "
                    f"expected A {want_a}, B {want_b} (r={r})"
                )
            state[key_a], state[key_b] = A, B

    config = LoraConfig(
        r=int(r), lora_alpha=lora_alpha, use_rslora=use_rslora, target_modules=targets, lora_dropout=0.0,
        bias="none", init_lora_weights=False, inference_mode=True,
    )
    with warnings.catch_warnings():  # transformers' deprecation notice raised inside peft, not ours to fix
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        peft = get_peft_model(model, config, adapter_name=names[0], autocast_adapter_dtype=autocast_adapter_dtype)
        for name in names[1:]:
            peft.add_adapter(name, config, autocast_adapter_dtype=autocast_adapter_dtype)
    params = {n for n, _ in peft.named_parameters()}
    for name, state in states.items():
        slots = {f"{k[:-7]}.{name}.weight" if k.endswith(".weight") else f"{k}.{name}" for k in state}
        if not slots <= params:
            raise ModelError(f"{where}: peft made no LoRA slot for {sorted(slots - params)[:5]}")
        result = set_peft_model_state_dict(peft, state, adapter_name=name)
        not_loaded = sorted(slots & set(result.missing_keys))
        if result.unexpected_keys or not_loaded:
            raise ModelError(f"{where}: LoRA weights of adapter {name!r} not loaded: "
                             f"{(not_loaded + list(result.unexpected_keys))[:5]}")
    peft.eval()
    for p in peft.parameters():
        p.requires_grad_(False)
    return TaskAdapters(peft, tasks)


class TaskAdapters:
    """Runs a peft model holding one adapter per task with a task per batch, per row, or none (base)."""

    def __init__(self, peft: Any, tasks: Sequence[str]):
        self.peft = peft
        self.names = {t: adapter_name(t) for t in tasks}
        self._active: str | None = peft.active_adapter
        self._lock = threading.Lock()  # the active adapter is shared state: one forward at a time

    @property
    def tasks(self) -> list[str]:
        return list(self.names)

    def _name(self, task: str | None) -> str:
        if task is None:
            return BASE_ADAPTER
        try:
            return self.names[task]
        except KeyError:
            raise ModelError(f"no LoRA adapter for task {task!r} (adapters: {self.tasks})") from None

    def __call__(self, task: str | Sequence[str | None] | None, input_ids: torch.Tensor, **kwargs: Any) -> Any:
        """The peft model's output on `input_ids` (batch first) and `kwargs` with `task`: a task name, None
        (base weights), or a sequence with one task (or None) per batch row."""
        if task is None or isinstance(task, str):
            rows = [self._name(task)] * input_ids.shape[0]
        else:
            rows = [self._name(t) for t in task]
        uniq = set(rows)
        with self._lock:
            if len(uniq) == 1 and BASE_ADAPTER not in uniq:  # one task: peft's single-adapter path
                if rows[0] != self._active:
                    self.peft.set_adapter(rows[0], inference_mode=True)
                    self._active = rows[0]
                return self.peft(input_ids=input_ids, **kwargs)
            # several tasks, or base rows (cheaper than disable_adapter(), which toggles every layer)
            return self.peft(input_ids=input_ids, adapter_names=rows, **kwargs)
