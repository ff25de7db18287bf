"""Task LoRA of jina-embeddings-v3 (and jina-clip-v2's text tower) runs on peft: one adapter per task,
mixed-task batches through peft's `adapter_names`, against the v3 fixture goldens."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from peft import PeftModel
from peft.tuners.lora import LoraLayer
from peft.tuners.lora import layer as lora_layer
from safetensors.torch import load_file
from torch import nn

from conftest import pooled_batch
from embindex.models import ModelError, ModelSpec, load_family
from embindex.models import jina_xlmr
from embindex.models.jina_embeddings_v3 import NO_TASK
from embindex.models.lora import BASE_ADAPTER, adapter_name, attach_task_adapters

FIXTURES = Path(__file__).parent / "fixtures"
FIX = FIXTURES / "jina-embeddings-v3-tiny"
GOLD = json.loads((FIX / "golden.json").read_text())
CONFIG = json.loads((FIX / "config.json").read_text())
TASKS = CONFIG["lora_adaptations"]
KEYS = list(GOLD["tasks"])  # the 5 tasks and "__no_task__"


def _task(key: str) -> str:
    return NO_TASK if key == "__no_task__" else key


@pytest.fixture(scope="module")
def family():
    return load_family(ModelSpec(name="jina-embeddings-v3", path=str(FIX), dtype="float32"))


@pytest.fixture()
def mixed_calls(monkeypatch):
    """Counts of peft's mixed-batch forwards, per LoRA layer class."""
    calls = {"Linear": 0, "Embedding": 0}
    for cls in (lora_layer.Linear, lora_layer.Embedding):
        original = cls._mixed_batch_forward

        def spy(self, *args, _original=original, _name=cls.__name__, **kwargs):
            calls[_name] += 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(cls, "_mixed_batch_forward", spy)
    return calls


def _lora_layers(model: nn.Module) -> dict[str, LoraLayer]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoraLayer)}


def test_lora_layers_are_peft(encoder):
    """Every Linear/Embedding of the backbone is wrapped by a peft LoRA layer holding one adapter per task,
    scaling exactly lora_alpha / lora_rank; no hand-written hooks are left."""
    model = encoder.backbone.model
    assert isinstance(encoder.backbone.adapters.peft, PeftModel)
    assert encoder.backbone.adapters.peft.get_base_model() is model
    lora = _lora_layers(model)
    assert len(lora) == 2 + 6 * CONFIG["num_hidden_layers"]  # word/type embeddings; q, k, v, o, fc1, fc2
    plain = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Embedding)) and ".lora_" not in n]
    assert plain and all(n.endswith(".base_layer") and n[: -len(".base_layer")] in lora for n in plain)
    assert isinstance(lora["embeddings.word_embeddings"], lora_layer.Embedding)
    assert isinstance(lora["layers.0.self_attn.q_proj"], lora_layer.Linear)
    names = {adapter_name(t) for t in TASKS}
    assert names == {"retrieval_query", "retrieval_passage", "separation", "classification", "text-matching"}
    scaling = float(CONFIG["lora_alpha"]) / float(CONFIG["lora_rank"])
    for layer in lora.values():
        assert set(layer.r) == names and set(layer.scaling.values()) == {scaling}
        assert not layer.merged
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    for gone in ("TaskRouter", "StackedLoRA"):
        assert not hasattr(jina_xlmr, gone)


def test_adapter_weights_are_the_checkpoint_tensors(encoder):
    """Linear A/B are the checkpoint's per-task slices (Wqkv's B split into q/k/v), Embedding A/B transposed."""
    ckpt = load_file(str(FIX / "model.safetensors"))
    lora = _lora_layers(encoder.backbone.model)
    h = CONFIG["hidden_size"]
    key = "roberta.{}.parametrizations.weight.0.lora_{}"
    for t, task in enumerate(TASKS):
        name = adapter_name(task)
        fc1 = lora["layers.1.mlp.fc1"]
        assert torch.equal(fc1.lora_A[name].weight, ckpt[key.format("encoder.layers.1.mlp.fc1", "A")][t])
        assert torch.equal(fc1.lora_B[name].weight, ckpt[key.format("encoder.layers.1.mlp.fc1", "B")][t])
        qkv_a = ckpt[key.format("encoder.layers.0.mixer.Wqkv", "A")][t]
        qkv_b = ckpt[key.format("encoder.layers.0.mixer.Wqkv", "B")][t]
        for i, p in enumerate("qkv"):
            layer = lora[f"layers.0.self_attn.{p}_proj"]
            assert torch.equal(layer.lora_A[name].weight, qkv_a)
            assert torch.equal(layer.lora_B[name].weight, qkv_b[i * h:(i + 1) * h])
        emb = lora["embeddings.word_embeddings"]
        assert torch.equal(emb.lora_embedding_A[name], ckpt[key.format("embeddings.word_embeddings", "A")][t].T)
        assert torch.equal(emb.lora_embedding_B[name], ckpt[key.format("embeddings.word_embeddings", "B")][t].T)


def test_mixed_task_batch_through_peft(tokenizer, encoder, mixed_calls):
    """Every task and base rows in one padded batch: peft's mixed path runs (Linear and Embedding), each
    row matches its task's golden and the same padded batch run with that row's task for every row."""
    rows = [(KEYS[j % len(KEYS)], j % 7) for j in range(14)]
    ids = [np.asarray(GOLD["tasks"][k]["input_ids"][i]) for k, i in rows]
    tasks = [_task(k) for k, _ in rows]
    mixed = pooled_batch(tokenizer, encoder, ids, tasks)
    assert mixed_calls["Linear"] > 0 and mixed_calls["Embedding"] > 0
    for r, (k, i) in enumerate(rows):
        want = np.asarray(GOLD["tasks"][k]["mean_pooled_unnormalized"]["values"][i], np.float32)
        np.testing.assert_allclose(mixed[r], want, atol=1e-5, rtol=0)
    for key in KEYS:
        same = pooled_batch(tokenizer, encoder, ids, _task(key))  # same padding, one task for every row
        sel = [r for r, (k, _) in enumerate(rows) if k == key]
        np.testing.assert_allclose(mixed[sel], same[sel], atol=1e-6, rtol=0)


def test_one_task_per_batch_takes_the_single_adapter_path(tokenizer, encoder, mixed_calls):
    """A single task, or a per-row list naming one task, skips peft's mixed path (one active adapter)."""
    ids = [np.asarray(x) for x in GOLD["tasks"]["separation"]["input_ids"]]
    single = pooled_batch(tokenizer, encoder, ids, "separation")
    as_list = pooled_batch(tokenizer, encoder, ids, ["separation"] * len(ids))
    assert mixed_calls == {"Linear": 0, "Embedding": 0}
    np.testing.assert_array_equal(single, as_list)
    np.testing.assert_allclose(single, GOLD["tasks"]["separation"]["mean_pooled_unnormalized"]["values"], atol=1e-5)


@pytest.mark.parametrize("as_list", [False, True])
def test_base_rows(tokenizer, encoder, as_list):
    """No task: every row runs as peft's "__base__"; the task adapters are untouched afterwards."""
    base_ids = [np.asarray(x) for x in GOLD["tasks"]["__no_task__"]["input_ids"]]
    base = pooled_batch(tokenizer, encoder, base_ids, [NO_TASK] * len(base_ids) if as_list else NO_TASK)
    np.testing.assert_allclose(base, GOLD["tasks"]["__no_task__"]["mean_pooled_unnormalized"]["values"], atol=1e-5)
    ids = [np.asarray(x) for x in GOLD["tasks"]["classification"]["input_ids"]]
    after = pooled_batch(tokenizer, encoder, ids, "classification")
    np.testing.assert_allclose(after, GOLD["tasks"]["classification"]["mean_pooled_unnormalized"]["values"],
                               atol=1e-5)
    assert not any(p.requires_grad for p in encoder.backbone.model.parameters())


def test_bfloat16_adapters_keep_the_model_dtype():
    enc = load_family(ModelSpec(name="jina-embeddings-v3", path=str(FIX), dtype="bfloat16")).load_encoder("cpu")
    dtypes = {p.dtype for n, p in enc.backbone.model.named_parameters() if ".lora_" in n}
    assert dtypes == {torch.bfloat16}


def test_clip_text_tower_on_peft():
    enc = load_family(ModelSpec(name="jina-clip-v2", path=str(FIXTURES / "jina-clip-v2-tiny"),
                                dtype="float32")).load_encoder("cpu")
    lora = _lora_layers(enc.backbone.model)
    assert lora and all(set(layer.r) == {adapter_name(enc.task)} for layer in lora.values())
    assert _lora_layers(enc.vision) == {}


def test_colbert_backbone_has_no_lora():
    enc = load_family(ModelSpec(name="jina-colbert-v2", path=str(FIXTURES / "jina-colbert-v2-tiny"),
                                dtype="float32")).load_encoder("cpu")
    assert not enc.backbone.has_lora and _lora_layers(enc.backbone.model) == {}
    ids = torch.tensor([[0, 5, 2]])
    with pytest.raises(ModelError, match="no task LoRA"):
        enc.backbone(ids, torch.ones_like(ids), "retrieval.query")


# ------------------------------------------------------------------------------ the shared helper


class _Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(11, 6)
        self.lin = nn.Linear(6, 5)

    def forward(self, input_ids):
        return self.lin(self.emb(input_ids))


def _toy_weights(tasks, r=2, gen=None):
    gen = gen or torch.Generator().manual_seed(0)
    return {t: {"emb": (torch.randn(r, 11, generator=gen), torch.randn(6, r, generator=gen)),
                "lin": (torch.randn(r, 6, generator=gen), torch.randn(5, r, generator=gen))} for t in tasks}


def test_helper_math_and_mixed_rows():
    """Per row: y = lin(E[ids] + A_e^T[ids] B_e^T s) + (.. A^T) B^T s with s = alpha / r, whatever the mix."""
    torch.manual_seed(0)
    model = _Toy().eval()
    base = {k: v.clone() for k, v in model.state_dict().items()}
    weights = _toy_weights(["a.x", "b"])
    runner = attach_task_adapters(model, weights, r=2, lora_alpha=3.0, where="toy")
    s = 3.0 / 2
    ids = torch.randint(0, 11, (4, 3))

    def expected(task, x):
        if task is None:
            e = base["emb.weight"][x]
            return e @ base["lin.weight"].T + base["lin.bias"]
        (ea, eb), (la, lb) = weights[task]["emb"], weights[task]["lin"]
        e = base["emb.weight"][x] + (ea.T[x] @ eb.T) * s
        return e @ base["lin.weight"].T + base["lin.bias"] + (e @ la.T) @ lb.T * s

    with torch.inference_mode():
        rows = ["a.x", None, "b", "a.x"]
        mixed = runner(rows, ids)
        for i, t in enumerate(rows):
            torch.testing.assert_close(mixed[i], expected(t, ids[i]), atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(mixed[i], runner(t, ids)[i], atol=1e-5, rtol=1e-6)
    assert runner.tasks == ["a.x", "b"] and BASE_ADAPTER not in runner.names.values()
    with pytest.raises(ModelError, match="no LoRA adapter for task 'c'"):
        runner("c", ids)
    with pytest.raises(ModelError, match="no LoRA adapter for task 'c'"):
        runner(["a.x", "c", "b", None], ids)


def test_helper_errors():
    with pytest.raises(ModelError, match="distinct peft adapter names"):
        attach_task_adapters(_Toy(), _toy_weights(["a.b", "a_b"]), r=2, lora_alpha=1.0, where="toy")
    bad = _toy_weights(["a"])
    bad["a"]["lin"] = (torch.zeros(2, 7), torch.zeros(5, 2))
    with pytest.raises(ModelError, match=r"toy: LoRA of task 'a' for 'lin' has A \(2, 7\).*expected A \(2, 6\)"):
        attach_task_adapters(_Toy(), bad, r=2, lora_alpha=1.0, where="toy")
    uneven = _toy_weights(["a", "b"])
    del uneven["b"]["emb"]
    with pytest.raises(ModelError, match="task 'b' LoRA modules differ"):
        attach_task_adapters(_Toy(), uneven, r=2, lora_alpha=1.0, where="toy")
