"""ReaderLM-v2: HTML -> Markdown (or JSON with a schema) with a Qwen2 causal decoder (jinaai/ReaderLM-v2).

Facts (the model card's "Local Usage" recipe and the checkpoint's files):

* Model: `Qwen2ForCausalLM` (1.5B: hidden 1536, 28 layers, 12 q / 2 KV heads, rope_theta 5e6), run here as
  transformers' native class built from config.json (no remote code). Weights are read with safetensors in the
  Qwen2 key layout (`model.*`); `lm_head` is tied to `model.embed_tokens` (`tie_word_embeddings`), as transformers
  ties it. The real file also stores an `lm_head.weight`: with tied embeddings it is accepted and ignored (shape
  not read), like transformers does; with untied embeddings it is required.
* Pre-cleaning (`clean_html`): five `re.sub(..., "")` with IGNORECASE | MULTILINE | DOTALL, in order: script,
  style, meta, comment, link elements (non-greedy; a whole `<meta ...>` / `<link ...>` tag goes wherever it is).
  Then, optionally, SVG content -> `this is a placeholder` (tags kept; DOTALL only, so case-sensitive) and base64
  `<img src="data:image/...">` -> `<img src="#"/>` (no flags: an upper-case `<IMG SRC=...>` stays). Nothing else.
* Prompt (`create_prompt`): `{instruction}\\n```html\\n{html}\\n```` with the default instruction below; with a
  schema the instruction is always the JSON one (a custom instruction is ignored, as on the card) and
  `\\nThe JSON schema is as follows:```json\\n{schema}\\n```` follows. The user message goes through the
  checkpoint's ChatML chat template, which inserts Jina's system line; the template is checked at load time to
  render exactly what `create_prompt` builds.
* Tokens: the prompt is encoded without added special tokens (`<|im_start|>` / `<|im_end|>` in the text become
  single ids). Decoding is greedy with `repetition_penalty=1.08` applied to the raw logits of every id already in
  the sequence, prompt included (logit > 0 divided by 1.08, otherwise multiplied), then argmax. Generation stops
  after emitting an id of generation_config.json's `eos_token_id` (`<|im_end|>`, `<|endoftext|>`); the stop id
  is part of the output ids. `text` is the decode with special tokens skipped.

Our choices:

* Context rule: a prompt may use at most `max_input_tokens` tokens (option; default and upper bound:
  `max_position_embeddings - max_new_tokens`). A longer prompt keeps the first tokens of the cleaned HTML (the HTML
  is tokenized alone, cut, decoded and the prompt rebuilt, so the instruction, the closing fence and the chat
  wrapper stay intact; a cut inside a multi-byte character decodes to U+FFFD) and is flagged `truncated`.
* Batches: left padding with an attention mask and position ids counted from each row's first real token, one
  KV cache per batch, our own greedy loop. The penalty counts only each row's real ids. transformers' penalty
  processor without padding information (as older `generate`, e.g. 4.46.2 of the checkpoint's files, used it)
  also penalizes the pad id of left-padded rows; the pad id (`<|endoftext|>`) is a stop id, so a padded row could
  then stop later than the same input run alone (5.23 passes the padding lengths and skips them). Our loop does
  not depend on the version: batched output equals single runs (up to float noise in the logits).
"""

from __future__ import annotations

import os
import re
from typing import Any, Sequence

import torch

from .base import ModelError
from .checkpoint_files import check_no_meta_tensors, load_checked_state, load_tokenizer_file, read_config, read_json
from .generator import Generation, GenerationInput, Generator, GeneratorInfo, greedy_decode, length_batches

DEFAULT_INSTRUCTION = "Extract the main content from the given HTML and convert it to Markdown format."
JSON_INSTRUCTION = ("Extract the specified information from a list of news threads and present it in a structured "
                    "JSON format.")
SYSTEM_LINE = "You are an AI assistant developed by Jina AI."
REPETITION_PENALTY = 1.08  # the card's `generate(..., repetition_penalty=1.08)`, same as generation_config.json

_FLAGS = re.IGNORECASE | re.MULTILINE | re.DOTALL
_REMOVE = [
    re.compile(r"<[ ]*script.*?\/[ ]*script[ ]*>", _FLAGS),
    re.compile(r"<[ ]*style.*?\/[ ]*style[ ]*>", _FLAGS),
    re.compile(r"<[ ]*meta.*?>", _FLAGS),
    re.compile(r"<[ ]*!--.*?--[ ]*>", _FLAGS),
    re.compile(r"<[ ]*link.*?>", _FLAGS),
]
_SVG = re.compile(r"(<svg[^>]*>)(.*?)(<\/svg>)", re.DOTALL)
_BASE64_IMG = re.compile(r'<img[^>]+src="data:image/[^;]+;base64,[^"]+"[^>]*>')


def clean_html(html: str, clean_svg: bool = False, clean_base64: bool = False) -> str:
    """The card's pre-cleaning: drop script/style/meta/comment/link, optionally blank SVGs and base64 images."""
    for pattern in _REMOVE:
        html = pattern.sub("", html)
    if clean_svg:
        html = _SVG.sub(r"\1this is a placeholder\3", html)
    if clean_base64:
        html = _BASE64_IMG.sub('<img src="#"/>', html)
    return html


def user_message(html: str, instruction: str | None = None, schema: str | None = None) -> str:
    """The card's user message: instruction + fenced HTML (+ the schema in JSON mode)."""
    if schema is not None:
        return f"{JSON_INSTRUCTION}\n```html\n{html}\n```\nThe JSON schema is as follows:```json\n{schema}\n```"
    return f"{instruction or DEFAULT_INSTRUCTION}\n```html\n{html}\n```"


def chatml(content: str) -> str:
    """ReaderLM-v2's chat template for one user message, with the generation prompt."""
    return (f"<|im_start|>system\n{SYSTEM_LINE}<|im_end|>\n"
            f"<|im_start|>user\n{content}<|im_end|>\n<|im_start|>assistant\n")


def create_prompt(html: str, instruction: str | None = None, schema: str | None = None) -> str:
    """The full chat-templated prompt for (already cleaned) HTML, as the card's `create_prompt` renders it."""
    return chatml(user_message(html, instruction, schema))


def render_chat_template(template: str, content: str) -> str:
    """`template` rendered by transformers' chat-template machinery for one user message + generation prompt."""
    from transformers.utils.chat_template_utils import render_jinja_template

    rendered, _ = render_jinja_template([[{"role": "user", "content": content}]], chat_template=template,
                                        add_generation_prompt=True)
    return rendered[0]


def _ids(value: Any) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in (value if isinstance(value, list) else [value])]


class ReaderLMV2(Generator):
    """`ReaderLM-v2`: cleaned HTML -> Markdown, or JSON following `schema`."""

    name = "readerlm-v2"
    modalities = ("text",)
    fp16_safe = False  # Qwen2 decoder: float16 activations overflow
    options = ("instruction", "schema", "clean_svg", "clean_base64", "max_input_tokens")

    def __init__(self, path: str, device: str | torch.device | None = None, dtype: str = "auto",
                 force_dtype: bool = False, **options: Any):
        super().__init__(path, device, dtype, force_dtype, **options)
        self.config = read_config(path)
        archs = self.config.get("architectures") or []
        if self.config.get("model_type") != "qwen2" or "Qwen2ForCausalLM" not in archs:
            raise ModelError(f"{path}: model_type {self.config.get('model_type')!r}, architectures {archs}; "
                             f"{self.name} expects 'qwen2' / Qwen2ForCausalLM")
        self.instruction: str | None = options.get("instruction")
        self.schema: str | None = options.get("schema")
        self.clean_svg = bool(options.get("clean_svg", False))
        self.clean_base64 = bool(options.get("clean_base64", False))
        self.context_length = int(self.config["max_position_embeddings"])
        self.max_input_tokens = options.get("max_input_tokens")
        if self.max_input_tokens is not None:
            self.max_input_tokens = int(self.max_input_tokens)
            if not 0 < self.max_input_tokens < self.context_length:
                raise ModelError(f"{self.name}: max_input_tokens must be in [1, {self.context_length})")
        self.repetition_penalty = REPETITION_PENALTY
        self.tok = load_tokenizer_file(path, 1)
        self.tok.no_truncation()
        if self.tok.get_vocab_size(with_added_tokens=True) > int(self.config["vocab_size"]):
            raise ModelError(f"{path}: the tokenizer has more ids than config.json's vocab_size")
        self._check_chat_template(path)
        gen_cfg = read_json(os.path.join(path, "generation_config.json")) or {}
        self.stop_ids = _ids(gen_cfg.get("eos_token_id")) or _ids(self.config.get("eos_token_id"))
        if not self.stop_ids:
            raise ModelError(f"{path}: no eos_token_id in generation_config.json or config.json")
        pad = _ids(gen_cfg.get("pad_token_id")) or self.stop_ids
        self.pad_id = pad[0]  # only fills padding positions, which are masked out
        self.model = self._load_model(path)

    # -- loading --------------------------------------------------------------------------------------------

    def _check_chat_template(self, path: str) -> None:
        """The checkpoint's tokenizer must have single special ChatML tokens and ReaderLM-v2's chat template."""
        for marker in ("<|im_start|>", "<|im_end|>"):
            ids = self.tok.encode(marker, add_special_tokens=False).ids
            if len(ids) != 1 or self.tok.token_to_id(marker) != ids[0]:
                raise ModelError(f"{path}: the tokenizer has no single token {marker!r}; not a {self.name} tokenizer")
        template = (read_json(os.path.join(path, "tokenizer_config.json")) or {}).get("chat_template")
        if not isinstance(template, str):
            raise ModelError(f"{path}: tokenizer_config.json has no chat_template; not a {self.name} checkpoint")
        probe = user_message("<p>probe</p>", "probe instruction")
        if render_chat_template(template, probe) != chatml(probe):
            raise ModelError(f"{path}: the chat template does not render ReaderLM-v2's ChatML prompt "
                             f"(system line {SYSTEM_LINE!r})")

    def _load_model(self, path: str) -> torch.nn.Module:
        """Qwen2ForCausalLM (self.dtype) from the checkpoint's safetensors, names and shapes checked."""
        from transformers import Qwen2Config, Qwen2ForCausalLM
        from transformers.models.qwen2.modeling_qwen2 import Qwen2RotaryEmbedding

        config = Qwen2Config.from_pretrained(path, local_files_only=True)
        config._attn_implementation = "sdpa"
        tied = bool(config.tie_word_embeddings)
        with torch.device("meta"):  # no random init; real tensors are assigned below
            model = Qwen2ForCausalLM(config)
        expected = dict(model.state_dict())
        if tied:
            expected.pop("lm_head.weight")

        def rename(key: str) -> str | None:
            return None if tied and key == "lm_head.weight" else key

        state = load_checked_state(path, expected, rename, self.dtype, self.device, self.name)
        model.load_state_dict(state, strict=not tied, assign=True)
        if tied:
            model.lm_head.weight = model.model.embed_tokens.weight
        model.model.rotary_emb = Qwen2RotaryEmbedding(config).to(self.device)  # non-persistent buffers
        check_no_meta_tensors(model, path)
        return model.eval()

    # -- prompts --------------------------------------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=True)

    def prompt_ids(self, cleaned: str, max_input_tokens: int) -> tuple[list[int], bool]:
        """(prompt ids, truncated) for cleaned HTML under the context rule (see the module docstring)."""
        ids = self.encode(create_prompt(cleaned, self.instruction, self.schema))
        if len(ids) <= max_input_tokens:
            return ids, False
        html_ids = self.encode(cleaned)
        keep = len(html_ids) - (len(ids) - max_input_tokens)
        while True:  # token counts are not exactly additive at the cut: shrink until the prompt fits
            keep = max(keep, 0)
            ids = self.encode(create_prompt(self.tok.decode(html_ids[:keep], skip_special_tokens=False),
                                            self.instruction, self.schema))
            if len(ids) <= max_input_tokens or keep == 0:
                break
            keep -= len(ids) - max_input_tokens
        if len(ids) > max_input_tokens:
            raise ModelError(f"{self.name}: max_input_tokens {max_input_tokens} leaves no room for HTML "
                             f"(the prompt without HTML takes {len(ids)} tokens)")
        return ids, True

    # -- generation -----------------------------------------------------------------------------------------

    @torch.inference_mode()
    def greedy(self, rows: Sequence[Sequence[int]], max_new_tokens: int) -> list[tuple[list[int], bool]]:
        """(new ids, stopped on a stop id) per prompt: one left-padded batch, KV cache, greedy with the penalty."""
        n, width = len(rows), max(len(r) for r in rows)
        dev = self.device
        input_ids = torch.full((n, width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((n, width), dtype=torch.long)
        for i, r in enumerate(rows):
            input_ids[i, width - len(r):] = torch.tensor(r, dtype=torch.long)
            mask[i, width - len(r):] = 1
        input_ids, mask = input_ids.to(dev), mask.to(dev)
        vocab = int(self.config["vocab_size"])
        counts = torch.zeros((n, vocab), dtype=torch.long, device=dev)
        seen = counts.scatter_add_(1, input_ids, mask) > 0  # ids in each row's real tokens (padding adds 0)
        state = {"mask": mask, "positions": (mask.cumsum(1) - 1).clamp(min=0), "cache": None}

        def forward(ids: torch.Tensor) -> torch.Tensor:
            res = self.model(input_ids=ids, attention_mask=state["mask"], position_ids=state["positions"],
                             past_key_values=state["cache"], use_cache=True, logits_to_keep=1)
            state["cache"] = res.past_key_values
            return res.logits[:, -1].float()

        def step(nxt: torch.Tensor) -> torch.Tensor:
            state["mask"] = torch.cat([state["mask"], torch.ones((n, 1), dtype=mask.dtype, device=dev)], 1)
            state["positions"] = state["positions"][:, -1:] + 1
            return forward(nxt[:, None])

        def penalty(logits: torch.Tensor) -> torch.Tensor:
            penalized = torch.where(logits > 0, logits / self.repetition_penalty, logits * self.repetition_penalty)
            return torch.where(seen, penalized, logits)

        def chosen(nxt: torch.Tensor) -> None:
            seen[torch.arange(n, device=dev), nxt] = True

        return greedy_decode(forward(input_ids), step, self.stop_ids, self.pad_id, max_new_tokens, penalty, chosen)

    def generate(self, inputs: Sequence[GenerationInput], max_new_tokens: int,
                 batch_tokens: int | None = None) -> list[Generation]:
        """One Generation per input (see the module docstring for the context rule and batching).

        Rejects: `no_html` (no text), `empty_after_cleaning` (only whitespace left after `clean_html`)."""
        if max_new_tokens < 1 or max_new_tokens >= self.context_length:
            raise ModelError(f"{self.name}: max_new_tokens must be in [1, {self.context_length})")
        limit = self.context_length - max_new_tokens
        if self.max_input_tokens is not None:
            limit = min(limit, self.max_input_tokens)
        results: list[Generation | None] = [None] * len(inputs)
        prompts: dict[int, list[int]] = {}
        for i, item in enumerate(inputs):
            if item.text is None:
                results[i] = Generation(reject="no_html")
                continue
            cleaned = clean_html(item.text, self.clean_svg, self.clean_base64)
            if not cleaned.strip():
                results[i] = Generation(reject="empty_after_cleaning")
                continue
            ids, truncated = self.prompt_ids(cleaned, limit)
            prompts[i] = ids
            results[i] = Generation(prompt_tokens=len(ids), truncated=truncated)
        todo = list(prompts)
        for batch in length_batches([len(prompts[i]) for i in todo], max_new_tokens, batch_tokens):
            rows = [todo[b] for b in batch]
            for i, (ids, finished) in zip(rows, self.greedy([prompts[i] for i in rows], max_new_tokens)):
                gen = results[i]
                gen.ids, gen.finished, gen.text = ids, finished, self.decode(ids)
        return results  # type: ignore[return-value]

    def info(self) -> GeneratorInfo:
        return GeneratorInfo(
            family=self.name,
            checkpoint=self._checkpoint_hash(),
            context_length=self.context_length,
            modalities=["text"],
            output="json" if self.schema is not None else "markdown",
            extra={
                "instruction": JSON_INSTRUCTION if self.schema is not None else self.instruction or DEFAULT_INSTRUCTION,
                "schema": self.schema,
                "clean_svg": self.clean_svg,
                "clean_base64": self.clean_base64,
                "max_input_tokens": self.max_input_tokens,
                "repetition_penalty": self.repetition_penalty,
                "stop_ids": list(self.stop_ids),
                "dtype": str(self.dtype).removeprefix("torch."),
            },
        )
