"""The configured outputs against the model: the checks before any worker starts, the late-chunking
window overlap, and the manifest's outputs entry."""

from __future__ import annotations

from typing import Any

from .config import JobConfig


def window_overlap(cfg: JobConfig, window: int) -> int:
    lc = cfg.outputs.late_chunking
    return lc.window_overlap if lc and lc.window_overlap is not None else min(256, window // 4)


def check_outputs(cfg: JobConfig, info: Any) -> None:
    """Fail before any worker starts when the model cannot produce the configured outputs."""
    mode = cfg.outputs.mode
    multi = bool(info.extra.get("multi_vector"))  # multi-vector only (ColBERT)
    if multi and mode != "multivector":
        raise ValueError(f"model family {info.family!r} is multi-vector: set outputs.multivector")
    if mode == "multivector" and not (multi or info.extra.get("multi_vector_capable")):
        raise ValueError(f"model family {info.family!r} has no multi-vector output")
    if mode == "late" and info.pooling != "mean":
        raise ValueError(f"late chunking needs a mean-pooling model; {info.family!r} pools with {info.pooling!r}")
    lc = cfg.outputs.late_chunking
    if lc is not None and lc.window_overlap is not None and lc.window_overlap >= (lc.window or info.max_length):
        raise ValueError("outputs.late_chunking.window_overlap must be smaller than the window")


def check_offsets(cfg: JobConfig, family: Any) -> None:
    """Late chunking and the "tokens" chunker map chunks through token offsets: refuse, before any worker
    starts, a tokenizer that gives none."""
    out = cfg.outputs
    what = ("outputs.late_chunking" if out.late_chunking is not None else
            "outputs.chunking.chunker: tokens" if out.chunking is not None and out.chunking.chunker == "tokens"
            else None)
    if what and not family.load_tokenizer().has_offsets:
        raise ValueError(f"{what} needs token offsets, which the {family.name!r} tokenizer does not give; "
                         f"use outputs.chunking with chunker: sentences or paragraphs")


def outputs_entry(cfg: JobConfig, info: Any, window: int, tokens: int,
                  token_index: dict[str, Any] | None) -> dict[str, Any]:
    """What the manifest records about the outputs: the mode, its settings and multi-vector storage."""
    entry: dict[str, Any] = {"mode": cfg.outputs.mode, **cfg.outputs.model_dump(mode="json")}
    if cfg.outputs.late_chunking is not None:
        entry["late_chunking"].update(window=window, window_overlap=window_overlap(cfg, window))
    if cfg.outputs.multivector is not None:
        dim = info.token_dim or info.dim
        entry["multivector"].update(
            dim=dim, codec="float16", column="token_vectors", tokens=tokens, bytes_per_token=2 * dim,
            score="maxsim",
        )
        if token_index is not None:
            entry["multivector"]["token_index"] = token_index
    return entry
