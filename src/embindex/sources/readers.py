"""Corpus readers: Parquet, JSONL (optionally gzipped) and text-file folders, local or object storage,
through Ray Data with pyarrow filesystems. Each returns a dataset of normalized rows
(`normalize.NORMALIZED_SCHEMA`), documents and rejects alike."""

from __future__ import annotations

import os
import posixpath
from typing import Any

import pyarrow as pa
import ray.data

from ..config import SourceConfig
from ..storage import arrow_filesystem, fsspec_filesystem, is_remote, strip_scheme
from .normalize import (
    Reasons,
    RowRules,
    normalize_record,
    parse_jsonl,
    parse_text_file,
    reject_row,
    to_table,
)

FORMAT_EXTENSIONS = {
    "parquet": (".parquet", ".pq"),
    "jsonl": (".jsonl", ".jsonl.gz", ".ndjson", ".ndjson.gz", ".json", ".json.gz"),
}


def rules_for(cfg: SourceConfig) -> RowRules:
    return RowRules(
        id_column=cfg.id_column,
        text_column=cfg.text_column,
        metadata_columns=tuple(cfg.metadata_columns) if cfg.metadata_columns is not None else None,
        max_text_bytes=cfg.max_text_bytes,
    )


BUILTIN_CORPORA = {"sample-corpus": "sample_corpus.jsonl.gz"}


def resolve_source_uri(uri: str) -> str:
    """`builtin:sample-corpus` -> the bundled sample corpus (stdlib docstrings); other URIs unchanged."""
    if not uri.startswith("builtin:"):
        return uri
    name = uri.split(":", 1)[1]
    if name not in BUILTIN_CORPORA:
        raise ValueError(f"unknown builtin corpus {name!r}; available: {sorted(BUILTIN_CORPORA)}")
    from importlib.resources import files

    return str(files("embindex") / "data" / BUILTIN_CORPORA[name])


def list_files(cfg: SourceConfig) -> list[str]:
    """Files under the source URI (or the URI itself when it is a file), as filesystem paths."""
    fs = fsspec_filesystem(cfg.uri, cfg.storage_options())
    root = strip_scheme(cfg.uri)
    if fs.isfile(root):
        return [root]
    if not fs.exists(root):
        raise FileNotFoundError(f"source.uri {cfg.uri!r} does not exist")
    files = sorted(p for p in fs.find(root) if not posixpath.basename(p).startswith((".", "_")))
    if not files:
        raise FileNotFoundError(f"source.uri {cfg.uri!r} holds no files")
    return files


def detect_format(cfg: SourceConfig, files: list[str]) -> str:
    if cfg.format != "auto":
        return cfg.format
    for fmt, exts in FORMAT_EXTENSIONS.items():
        if all(f.endswith(exts) for f in files):
            return fmt
    if all(f.endswith(tuple(cfg.text_extensions)) for f in files):
        return "text"
    kinds = sorted({os.path.splitext(f)[1] or "(none)" for f in files})
    raise ValueError(
        f"cannot tell the format of {cfg.uri!r} from its file extensions {kinds}; set source.format "
        "to parquet, jsonl or text"
    )


def _select(files: list[str], fmt: str, cfg: SourceConfig) -> list[str]:
    exts = FORMAT_EXTENSIONS.get(fmt, tuple(cfg.text_extensions))
    chosen = [f for f in files if f.endswith(exts)]
    if not chosen:
        raise FileNotFoundError(f"no {fmt} files ({', '.join(exts)}) under {cfg.uri!r}")
    return chosen


def _parquet_batch(batch: pa.Table, rules: RowRules, source: str) -> pa.Table:
    # Strings go through bytes so that invalid UTF-8 becomes a reject, not a crash in to_pylist().
    cols = {}
    for name in batch.column_names:
        col = batch.column(name)
        if pa.types.is_string(col.type) or pa.types.is_large_string(col.type):
            col = col.cast(pa.binary() if pa.types.is_string(col.type) else pa.large_binary())
        cols[name] = col
    raw = pa.table(cols).to_pylist()
    rows = []
    for rec in raw:
        for name, value in rec.items():
            if isinstance(value, bytes) and name != rules.text_column:
                try:
                    rec[name] = value.decode("utf-8")
                except UnicodeDecodeError:
                    rec[name] = value.decode("utf-8", errors="replace") if name != rules.id_column else value
        rid = rec.get(rules.id_column)
        if isinstance(rid, bytes):
            rows.append(reject_row(rid.decode("utf-8", errors="replace"), Reasons.INVALID_UTF8,
                                   "id is not valid UTF-8", source, None))
            continue
        rows.append(normalize_record(rec, rules, source, None))
    return to_table(rows)


def _binary_to_rows(batch: pa.Table, fmt: str, rules: RowRules, root: str) -> pa.Table:
    rows: list[dict[str, Any]] = []
    for data, path in zip(batch.column("bytes").to_pylist(), batch.column("path").to_pylist()):
        if fmt == "jsonl":
            rows.extend(parse_jsonl(data, path, rules))
        else:
            rel = posixpath.relpath(path, root) if path != root else posixpath.basename(path)
            rows.append(parse_text_file(data, path, rel, rules))
    return to_table(rows)


def read_corpus(cfg: SourceConfig) -> tuple[ray.data.Dataset, str, list[str]]:
    """Dataset of normalized rows, the detected format and the files read."""
    cfg = cfg.model_copy(update={"uri": resolve_source_uri(cfg.uri)})
    files = list_files(cfg)
    fmt = detect_format(cfg, files)
    files = _select(files, fmt, cfg)
    fs = arrow_filesystem(cfg.uri, cfg.storage_options())
    rules = rules_for(cfg)
    read_kwargs: dict[str, Any] = {"filesystem": fs}
    if cfg.blocks:
        read_kwargs["override_num_blocks"] = cfg.blocks
    if fmt == "parquet":
        ds = ray.data.read_parquet(files, **read_kwargs)
        source = cfg.uri
        ds = ds.map_batches(_parquet_batch, batch_format="pyarrow", batch_size=4096,
                            fn_kwargs={"rules": rules, "source": source})
    else:
        root = strip_scheme(cfg.uri)
        if len(files) == 1 and files[0] == root:
            root = posixpath.dirname(root) if is_remote(cfg.uri) else os.path.dirname(root)
        ds = ray.data.read_binary_files(files, include_paths=True, **read_kwargs)
        ds = ds.map_batches(_binary_to_rows, batch_format="pyarrow", batch_size=1,
                            fn_kwargs={"fmt": fmt, "rules": rules, "root": root})
    return ds, fmt, files
