"""jina-reranker-m0: a pairwise multimodal reranker on Qwen2-VL (text and image queries and documents).

Facts (the model repository's `modeling.py`: `JinaVLForRanking.compute_score`, `formatting_prompts_func`; the
tiny fixture's README):

* Backbone: Qwen2-VL-2B (vision tower + merger + Qwen2 decoder with M-RoPE), run here as transformers' native
  `Qwen2VLModel` (SDPA attention) built from config.json (`model_type "qwen2_vl"`; the `auto_map` / remote code
  is never used). Head: `score = Sequential(Linear(h, h), ReLU, Linear(h, 1))`. Weights are read with
  safetensors in the legacy Qwen2-VL key layout the reference writes (`visual.*`, `model.*`, `score.*`) or the
  transformers >= 4.52 one (`model.visual.*`, `model.language_model.*`); the unused `lm_head.weight` (tied to
  the embeddings) is ignored; anything else missing or left over is a ModelError.
* Prompt per pair, no chat template and no special tokens added: `"**Document**:\\n" + D + "\\n**Query**:\\n" + Q`;
  an image D or Q is `<|vision_start|><|image_pad|><|vision_end|>` with `<|image_pad|>` expanded to one token
  per merged 28x28 patch (t*h*w / merge**2). Document first, then query.
* Truncation: a text document is tokenised alone and, when it reaches `max_doc_length` tokens (default
  `max(max_length - max_query_length, max_query_length)`), replaced by its first `max_doc_length` ids decoded
  (a cut inside a multi-byte character gives U+FFFD). The whole prompt is then cut to `max_length - 1` tokens
  from the right (the query goes first). The query is never truncated on its own.
* Score token: id 100 (a plain byte-level token, the same in the real vocabulary) is appended to every row;
  rows are padded on the LEFT (transformers 5 builds M-RoPE positions from the attention mask only through
  `get_rope_index`, which we always call; the reference gives the same scores with either side).
* Images: RGB, Qwen2-VL `smart_resize` with `min_pixels=3136`, `max_pixels=602112` (what `compute_score`
  passes to the processor, whatever preprocessor_config.json says), PIL bicubic, CLIP mean/std
  (`qwen2_vl_images`).
* Score: the last position's final-norm hidden state -> head -> logit; `score = sigmoid(logit - 2.65)`.

Our choices: prompt texts are tokenised with special-token strings read as plain text (a document containing
`<|image_pad|>` cannot inject image tokens); the score head runs in fp32 and the sigmoid in float64 whatever the
backbone dtype; each distinct image goes through the vision tower once per batch (an image query shared by all
pairs is encoded once per batch); a prompt cut inside an image span loses that whole image (the reference
fails there); images are local paths, encoded bytes or PIL images (no URLs).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from ..text.batching import pad_batch, token_budget_batches
from .base import ModelError
from .checkpoint_files import check_no_meta_tensors, load_checked_state, load_tokenizer_file, read_config, read_json
from .jina_embeddings_v4 import base_key  # Qwen-VL key layouts (legacy / transformers >= 4.52) -> 5.x names
from .qwen2_vl_images import QwenVLImageConfig, QwenVLImageProcessor, flatten_patches, load_vl_config
from .images import load_upright_rgb
from .reranker import RerankDoc, Reranker, RerankerInfo

SCORE_TOKEN_ID = 100
LOGIT_BIAS = 2.65
DOC_PREFIX = "**Document**:\n"
QUERY_PREFIX = "\n**Query**:\n"
MIN_PIXELS, MAX_PIXELS = 3136, 602112  # compute_score's processor settings
DEFAULT_MAX_LENGTH = 10240
DEFAULT_MAX_QUERY_LENGTH = 512
DEFAULT_BATCH_SIZE = 8
DEFAULT_BATCH_TOKENS = 32768  # padded tokens per forward (images count their image tokens)
OPTIONS = ("max_length", "max_query_length", "max_doc_length", "batch_size", "batch_tokens", "min_pixels",
           "max_pixels")
TYPES = ("text", "image")


@dataclass
class PairInput:
    """One pair's prompt: token ids (score token included) and its images (keys into the call's image list)."""

    ids: list[int]
    images: list[int]


@dataclass
class Batch:
    """A padded batch as fed to the model."""

    input_ids: torch.Tensor  # [B, L] left padded
    attention_mask: torch.Tensor  # [B, L]
    image_grid_thw: torch.Tensor | None  # [n_images_in_prompt_order, 3]
    image_index: list[int]  # per image in prompt order: its position among the batch's distinct images
    pixel_values: torch.Tensor | None  # flattened patches of the distinct images, concatenated
    distinct_grid_thw: torch.Tensor | None


class _M0Module(nn.Module):
    """Qwen2-VL (no lm_head) + the score head, in the transformers-5 key layout."""

    def __init__(self, config: Any):
        super().__init__()
        from transformers import Qwen2VLModel

        h = int(config.text_config.hidden_size)
        self.model = Qwen2VLModel(config)
        self.score = nn.Sequential(nn.Linear(h, h), nn.ReLU(), nn.Linear(h, 1))


def _qwen2vl_config(path: str) -> Any:
    """Qwen2VLConfig from config.json (legacy flat text fields accepted), SDPA attention everywhere."""
    from transformers import Qwen2VLConfig

    config = load_vl_config(Qwen2VLConfig, path)
    tc = config.text_config
    head_dim = getattr(tc, "head_dim", None) or tc.hidden_size // tc.num_attention_heads
    section = (tc.rope_parameters or {}).get("mrope_section")
    if not section or 2 * sum(section) != head_dim:
        raise ModelError(f"{path}/config.json: rope_scaling.mrope_section {section} must sum to head_dim/2 "
                         f"({head_dim // 2})")
    if int(config.vision_config.hidden_size) != int(tc.hidden_size):
        raise ModelError(f"{path}/config.json: vision_config.hidden_size {config.vision_config.hidden_size} != "
                         f"text hidden_size {tc.hidden_size}")
    return config


def load_m0_module(path: str, config: Any, dtype: torch.dtype, device: torch.device) -> _M0Module:
    """The model with the checkpoint's weights, strictly checked (lm_head ignored); the head in fp32."""
    from transformers.models.qwen2_vl.modeling_qwen2_vl import (
        Qwen2VLRotaryEmbedding,
        Qwen2VLVisionRotaryEmbedding,
    )

    with torch.device("meta"):  # no random init; real tensors are assigned below
        module = _M0Module(config)
    state = load_checked_state(path, module.state_dict(), base_key, dtype, device, "jina-reranker-m0")
    module.load_state_dict(state, strict=True, assign=True)
    # non-persistent rotary buffers, rebuilt off the meta device
    module.model.language_model.rotary_emb = Qwen2VLRotaryEmbedding(config.text_config).to(device)
    module.model.visual.rotary_pos_emb = Qwen2VLVisionRotaryEmbedding(config.vision_config).to(device)
    check_no_meta_tensors(module, path)
    module.score.float()
    return module.eval()


def _split_pairs(pairs: Sequence[Any]) -> list[tuple[Any, Any]]:
    """A single (query, document) pair or a list of them -> list of pairs."""
    if len(pairs) == 2 and not isinstance(pairs[0], (list, tuple)):
        pairs = [pairs]
    out = []
    for p in pairs:
        if not isinstance(p, (list, tuple)) or len(p) != 2:
            raise ModelError(f"compute_score takes (query, document) pairs, got {type(p).__name__}")
        out.append((p[0], p[1]))
    return out


class JinaRerankerM0(Reranker):
    """`jina-reranker-m0`: one forward per (query, document) pair, batched; text and images on both sides.

    Options: `max_length` (10240), `max_query_length` (512), `max_doc_length` (default from those two),
    `batch_size` (8 pairs), `batch_tokens` (32768 padded tokens per forward), `min_pixels` / `max_pixels`
    (3136 / 602112)."""

    name = "jina-reranker-m0"
    fp16_safe = False  # Qwen decoder: float16 activations overflow
    modalities = ("text", "image")

    def __init__(self, path: str, device: str | torch.device | None = None, dtype: str = "auto",
                 force_dtype: bool = False, **options: Any):
        super().__init__(path, device, dtype, force_dtype)
        self.check_options(options, OPTIONS)
        raw = read_config(path)
        if raw.get("model_type") != "qwen2_vl":
            raise ModelError(f"{path}: model_type {raw.get('model_type')!r}; {self.name} expects 'qwen2_vl'")
        self.config = _qwen2vl_config(path)
        self.max_positions = int(self.config.text_config.max_position_embeddings)
        self.max_length = int(options.get("max_length") or DEFAULT_MAX_LENGTH)
        self.max_query_length = int(options.get("max_query_length") or DEFAULT_MAX_QUERY_LENGTH)
        self.max_doc_length = int(options["max_doc_length"]) if options.get("max_doc_length") else None
        self.batch_size = int(options.get("batch_size") or DEFAULT_BATCH_SIZE)
        self.batch_tokens = int(options.get("batch_tokens") or DEFAULT_BATCH_TOKENS)
        self._check_limits(self.max_length, self.max_query_length, self.max_doc_length, self.batch_size)
        if self.batch_tokens < 1:
            raise ModelError(f"{self.name}: batch_tokens must be >= 1")
        image_config = QwenVLImageConfig.from_dir(path, raw.get("vision_config"))
        self.image_config = dataclasses.replace(
            image_config, min_pixels=int(options.get("min_pixels") or MIN_PIXELS),
            max_pixels=int(options.get("max_pixels") or MAX_PIXELS))
        if self.image_config.min_pixels > self.image_config.max_pixels:
            raise ModelError(f"{self.name}: min_pixels {self.image_config.min_pixels} > max_pixels "
                             f"{self.image_config.max_pixels}")
        self.image_processor = QwenVLImageProcessor(self.image_config, text_tokens=0)
        self.tok = self._load_tokenizer(path)
        self._read_token_ids(path, raw)
        self.module = load_m0_module(path, self.config, self.dtype, self.device)
        self._hash: str | None = None

    # -- loading --------------------------------------------------------------------------------------------

    def _check_limits(self, max_length: int, max_query_length: int, max_doc_length: int | None,
                      batch_size: int) -> None:
        if max_length < 2 or max_length > self.max_positions:
            raise ModelError(f"{self.name}: max_length {max_length} must lie within 2..{self.max_positions}")
        if max_query_length < 1 or (max_doc_length is not None and max_doc_length < 1) or batch_size < 1:
            raise ModelError(f"{self.name}: max_query_length, max_doc_length and batch_size must be >= 1")

    @staticmethod
    def _load_tokenizer(path: str) -> Any:
        tok = load_tokenizer_file(path, 1)
        tok.no_truncation()  # texts and prompts are cut by hand (see `pair_input`)
        tok.encode_special_tokens = True  # special-token strings in user texts stay plain text
        if tok.num_special_tokens_to_add(False):
            raise ModelError(f"{path}: the tokenizer adds special tokens; the reranker prompt expects none")
        return tok

    def _read_token_ids(self, path: str, raw: dict[str, Any]) -> None:
        """Vision ids from config.json, checked against the tokenizer; the pad id from tokenizer_config."""
        ids = {}
        for key, token in (("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>"),
                           ("image_token_id", "<|image_pad|>")):
            value = raw.get(key, (raw.get("text_config") or {}).get(key))
            if value is None:
                raise ModelError(f"{path}/config.json: missing {key!r}")
            if self.tok.token_to_id(token) != int(value):
                raise ModelError(f"{path}: config {key} {value} is not the tokenizer's {token} "
                                 f"({self.tok.token_to_id(token)})")
            ids[key] = int(value)
        self.vision_start_id, self.vision_end_id = ids["vision_start_token_id"], ids["vision_end_token_id"]
        self.image_token_id = ids["image_token_id"]
        tok_cfg = read_json(f"{path}/tokenizer_config.json") or {}
        pad = tok_cfg.get("pad_token") or "<|endoftext|>"
        pad = pad.get("content") if isinstance(pad, dict) else pad
        pad_id = self.tok.token_to_id(pad)
        if pad_id is None or pad_id == self.image_token_id:
            raise ModelError(f"{path}: pad token {pad!r} is not a usable token of tokenizer.json")
        self.pad_token_id = int(pad_id)
        vocab = int(self.config.text_config.vocab_size)
        if SCORE_TOKEN_ID >= vocab:
            raise ModelError(f"{path}: vocab_size {vocab} has no score token id {SCORE_TOKEN_ID}")

    # -- inputs ---------------------------------------------------------------------------------------------

    def prepare_image(self, image: Any) -> np.ndarray:
        """A PIL image, local path or encoded bytes -> smart-resized RGB uint8 [H, W, 3]."""
        return self.image_processor(load_upright_rgb(image))

    def image_span(self, pixels: np.ndarray) -> list[int]:
        """`<|vision_start|>`, one `<|image_pad|>` per merged patch, `<|vision_end|>`."""
        n = self.image_processor.image_tokens(int(pixels.shape[0]), int(pixels.shape[1]))
        return [self.vision_start_id] + [self.image_token_id] * n + [self.vision_end_id]

    def truncate_doc(self, text: str, max_doc_length: int) -> str:
        """The document, or its first `max_doc_length` tokens decoded when it reaches that many."""
        ids = self.tok.encode(text, add_special_tokens=False).ids
        if len(ids) >= max_doc_length:
            return self.tok.decode(ids[:max_doc_length], skip_special_tokens=False)
        return text

    def pair_input(self, query: tuple[str, Any], doc: tuple[str, Any], pixels: Sequence[np.ndarray],
                   max_length: int, max_doc_length: int) -> PairInput:
        """One prompt. `query` / `doc` are ("text", str) or ("image", key into `pixels`)."""
        if doc[0] == "text":
            doc = ("text", self.truncate_doc(doc[1], max_doc_length))
        parts = [("text", DOC_PREFIX), doc, ("text", QUERY_PREFIX), query]
        merged: list[tuple[str, Any]] = []
        for kind, value in parts:  # adjacent texts form one string, as in the reference's prompt
            if kind == "text" and merged and merged[-1][0] == "text":
                merged[-1] = ("text", merged[-1][1] + value)
            else:
                merged.append((kind, value))
        ids: list[int] = []
        spans: list[tuple[int, int, int]] = []  # (start, end, image key)
        for kind, value in merged:
            if kind == "text":
                ids += self.tok.encode(value, add_special_tokens=False).ids
            else:
                span = self.image_span(pixels[value])
                spans.append((len(ids), len(ids) + len(span), value))
                ids += span
        cut = max_length - 1
        for start, end, _ in spans:
            if start < cut < end:  # never keep part of an image
                cut = start
        return PairInput(ids[:cut] + [SCORE_TOKEN_ID], [key for _, end, key in spans if end <= cut])

    def build_inputs(self, pairs: Sequence[tuple[tuple[str, Any], tuple[str, Any]]], max_length: int | None = None,
                     max_query_length: int | None = None, max_doc_length: int | None = None
                     ) -> tuple[list[PairInput], list[np.ndarray]]:
        """Typed pairs ((query_type, query), (doc_type, doc)) -> prompts and the distinct prepared images.
        Images are deduplicated by object (or path) identity."""
        max_length = self.max_length if max_length is None else int(max_length)
        max_query_length = self.max_query_length if max_query_length is None else int(max_query_length)
        if max_doc_length is None:
            max_doc_length = self.max_doc_length
        self._check_limits(max_length, max_query_length, max_doc_length, 1)
        if max_doc_length is None:
            max_doc_length = max(max_length - max_query_length, max_query_length)
        pixels: list[np.ndarray] = []
        keys: dict[Any, int] = {}

        def typed(item: tuple[str, Any]) -> tuple[str, Any]:
            kind, value = item
            if kind not in TYPES:
                raise ModelError(f"{self.name}: unknown input type {kind!r}; expected one of {TYPES}")
            if kind == "text":
                if not isinstance(value, str):
                    raise ModelError(f"{self.name}: a text input must be a str, got {type(value).__name__}")
                return item
            key = value if isinstance(value, str) else id(value)
            if key not in keys:
                keys[key] = len(pixels)
                pixels.append(self.prepare_image(value))
            return ("image", keys[key])

        rows = [self.pair_input(typed(q), typed(d), pixels, max_length, int(max_doc_length)) for q, d in pairs]
        return rows, pixels

    def batch(self, rows: Sequence[PairInput], pixels: Sequence[np.ndarray]) -> Batch:
        """Left-padded ids and mask, the images of the rows in prompt order and the distinct ones' patches."""
        ids, mask = pad_batch([np.asarray(r.ids, dtype=np.int64) for r in rows], self.pad_token_id, "left")
        order = [key for r in rows for key in r.images]
        distinct = list(dict.fromkeys(order))
        grids_thw, patches = {}, []
        for key in distinct:
            flat, grid = flatten_patches(pixels[key], self.image_config, self.device)
            patches.append(flat)
            grids_thw[key] = grid
        dev = self.device
        return Batch(
            input_ids=torch.from_numpy(ids).to(dev),
            attention_mask=torch.from_numpy(mask).to(dev),
            image_grid_thw=torch.tensor([grids_thw[k] for k in order], dtype=torch.long, device=dev) if order else None,
            image_index=[distinct.index(k) for k in order],
            pixel_values=torch.cat(patches).to(self.dtype) if patches else None,
            distinct_grid_thw=(torch.tensor([grids_thw[k] for k in distinct], dtype=torch.long, device=dev)
                               if distinct else None),
        )

    # -- model ----------------------------------------------------------------------------------------------

    @torch.inference_mode()
    def last_hidden(self, b: Batch) -> torch.Tensor:
        """[B, hidden] final-norm hidden state at the last position (the score token), fp32."""
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        model = self.module.model
        mm: dict[str, Any] = {}
        if b.pixel_values is not None:
            feats = model.get_image_features(b.pixel_values, b.distinct_grid_thw, return_dict=True).pooler_output
            mm["image"] = BaseModelOutputWithPooling(pooler_output=tuple(feats[i] for i in b.image_index))
        token_type = ((b.input_ids == self.image_token_id) & b.attention_mask.bool()).long()
        position_ids, _ = model.get_rope_index(b.input_ids, mm_token_type_ids=token_type,
                                               image_grid_thw=b.image_grid_thw, attention_mask=b.attention_mask)
        out = model(input_ids=b.input_ids, attention_mask=b.attention_mask, position_ids=position_ids,
                    mm_encoder_outputs=mm or None, use_cache=False)
        return out.last_hidden_state[:, -1].float()

    @torch.inference_mode()
    def head(self, hidden: torch.Tensor) -> np.ndarray:
        """Logits (float64 [B]) of last-position hidden states."""
        return self.module.score(hidden.float()).squeeze(-1).double().cpu().numpy()

    def _run(self, pairs: Sequence[tuple[tuple[str, Any], tuple[str, Any]]], max_length: int | None,
             max_query_length: int | None, max_doc_length: int | None, batch_size: int | None
             ) -> np.ndarray:
        """Logits of typed pairs, in input order, batched by pair count and padded-token budget."""
        batch_size = self.batch_size if batch_size is None else int(batch_size)
        if batch_size < 1:
            raise ModelError(f"{self.name}: batch_size must be >= 1")
        rows, pixels = self.build_inputs(pairs, max_length, max_query_length, max_doc_length)
        logits = np.zeros(len(rows), dtype=np.float64)
        for idx in token_budget_batches([len(r.ids) for r in rows], self.batch_tokens, max_rows=batch_size):
            logits[idx] = self.head(self.last_hidden(self.batch([rows[i] for i in idx], pixels)))
        return logits

    @staticmethod
    def to_scores(logits: np.ndarray) -> np.ndarray:
        """sigmoid(logit - 2.65) in float64."""
        return 1.0 / (1.0 + np.exp(-(np.asarray(logits, dtype=np.float64) - LOGIT_BIAS)))

    def compute_score(self, pairs: Sequence[Any], max_length: int | None = None, max_query_length: int | None = None,
                      max_doc_length: int | None = None, query_type: str = "text", doc_type: str = "text",
                      batch_size: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The reference's `compute_score`: (logits, scores) float64 [n] of (query, document) pairs (or one
        pair). Images are PIL images, local paths or encoded bytes. Limits default to the instance's
        (10240 / 512 / derived / 8 unless set as options)."""
        typed = [((query_type, q), (doc_type, d)) for q, d in _split_pairs(pairs)]
        if not typed:
            return np.zeros(0), np.zeros(0)
        logits = self._run(typed, max_length, max_query_length, max_doc_length, batch_size)
        return logits, self.to_scores(logits)

    # -- the Reranker interface -----------------------------------------------------------------------------

    def _prepare(self, doc: RerankDoc) -> RerankDoc | str:
        """As the base class, and an image whose size Qwen2-VL refuses (aspect ratio > 200) is a reject."""
        out = super()._prepare(doc)
        if isinstance(out, RerankDoc) and out.image is not None:
            try:
                self.image_processor.target_size(out.image.height, out.image.width)
            except ModelError as e:
                return f"image_not_supported: {e}"[:300]
        return out

    @staticmethod
    def _typed(doc: RerankDoc) -> tuple[str, Any]:
        return ("image", doc.image) if doc.image is not None else ("text", doc.text or "")

    def _score(self, query: RerankDoc, docs: list[RerankDoc]) -> np.ndarray:
        q = self._typed(query)
        return self.to_scores(self._run([(q, self._typed(d)) for d in docs], None, None, None, None))

    def info(self) -> RerankerInfo:
        if self._hash is None:
            self._hash = self._checkpoint_hash()
        tc = self.config.text_config
        return RerankerInfo(
            family=self.name,
            checkpoint=self._hash,
            max_length=self.max_length,
            modalities=list(TYPES),
            score=f"sigmoid(logit - {LOGIT_BIAS})",
            extra={
                "model_type": "qwen2_vl",
                "hidden_size": int(tc.hidden_size),
                "prompt": DOC_PREFIX + "{document}" + QUERY_PREFIX + "{query}",
                "score_token_id": SCORE_TOKEN_ID,
                "padding_side": "left",
                "max_query_length": self.max_query_length,
                "max_doc_length": self.max_doc_length or max(self.max_length - self.max_query_length,
                                                             self.max_query_length),
                "batch_size": self.batch_size,
                "batch_tokens": self.batch_tokens,
                "image_min_pixels": self.image_config.min_pixels,
                "image_max_pixels": self.image_config.max_pixels,
                "dtype": str(self.dtype).removeprefix("torch."),
            },
        )
