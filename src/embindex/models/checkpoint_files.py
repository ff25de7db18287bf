"""Reading a checkpoint directory: its JSON files, tokenizer.json, safetensors weights checked against the
model's tensors, and the hash of the files a family loads."""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Callable, Sequence

import torch

from .base import ModelError


def read_json(path: str) -> dict[str, Any] | None:
    """A checkpoint's JSON file, or None when it is absent."""
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def load_tokenizer_file(path: str, max_length: int) -> Any:
    """`<path>/tokenizer.json` as a `tokenizers.Tokenizer`, no padding, truncation at `max_length`."""
    from tokenizers import Tokenizer

    tok_file = os.path.join(path, "tokenizer.json")
    if not os.path.exists(tok_file):
        raise ModelError(f"{path}: no tokenizer.json")
    tok = Tokenizer.from_file(tok_file)
    tok.no_padding()
    tok.enable_truncation(max_length=max_length)
    return tok


def read_config(path: str) -> dict[str, Any]:
    """`<path>/config.json`, or a ModelError saying the directory is not a checkpoint."""
    cfg = read_json(os.path.join(path, "config.json"))
    if cfg is None:
        raise ModelError(f"{path}: no config.json; not a Hugging Face checkpoint directory")
    return cfg


def safetensors_files(path: str) -> list[str]:
    """The checkpoint's weight files: the sharded index's, else `model.safetensors`, else every
    .safetensors file. Pickled weights are refused, never loaded."""
    index = read_json(os.path.join(path, "model.safetensors.index.json"))
    if index is not None:
        return [os.path.join(path, f) for f in sorted(set(index["weight_map"].values()))]
    if os.path.exists(os.path.join(path, "model.safetensors")):
        return [os.path.join(path, "model.safetensors")]  # other files there (e.g. test data) are not weights
    found = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    if found:
        return [os.path.join(path, f) for f in found]
    pickles = [f for f in os.listdir(path) if f.endswith((".bin", ".pt", ".pth"))]
    hint = f" (found {pickles}; pickled weights are not loaded, convert them to safetensors)" if pickles else ""
    raise ModelError(f"{path}: no .safetensors weights{hint}")


def load_checked_state(path: str, expected: dict[str, torch.Tensor], rename: Callable[[str], str | None],
                       dtype: torch.dtype | None, device: torch.device | None, layout: str) -> dict[str, torch.Tensor]:
    """Read the checkpoint's safetensors into the model's key names and check them against `expected`:
    `rename(key)` gives the model name (None: an ignored tensor); shapes (from the file headers) must
    match; nothing may be missing or left over. Floating tensors are cast to `dtype`; with `dtype=None`
    only the headers are read (validation at load time) and an empty dict is returned."""
    from safetensors import safe_open

    state: dict[str, torch.Tensor] = {}
    seen: set[str] = set()
    unexpected: list[str] = []
    for file in safetensors_files(path):
        with safe_open(file, framework="pt", device="cpu") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is not iterable)
                name = rename(key)
                if name is None:
                    continue
                if name not in expected:
                    unexpected.append(key)
                    continue
                shape = tuple(f.get_slice(key).get_shape())
                if shape != tuple(expected[name].shape):
                    raise ModelError(
                        f"{path}: tensor {key} has shape {shape}, config.json implies {tuple(expected[name].shape)}"
                    )
                seen.add(name)
                if dtype is not None:
                    t = f.get_tensor(key)
                    state[name] = t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype)
    missing = sorted(set(expected) - seen)
    if missing or unexpected:
        raise ModelError(
            f"{path}: not a {layout} checkpoint in the expected layout; "
            f"missing {len(missing)} tensors {missing[:5]}, unexpected {len(unexpected)} {unexpected[:5]}"
        )
    return state


def loaded_files(paths: Sequence[str], patterns: Sequence[str]) -> list[str]:
    """The checkpoint files a family loads, in the given order: names ending in one of `patterns`, and a
    `pytorch_model.bin` only in a folder without safetensors (then it is what gets loaded, read with
    `torch.load(weights_only=True)`; beside safetensors it is a duplicate never read)."""
    has_safetensors = {os.path.dirname(p) for p in paths if p.endswith(".safetensors")}
    return [p for p in paths if p.endswith(tuple(patterns))
            or (os.path.basename(p) == "pytorch_model.bin" and os.path.dirname(p) not in has_safetensors)]


def checkpoint_hash(path: str, patterns: Sequence[str] = (".json", ".safetensors", ".txt", ".model")) -> str:
    """sha256 over the checkpoint's config, tokenizer and weight files (names and contents; `loaded_files`)."""
    h = hashlib.sha256()
    for root, dirs, files in os.walk(path):
        dirs.sort()
        for full in loaded_files([os.path.join(root, name) for name in sorted(files)], patterns):
            h.update(os.path.relpath(full, path).encode())
            with open(full, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
    return "sha256:" + h.hexdigest()


def check_no_meta_tensors(module: torch.nn.Module, path: str) -> None:
    """After loading with `assign=True` into a meta-device module: every parameter and buffer is real."""
    left = [n for n, t in list(module.named_parameters()) + list(module.named_buffers()) if t.is_meta]
    if left:
        raise ModelError(f"{path}: tensors left uninitialised after loading: {left[:5]}")
