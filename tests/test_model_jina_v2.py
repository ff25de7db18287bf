"""jina-embeddings-v2 (JinaBERT) family on a generated tiny checkpoint, checked against an independent
float64 numpy implementation written here (explicit per-head/per-position loops for ALiBi attention, GEGLU
MLP, post-LayerNorms, masked mean)."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file

from conftest import pooled_batch
from embindex.models import ModelError, ModelSpec, load_family
from embindex.models.embedder import Embedder
from embindex.models.jina_embeddings_v2 import alibi_bias, alibi_slopes
from embindex.text.batching import pad_batch

HIDDEN, HEADS, LAYERS, INTERMEDIATE, MAX_POS = 48, 6, 2, 40, 64
HEAD_DIM = HIDDEN // HEADS
# ALiBi slopes for 6 heads, derived by hand: the 4-head series 2^-2, 2^-4, 2^-6, 2^-8, then every other
# element of the 8-head series (2^-1, 2^-2, ...): 2^-1, 2^-3
SLOPES_6 = [2**-2, 2**-4, 2**-6, 2**-8, 2**-1, 2**-3]
WORDS = (
    "the quick brown fox jumps over lazy dog hello world embed index search code query passage "
    "ali bi alibi attention is all you need a of to and in . , ? ! ##s ##ing ##ed ##er"
).split()
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
VOCAB = {tok: i for i, tok in enumerate(SPECIALS + WORDS)}
TEXTS = [
    "Hello world!",
    "The quick brown fox jumps over the lazy dog.",
    "attention is all you need",
    "searching embedded queries, and passages?",
    "a",
    "the dog jumps over the fox , the fox jumps over the dog",
]


# ---------------------------------------------------------------------------------------------------
# Tiny checkpoint in the real key layout
# ---------------------------------------------------------------------------------------------------


def _weights(seed: int = 0, prefix: str = "") -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)

    def mat(*shape, scale=0.15):
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    def ln(name):
        return {
            f"{name}.weight": (1.0 + mat(HIDDEN, scale=0.1)),
            f"{name}.bias": mat(HIDDEN, scale=0.05),
        }

    w = {
        "embeddings.word_embeddings.weight": mat(len(VOCAB), HIDDEN, scale=0.5),
        "embeddings.token_type_embeddings.weight": mat(2, HIDDEN, scale=0.5),
        **ln("embeddings.LayerNorm"),
    }
    for i in range(LAYERS):
        p = f"encoder.layer.{i}."
        for name in ("query", "key", "value"):
            w[p + f"attention.self.{name}.weight"] = mat(HIDDEN, HIDDEN, scale=0.3)
            w[p + f"attention.self.{name}.bias"] = mat(HIDDEN, scale=0.1)
        w[p + "attention.output.dense.weight"] = mat(HIDDEN, HIDDEN)
        w[p + "attention.output.dense.bias"] = mat(HIDDEN, scale=0.05)
        w.update(ln(p + "attention.output.LayerNorm"))
        w[p + "mlp.gated_layers.weight"] = mat(2 * INTERMEDIATE, HIDDEN, scale=0.3)
        w[p + "mlp.wo.weight"] = mat(HIDDEN, INTERMEDIATE)
        w[p + "mlp.wo.bias"] = mat(HIDDEN, scale=0.05)
        w.update(ln(p + "mlp.layernorm"))
    return {prefix + k: v for k, v in w.items()}


def _config(**over) -> dict:
    cfg = {
        "architectures": ["JinaBertForMaskedLM"],
        "model_type": "bert",
        "attention_probs_dropout_prob": 0.0,
        "hidden_dropout_prob": 0.1,
        "hidden_act": "gelu",
        "hidden_size": HIDDEN,
        "num_attention_heads": HEADS,
        "num_hidden_layers": LAYERS,
        "intermediate_size": INTERMEDIATE,
        "max_position_embeddings": MAX_POS,
        "position_embedding_type": "alibi",
        "feed_forward_type": "geglu",
        "emb_pooler": "mean",
        "type_vocab_size": 2,
        "vocab_size": len(VOCAB),
        "layer_norm_eps": 1e-12,
        "pad_token_id": 0,
        "initializer_range": 0.02,
    }
    cfg.update(over)
    return cfg


def _write_tokenizer(path: str) -> None:
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    tok = Tokenizer(models.WordPiece(VOCAB, unk_token="[UNK]", max_input_chars_per_word=100))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True, clean_text=True, handle_chinese_chars=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", VOCAB["[CLS]"]), ("[SEP]", VOCAB["[SEP]"])],
    )
    tok.decoder = decoders.WordPiece()
    tok.save(os.path.join(path, "tokenizer.json"))
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "BertTokenizer", "pad_token": "[PAD]", "cls_token": "[CLS]",
                   "sep_token": "[SEP]", "unk_token": "[UNK]", "do_lower_case": True,
                   "model_max_length": MAX_POS}, f)


def make_checkpoint(path, weights: dict[str, np.ndarray] | None = None, **config_over) -> str:
    path = str(path)
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(_config(**config_over), f)
    save_file(weights if weights is not None else _weights(), os.path.join(path, "model.safetensors"))
    _write_tokenizer(path)
    return path


def spec(path, **kw) -> ModelSpec:
    kw.setdefault("dtype", "float32")
    return ModelSpec(name="jina-embeddings-v2", path=str(path), **kw)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("jina-v2-tiny"))


@pytest.fixture(scope="module")
def family(ckpt):
    return load_family(spec(ckpt))


# ---------------------------------------------------------------------------------------------------
# Independent reference: float64 numpy, one unpadded sequence at a time, explicit loops
# ---------------------------------------------------------------------------------------------------


def _layer_norm(x, w, b, eps=1e-12):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * w + b


_erf = np.vectorize(math.erf)


def _gelu(x):
    return 0.5 * x * (1.0 + _erf(x / math.sqrt(2.0)))


def reference_tokens(w: dict[str, np.ndarray], ids, slopes=SLOPES_6, act=_gelu, prefix: str = "") -> np.ndarray:
    W = {k[len(prefix):]: v.astype(np.float64) for k, v in w.items() if k.startswith(prefix)}
    ids = list(ids)
    n = len(ids)
    x = W["embeddings.word_embeddings.weight"][ids] + W["embeddings.token_type_embeddings.weight"][0]
    x = _layer_norm(x, W["embeddings.LayerNorm.weight"], W["embeddings.LayerNorm.bias"])
    for layer in range(LAYERS):
        p = f"encoder.layer.{layer}."
        q = x @ W[p + "attention.self.query.weight"].T + W[p + "attention.self.query.bias"]
        k = x @ W[p + "attention.self.key.weight"].T + W[p + "attention.self.key.bias"]
        v = x @ W[p + "attention.self.value.weight"].T + W[p + "attention.self.value.bias"]
        ctx = np.zeros((n, HIDDEN))
        for h in range(HEADS):
            cols = slice(h * HEAD_DIM, (h + 1) * HEAD_DIM)
            for i in range(n):
                scores = np.array(
                    [q[i, cols] @ k[j, cols] / math.sqrt(HEAD_DIM) - slopes[h] * abs(i - j) for j in range(n)]
                )
                probs = np.exp(scores - scores.max())
                probs /= probs.sum()
                ctx[i, cols] = sum(probs[j] * v[j, cols] for j in range(n))
        attn = ctx @ W[p + "attention.output.dense.weight"].T + W[p + "attention.output.dense.bias"]
        ln_w, ln_b = W[p + "attention.output.LayerNorm.weight"], W[p + "attention.output.LayerNorm.bias"]
        a = _layer_norm(attn + x, ln_w, ln_b)
        g = a @ W[p + "mlp.gated_layers.weight"].T
        m = (act(g[:, :INTERMEDIATE]) * g[:, INTERMEDIATE:]) @ W[p + "mlp.wo.weight"].T + W[p + "mlp.wo.bias"]
        x = _layer_norm(m + a, W[p + "mlp.layernorm.weight"], W[p + "mlp.layernorm.bias"])
    return x


def reference_pooled(w, ids, **kw) -> np.ndarray:
    return reference_tokens(w, ids, **kw).mean(0)


# ---------------------------------------------------------------------------------------------------
# ALiBi
# ---------------------------------------------------------------------------------------------------


def test_alibi_slopes_known_values():
    np.testing.assert_allclose(alibi_slopes(8).numpy(), [2.0**-k for k in range(1, 9)], rtol=1e-6)
    np.testing.assert_allclose(
        alibi_slopes(12).numpy(),
        [2.0**-k for k in range(1, 9)] + [2**-0.5, 2**-1.5, 2**-2.5, 2**-3.5],
        rtol=1e-6,
    )
    np.testing.assert_allclose(alibi_slopes(16).numpy(), [2.0 ** (-k / 2) for k in range(1, 17)], rtol=1e-6)
    np.testing.assert_allclose(alibi_slopes(6).numpy(), SLOPES_6, rtol=1e-6)


def test_alibi_bias_symmetric():
    bias = alibi_bias(HEADS, 9).numpy()
    assert bias.shape == (HEADS, 9, 9)
    np.testing.assert_array_equal(bias, bias.transpose(0, 2, 1))
    np.testing.assert_array_equal(np.diagonal(bias, axis1=1, axis2=2), 0)
    for h in range(HEADS):
        for i in range(9):
            for j in range(9):
                assert bias[h, i, j] == pytest.approx(-SLOPES_6[h] * abs(i - j), rel=1e-6)


# ---------------------------------------------------------------------------------------------------
# Tokenizer and info
# ---------------------------------------------------------------------------------------------------


def test_tokenizer(tokenizer):
    ids = tokenizer(["Hello world!", "searching"], "document")
    assert ids[0].tolist() == [VOCAB["[CLS]"], VOCAB["hello"], VOCAB["world"], VOCAB["!"], VOCAB["[SEP]"]]
    assert ids[1].tolist() == [VOCAB["[CLS]"], VOCAB["search"], VOCAB["##ing"], VOCAB["[SEP]"]]
    # no role prefixes
    assert tokenizer(["Hello world!"], "query")[0].tolist() == ids[0].tolist()
    assert tokenizer.pad_token_id == 0 and tokenizer.padding_side == "right"
    with pytest.raises(ModelError, match="takes no task"):
        tokenizer(["x"], "query", "retrieval")


def test_truncation_keeps_special_tokens(ckpt):
    tok = load_family(spec(ckpt, max_length=6)).load_tokenizer()
    ids = tok([TEXTS[1]], "document")[0]
    assert len(ids) == 6 and ids[0] == VOCAB["[CLS]"] and ids[-1] == VOCAB["[SEP]"]


def test_info(family):
    info = family.info()
    assert info.family == "jina-embeddings-v2"
    assert info.dim == HIDDEN and info.pooling == "mean" and info.max_length == MAX_POS
    assert info.tasks == [] and info.matryoshka_dims is None and info.prefixes == {}


# ---------------------------------------------------------------------------------------------------
# Numerics against the independent reference
# ---------------------------------------------------------------------------------------------------


def test_matches_independent_reference(tokenizer, encoder):
    ids = tokenizer(TEXTS, "document")
    assert len({len(x) for x in ids}) > 2  # real padding in the batch
    got = pooled_batch(tokenizer, encoder, ids)
    w = _weights()
    for i, row in enumerate(ids):
        np.testing.assert_allclose(got[i], reference_pooled(w, row), atol=2e-5, rtol=0)


def test_token_states_match_reference(encoder, tokenizer):
    row = tokenizer([TEXTS[1]], "document")[0]
    ids = torch.from_numpy(row[None].astype(np.int64))
    with torch.inference_mode():
        hidden = encoder.model(ids, torch.ones_like(ids)).numpy()[0]
    np.testing.assert_allclose(hidden, reference_tokens(_weights(), row), atol=2e-5, rtol=0)


def test_padding_does_not_change_rows(tokenizer, encoder):
    ids = tokenizer(TEXTS, "document")
    right = pooled_batch(tokenizer, encoder, ids, side="right")
    left = pooled_batch(tokenizer, encoder, ids, side="left")
    alone = np.stack([pooled_batch(tokenizer, encoder, [row])[0] for row in ids])
    np.testing.assert_allclose(right, alone, atol=1e-5, rtol=0)
    np.testing.assert_allclose(left, alone, atol=1e-5, rtol=0)
    # different pad ids under the mask change nothing either
    input_ids, mask = pad_batch(ids, 7, "right")
    other = encoder.forward_pooled(torch.from_numpy(input_ids), torch.from_numpy(mask)).numpy()
    np.testing.assert_allclose(other, alone, atol=1e-5, rtol=0)


def test_embedder_end_to_end(family, tokenizer):
    emb = Embedder(family, device="cpu", batch_tokens=24)
    got = emb.encode(TEXTS, "document")
    w = _weights()
    want = np.stack([reference_pooled(w, row) for row in tokenizer(TEXTS, "document")])
    want /= np.linalg.norm(want, axis=-1, keepdims=True)
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=0)
    np.testing.assert_allclose(np.linalg.norm(got, axis=-1), 1.0, atol=1e-5)


def test_bert_prefix_and_ignored_heads(tmp_path, tokenizer):
    w = _weights(prefix="bert.")
    w["bert.pooler.dense.weight"] = np.zeros((HIDDEN, HIDDEN), np.float32)
    w["bert.pooler.dense.bias"] = np.zeros(HIDDEN, np.float32)
    w["cls.predictions.bias"] = np.zeros(len(VOCAB), np.float32)
    path = make_checkpoint(tmp_path / "prefixed", weights=w)
    enc = load_family(spec(path)).load_encoder("cpu")
    ids = tokenizer(TEXTS[:3], "document")
    got = pooled_batch(tokenizer, enc, ids)
    for i, row in enumerate(ids):
        np.testing.assert_allclose(got[i], reference_pooled(w, row, prefix="bert."), atol=2e-5, rtol=0)


def test_reglu_variant(tmp_path, tokenizer):
    path = make_checkpoint(tmp_path / "reglu", feed_forward_type="reglu")
    enc = load_family(spec(path)).load_encoder("cpu")
    ids = tokenizer(TEXTS[:2], "document")
    got = pooled_batch(tokenizer, enc, ids)
    for i, row in enumerate(ids):
        want = reference_pooled(_weights(), row, act=lambda x: np.maximum(x, 0.0))
        np.testing.assert_allclose(got[i], want, atol=2e-5, rtol=0)


def test_bfloat16_runs(ckpt, tokenizer):
    enc = load_family(spec(ckpt, dtype="bfloat16")).load_encoder("cpu")
    assert enc.model.encoder.layer[0].mlp.wo.weight.dtype == torch.bfloat16
    ids = tokenizer(TEXTS, "document")
    got = pooled_batch(tokenizer, enc, ids)
    assert got.dtype == np.float32
    w = _weights()
    for i, row in enumerate(ids):
        want = reference_pooled(w, row)
        cos = got[i] @ want / (np.linalg.norm(got[i]) * np.linalg.norm(want))
        assert cos > 0.99


# ---------------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------------


def test_rejects_task(ckpt):
    with pytest.raises(ModelError, match="takes no task"):
        load_family(spec(ckpt, task="retrieval.query"))


def test_bad_configs(tmp_path):
    with pytest.raises(ModelError, match="expects 'alibi'"):
        load_family(spec(make_checkpoint(tmp_path / "abs", position_embedding_type="absolute")))
    with pytest.raises(ModelError, match="feed_forward_type 'original'"):
        load_family(spec(make_checkpoint(tmp_path / "orig", feed_forward_type="original")))
    with pytest.raises(ModelError, match="expects 'bert'"):
        load_family(spec(make_checkpoint(tmp_path / "xlmr", model_type="xlm-roberta")))
    with pytest.raises(ModelError, match="exceeds"):
        load_family(spec(make_checkpoint(tmp_path / "ok"), max_length=MAX_POS + 1))
    with pytest.raises(ModelError, match="no config.json"):
        (tmp_path / "empty").mkdir()
        load_family(spec(tmp_path / "empty"))


def test_bad_weights(tmp_path):
    w = _weights()
    del w["encoder.layer.1.mlp.wo.bias"]
    with pytest.raises(ModelError, match="missing 1 tensors.*layer.1.mlp.wo.bias"):
        load_family(spec(make_checkpoint(tmp_path / "missing", weights=w))).load_encoder("cpu")

    w = _weights()
    w["encoder.layer.0.attention.self.layer_norm_q.weight"] = np.ones(HIDDEN, np.float32)
    with pytest.raises(ModelError, match="base-code layout"):
        load_family(spec(make_checkpoint(tmp_path / "code", weights=w))).load_encoder("cpu")

    w = _weights()
    w["encoder.layer.0.mlp.extra.weight"] = np.ones(HIDDEN, np.float32)
    with pytest.raises(ModelError, match="unexpected 1"):
        load_family(spec(make_checkpoint(tmp_path / "extra", weights=w))).load_encoder("cpu")

    with pytest.raises(ModelError, match="has shape"):
        load_family(spec(make_checkpoint(tmp_path / "shape", intermediate_size=32))).load_encoder("cpu")

    pickled = make_checkpoint(tmp_path / "pickled")
    os.remove(os.path.join(pickled, "model.safetensors"))
    open(os.path.join(pickled, "pytorch_model.bin"), "wb").close()
    with pytest.raises(ModelError, match="no .safetensors.*pickled"):
        load_family(spec(pickled))
