"""hf-encoder on sentence-transformers checkpoints equals `SentenceTransformer.encode`.

Tiny random checkpoints are built here with sentence-transformers itself (a 2-layer BERT with the bundled
MiniLM's tokenizer), saved, and embedded both ways: every pooling mode, concatenations, Dense (non-identity
activations, no bias, pickled weights), Normalize, prompts with default_prompt_name, include_prompt=False.
"""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import torch

from conftest import FIXTURES, pooled_batch, sample_docs
from embindex.models import ModelError, ModelSpec, load_family
from embindex.models.embedder import Embedder, l2_normalize

MODES = ["cls", "max", "mean", "mean_sqrt_len_tokens", "weightedmean", "lasttoken"]
HIDDEN = 32
MAX_LEN = 48
TEXTS = ["hello world", "The Quick brown fox, again!", "x", "",
         "a long text about nothing in particular that goes on and on " * 6,  # truncated at MAX_LEN
         "naïve café — déjà vu", "query: looks like a prompt but is text"]
TOL = 1e-5


def _tiny_bert(path: str, tokenizer_path: str, **tok_kwargs) -> str:
    from transformers import AutoTokenizer, BertConfig, BertModel

    tok = AutoTokenizer.from_pretrained(tokenizer_path, **tok_kwargs)
    torch.manual_seed(0)
    cfg = BertConfig(hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                     vocab_size=tok.vocab_size, max_position_embeddings=128)
    BertModel(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def base(tmp_path_factory, minilm_path) -> str:
    return _tiny_bert(str(tmp_path_factory.mktemp("tiny-bert")), minilm_path)


def make_st(path, base: str, pooling="mean", dense=(), normalize=False, include_prompt=True, prompts=None,
            default_prompt_name=None, hidden=HIDDEN) -> str:
    """Save Transformer -> Pooling -> Dense* -> Normalize? with sentence-transformers; `dense`: (out, activation
    module or None, bias) per layer."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.base.modules import Dense, Normalize, Transformer
    from sentence_transformers.sentence_transformer.modules import Pooling

    torch.manual_seed(1)
    modes = (pooling,) if isinstance(pooling, str) else tuple(pooling)
    modules = [Transformer(base, max_seq_length=MAX_LEN),
               Pooling(hidden, pooling_mode=pooling, include_prompt=include_prompt)]
    dim = hidden * len(modes)
    for out, act, bias in dense:
        modules.append(Dense(dim, out, bias=bias, activation_function=act))
        dim = out
    if normalize:
        modules.append(Normalize())
    SentenceTransformer(modules=modules, prompts=prompts, default_prompt_name=default_prompt_name,
                        device="cpu").save(str(path), create_model_card=False)
    return str(path)


def ours(path: str, texts=TEXTS, role="document", **spec):
    fam = load_family(ModelSpec(name="hf-encoder", path=path, dtype="float32", **spec))
    tok = fam.load_tokenizer()
    return pooled_batch(tok, fam.load_encoder("cpu"), tok(texts, role), role=role), fam


def reference(path: str, texts=TEXTS, role="document", **kwargs) -> np.ndarray:
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(path, device="cpu")
    fn = {"query": st.encode_query, "document": st.encode_document, None: st.encode}[role]
    return fn(list(texts), batch_size=4, **kwargs)


def assert_parity(path: str, role="document", texts=TEXTS) -> np.ndarray:
    got, _ = ours(path, texts, role or "document")
    ref = reference(path, texts, role)
    assert got.shape == ref.shape
    assert np.abs(got - ref).max() < TOL, np.abs(got - ref).max()
    return got


@pytest.mark.parametrize("mode", MODES)
def test_each_pooling_mode(tmp_path, base, mode):
    path = make_st(tmp_path / mode, base, pooling=mode)
    got = assert_parity(path)
    fam = load_family(ModelSpec(name="hf-encoder", path=path))
    assert fam.info().pooling == ("last" if mode == "lasttoken" else mode)
    assert (fam.info().dim, fam.info().max_length) == (HIDDEN, MAX_LEN)  # tokenizer_config's model_max_length
    assert not np.allclose(np.linalg.norm(got, axis=1), 1.0)  # no Normalize: raw vectors, as ST returns them


def test_concatenated_modes(tmp_path, base):
    path = make_st(tmp_path / "cat", base, pooling=("cls", "mean", "max"))
    got = assert_parity(path)
    assert got.shape[1] == 3 * HIDDEN
    assert load_family(ModelSpec(name="hf-encoder", path=path)).info().pooling == "cls+mean+max"


def test_legacy_pooling_flags_concatenate_in_sentence_transformers_order(tmp_path, base):
    path = make_st(tmp_path / "legacy", base)
    (tmp_path / "legacy" / "1_Pooling" / "config.json").write_text(json.dumps({
        "word_embedding_dimension": HIDDEN, "pooling_mode_mean_tokens": True, "pooling_mode_max_tokens": True,
        "pooling_mode_cls_token": False, "pooling_mode_mean_sqrt_len_tokens": False}))
    assert_parity(path)
    assert load_family(ModelSpec(name="hf-encoder", path=path)).info().pooling == "max+mean"


@pytest.mark.parametrize("normalize", [False, True])
def test_dense_tanh(tmp_path, base, normalize):
    path = make_st(tmp_path / "d", base, dense=[(16, torch.nn.Tanh(), True)], normalize=normalize)
    got = assert_parity(path)
    assert got.shape[1] == 16
    assert np.allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5) == normalize
    info = load_family(ModelSpec(name="hf-encoder", path=path)).info()
    assert (info.dim, info.pooling) == (16, "mean+dense")  # not "mean": late chunking refuses it


def test_dense_stack_gelu_identity_no_bias(tmp_path, base):
    path = make_st(tmp_path / "d2", base, pooling=("cls", "mean"),
                   dense=[(24, torch.nn.GELU(), True), (8, None, False)], normalize=True)
    cfg = json.loads((tmp_path / "d2" / "3_Dense" / "config.json").read_text())
    assert (cfg["bias"], cfg["activation_function"]) == (False, "torch.nn.modules.linear.Identity")
    assert assert_parity(path).shape[1] == 8


def test_dense_pickled_weights_load_weights_only(tmp_path, base):
    from safetensors.torch import load_file

    path = make_st(tmp_path / "bin", base, dense=[(16, torch.nn.Tanh(), True)])
    dense = tmp_path / "bin" / "2_Dense"
    torch.save(load_file(str(dense / "model.safetensors")), str(dense / "pytorch_model.bin"))
    os.remove(dense / "model.safetensors")
    assert_parity(path)


def test_normalize_only(tmp_path, base):
    path = make_st(tmp_path / "n", base, pooling="max", normalize=True)
    assert np.allclose(np.linalg.norm(assert_parity(path), axis=1), 1.0, atol=1e-5)


def test_embedder_normalizes_for_the_index(tmp_path, base):
    """The index stores l2-normalized vectors: ST's output normalized (a no-op after a Normalize module)."""
    path = make_st(tmp_path / "e", base, dense=[(16, torch.nn.Tanh(), True)])
    vecs = Embedder(load_family(ModelSpec(name="hf-encoder", path=path, dtype="float32"))).encode(TEXTS)
    assert np.abs(vecs - l2_normalize(reference(path))).max() < TOL
    assert np.abs(vecs - reference(path, normalize_embeddings=True)).max() < TOL


PROMPTS = {"query": "query: ", "passage": "passage: ", "classify": "classify this: "}


@pytest.mark.parametrize("role", ["query", "document"])
def test_prompts_and_default_prompt_name(tmp_path, base, role):
    """As saved by sentence-transformers 6 (query and document always listed, document ""): each role has
    its own prompt, so default_prompt_name does not apply (as in encode_query / encode_document)."""
    path = make_st(tmp_path / "p", base, prompts=PROMPTS, default_prompt_name="classify")
    saved = json.loads((tmp_path / "p" / "config_sentence_transformers.json").read_text())["prompts"]
    assert saved["document"] == ""
    assert_parity(path, role)
    assert load_family(ModelSpec(name="hf-encoder", path=path)).info().prefixes == {"query": "query: "}


def test_role_without_prompt_gets_default_prompt_and_passage_is_document(tmp_path, base):
    """An older config lists no query/document prompt: documents take "passage", queries the default prompt
    (what `encode(texts)` applies)."""
    path = make_st(tmp_path / "old", base, pooling=("mean", "lasttoken"))
    (tmp_path / "old" / "config_sentence_transformers.json").write_text(json.dumps(
        {"prompts": {"passage": "passage: ", "classify": "classify this: "}, "default_prompt_name": "classify"}))
    fam = load_family(ModelSpec(name="hf-encoder", path=path))
    assert fam.info().prefixes == {"query": "classify this: ", "document": "passage: "}
    got_q, _ = ours(path, role="query")
    assert np.abs(got_q - reference(path, role=None)).max() < TOL  # plain encode: the default prompt
    got_d, _ = ours(path, role="document")
    assert np.abs(got_d - reference(path, role=None, prompt_name="passage")).max() < TOL


@pytest.mark.parametrize("pooling", ["mean", ("cls", "weightedmean"), ("lasttoken", "max")])
def test_include_prompt_false(tmp_path, base, pooling):
    from sentence_transformers import SentenceTransformer

    path = make_st(tmp_path / "ip", base, pooling=pooling, include_prompt=False,
                   prompts={"query": "query: ", "document": "represent the document: "})
    st = SentenceTransformer(path, device="cpu")
    for role in ("query", "document"):
        got = assert_parity(path, role)
        st[1].include_prompt = True
        with_prompt = st.encode_query(TEXTS) if role == "query" else st.encode_document(TEXTS)
        st[1].include_prompt = False
        assert np.abs(got - with_prompt).max() > 1e-3  # the exclusion matters for these vectors


def test_include_prompt_false_role_without_prompt(tmp_path, base):
    """Documents without a prompt pool every token, even when a query prompt exists."""
    path = make_st(tmp_path / "ipq", base, pooling="cls", include_prompt=False, prompts={"query": "query: "})
    assert_parity(path, "document")
    assert_parity(path, "query")


def test_include_prompt_false_documents_that_start_like_the_query_prompt(tmp_path, base):
    """Documents (no prompt) whose texts all begin with the query prompt's words: the rows' role says they
    carry no prompt, so every token is pooled, as sentence-transformers' encode_document does (recognising
    the prompt from the ids alone would drop those words from every row)."""
    from embindex.models.embedder import Embedder

    texts = ["query: looks like a prompt but is text", "query: how to open a gzip file", "query: x"]
    path = make_st(tmp_path / "ipd", base, pooling="mean", include_prompt=False, prompts={"query": "query: "})
    ref = reference(path, texts, "document")
    got, fam = ours(path, texts, "document")
    assert np.abs(got - ref).max() < TOL, np.abs(got - ref).max()
    through_embedder = Embedder(fam, device="cpu").encode(texts, role="document")  # the pipeline's path
    assert np.abs(through_embedder - ref / np.linalg.norm(ref, axis=1, keepdims=True)).max() < TOL
    assert_parity(path, "query", texts)  # queries of the same texts still leave their prompt out


def test_include_prompt_false_bpe_prompt_space(tmp_path):
    """Qwen2's BPE tokenizer (from a fixture): the prompt's trailing space is a token of its own alone but
    merges into the text's first token in `prompt + text`; sentence-transformers still leaves out the
    prompt's length in tokens, and so does hf-encoder."""
    from transformers import AutoModel, AutoTokenizer, Qwen2Config

    tok = AutoTokenizer.from_pretrained(str(FIXTURES / "jina-code-embeddings-tiny"))
    torch.manual_seed(0)
    cfg = Qwen2Config(hidden_size=8, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                      intermediate_size=64, vocab_size=len(tok), max_position_embeddings=128)
    AutoModel.from_config(cfg).save_pretrained(str(tmp_path / "qwen"))
    tok.save_pretrained(str(tmp_path / "qwen"))
    path = make_st(tmp_path / "st", str(tmp_path / "qwen"), pooling=("lasttoken", "mean"), include_prompt=False,
                   prompts={"query": "Instruct: find the code\nQuery: ", "document": "passage: "}, hidden=8)
    fam = load_family(ModelSpec(name="hf-encoder", path=path, dtype="float32"))
    assert all(p.loose_last for p in fam.load_encoder("cpu").prompts.values())
    assert_parity(path, "query")
    assert_parity(path, "document")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("side", ["right", "left"])
def test_pooling_math_matches_sentence_transformers(mode, side):
    """Pooling on given token states, padded either side, prompt excluded, against ST's Pooling module."""
    from sentence_transformers.sentence_transformer.modules import Pooling

    from embindex.models.st_modules import pool

    torch.manual_seed(2)
    lengths, width = [7, 4, 3], 7
    hidden = torch.randn(3, width, 5)
    mask = torch.zeros(3, width, dtype=torch.long)
    for b, n in enumerate(lengths):
        mask[b, :n] = 1 if side == "right" else 0
        if side == "left":
            mask[b, width - n:] = 1
    for include_prompt, prompt_length in ((True, 0), (False, 2)):
        ref = Pooling(5, pooling_mode=mode, include_prompt=include_prompt)(
            {"token_embeddings": hidden, "attention_mask": mask, "prompt_length": prompt_length})
        got = pool(hidden, mask, (mode,), torch.full((3,), prompt_length))
        assert torch.allclose(got, ref["sentence_embedding"], atol=1e-6), (include_prompt, side)


def test_do_lower_case(tmp_path, minilm_path):
    """sentence_bert_config.json do_lower_case on a tokenizer that does not lowercase."""
    cased = _tiny_bert(str(tmp_path / "cased"), minilm_path, do_lower_case=False)
    path = make_st(tmp_path / "lc", cased)
    (tmp_path / "lc" / "sentence_bert_config.json").write_text(json.dumps(
        {"max_seq_length": MAX_LEN, "do_lower_case": True}))
    texts = ["HELLO World", "The Quick Brown FOX"]
    got = assert_parity(path, texts=texts)
    assert np.abs(got - ours(path, [t.lower() for t in texts])[0]).max() < TOL


def test_minilm_matches_sentence_transformers(minilm_path):
    """The bundled MiniLM (Transformer, mean Pooling, Normalize; max_seq_length 256)."""
    texts = [d["text"] for d in sample_docs(3)] + ["short", "", "x " * 300]
    got = assert_parity(minilm_path, "document", texts)
    assert np.allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    info = load_family(ModelSpec(name="hf-encoder", path=minilm_path)).info()
    assert (info.dim, info.max_length, info.pooling, info.prefixes) == (384, 256, "mean", {})


def test_configured_pooling_overrides_the_checkpoints(tmp_path, base):
    path = make_st(tmp_path / "o", base, pooling="mean", normalize=True)
    info = load_family(ModelSpec(name="hf-encoder", path=path, pooling="cls")).info()
    assert info.pooling == "cls"


def _with_modules(tmp_path, base, extra: list[dict]) -> str:
    path = make_st(tmp_path / "u", base)
    modules = json.loads((tmp_path / "u" / "modules.json").read_text())
    (tmp_path / "u" / "modules.json").write_text(json.dumps(modules + extra))
    return path


@pytest.mark.parametrize("type_", ["sentence_transformers.models.LayerNorm", "my_package.heads.CustomHead",
                                   "sentence_transformers.sentence_transformer.modules.cnn.CNN"])
def test_unsupported_module_is_a_clear_error(tmp_path, base, type_):
    path = _with_modules(tmp_path, base, [{"idx": 2, "name": "2", "path": "2_X", "type": type_}])
    with pytest.raises(ModelError, match=f"unsupported sentence-transformers module {type_} in modules.json"):
        load_family(ModelSpec(name="hf-encoder", path=path))


def test_word_embeddings_instead_of_transformer(tmp_path, base):
    path = make_st(tmp_path / "w", base)
    modules = json.loads((tmp_path / "w" / "modules.json").read_text())
    modules[0]["type"] = "sentence_transformers.models.WordEmbeddings"
    (tmp_path / "w" / "modules.json").write_text(json.dumps(modules))
    with pytest.raises(ModelError, match="unsupported sentence-transformers module "
                                         "sentence_transformers.models.WordEmbeddings in modules.json"):
        load_family(ModelSpec(name="hf-encoder", path=path))


def test_bad_checkpoints_fail_at_load(tmp_path, base):
    path = make_st(tmp_path / "b", base, dense=[(16, torch.nn.Tanh(), True)])
    dense_cfg = tmp_path / "b" / "2_Dense" / "config.json"
    good = json.loads(dense_cfg.read_text())
    dense_cfg.write_text(json.dumps(dict(good, activation_function="my_package.Swish")))
    with pytest.raises(ModelError, match="activation_function 'my_package.Swish'"):
        load_family(ModelSpec(name="hf-encoder", path=path))
    dense_cfg.write_text(json.dumps(dict(good, in_features=64)))
    with pytest.raises(ModelError, match="in_features 64"):
        load_family(ModelSpec(name="hf-encoder", path=path))
    dense_cfg.write_text(json.dumps(dict(good, out_features=12)))  # config and weights disagree
    fam = load_family(ModelSpec(name="hf-encoder", path=path))
    with pytest.raises(ModelError, match="Dense weights do not match"):
        fam.load_encoder("cpu")
    dense_cfg.write_text(json.dumps(good))
    st_cfg = tmp_path / "b" / "config_sentence_transformers.json"
    st_cfg.write_text(json.dumps({"prompts": {"query": "q: "}, "default_prompt_name": "missing"}))
    with pytest.raises(ModelError, match="default_prompt_name 'missing'"):
        load_family(ModelSpec(name="hf-encoder", path=path))
    os.remove(st_cfg)
    bert_cfg = tmp_path / "b" / "sentence_bert_config.json"
    bert_cfg.write_text(json.dumps(dict(json.loads(bert_cfg.read_text()), query_length=32)))
    with pytest.raises(ModelError, match="query_length"):
        load_family(ModelSpec(name="hf-encoder", path=path))


def test_without_modules_json_keeps_plain_model(tmp_path, base):
    """No modules.json: AutoModel + configured pooling (auto: mean), even next to ST module folders."""
    path = tmp_path / "plain"
    shutil.copytree(make_st(tmp_path / "s", base, dense=[(16, torch.nn.Tanh(), True)], normalize=True), path)
    os.remove(path / "modules.json")
    got, fam = ours(str(path), max_length=MAX_LEN)  # 6.x saves the length in tokenizer_config.json only
    assert (fam.info().pooling, fam.info().dim) == ("mean", HIDDEN)
    bare = make_st(tmp_path / "bare", base)  # Transformer + mean Pooling only: the same vectors
    assert np.abs(got - reference(bare)).max() < TOL
