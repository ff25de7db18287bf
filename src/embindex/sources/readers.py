"""Corpus readers: Parquet, JSONL (optionally gzipped), folders of text and/or image files, HTML files and
WARC web archives (`web.py`), local or object storage,
through Ray Data with pyarrow filesystems. A corpus is planned into fragments (`fragments.py`) and read
as a dataset of normalized rows (`normalize.NORMALIZED_SCHEMA` + `fragment`), documents and rejects alike."""

from __future__ import annotations

import os
import posixpath
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import ray.data

from ..config import SourceConfig
from ..storage import arrow_filesystem, fsspec_filesystem, is_remote, scheme_of, strip_scheme
from .fragments import Fragment, plan_fragments, read_fragment
from .normalize import RowRules, to_table

FORMAT_EXTENSIONS = {
    "parquet": (".parquet", ".pq"),
    "jsonl": (".jsonl", ".jsonl.gz", ".ndjson", ".ndjson.gz", ".json", ".json.gz"),
    "warc": (".warc", ".warc.gz"),
}


def rules_for(cfg: SourceConfig) -> RowRules:
    return RowRules(
        id_column=cfg.id_column,
        text_column=cfg.text_column,
        metadata_columns=tuple(cfg.metadata_columns) if cfg.metadata_columns is not None else None,
        max_text_bytes=cfg.max_text_bytes,
        image_column=cfg.image_column,
        image_root=strip_scheme(cfg.image_root) if cfg.image_root else None,
        max_image_bytes=cfg.max_image_bytes,
        image_extensions=tuple(e.lower() for e in cfg.image_extensions),
    )


# bundled data: the sample corpus, and a query set with graded judgments written for it
BUILTIN_CORPORA = {"sample-corpus": "sample_corpus.jsonl.gz", "sample-queries": "sample_queries.jsonl",
                   "sample-qrels": "sample_qrels.tsv"}


def resolve_source_uri(uri: str) -> str:
    """`builtin:sample-corpus` (stdlib docstrings), `builtin:sample-queries` / `builtin:sample-qrels` (a query
    set for it) -> the bundled file; other URIs unchanged."""
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


def _extensions(fmt: str, cfg: SourceConfig) -> tuple[str, ...]:
    text, images = tuple(cfg.text_extensions), tuple(e.lower() for e in cfg.image_extensions)
    html = tuple(e.lower() for e in cfg.html_extensions)
    return FORMAT_EXTENSIONS.get(fmt) or {"text": text, "images": images, "mixed": text + images, "html": html}[fmt]


def detect_format(cfg: SourceConfig, files: list[str]) -> str:
    """parquet | jsonl | warc | html | text | images, or mixed for a folder of text and image files."""
    if cfg.format != "auto":
        return cfg.format
    lower = [f.lower() for f in files]
    for fmt in ("parquet", "jsonl", "warc", "html", "text", "images", "mixed"):
        if all(f.endswith(_extensions(fmt, cfg)) for f in lower):
            return fmt
    kinds = sorted({os.path.splitext(f)[1] or "(none)" for f in files})
    raise ValueError(
        f"cannot tell the format of {cfg.uri!r} from its file extensions {kinds}; set source.format "
        "to parquet, jsonl, text, images, mixed, html or warc"
    )


def _select(files: list[str], fmt: str, cfg: SourceConfig) -> list[str]:
    exts = _extensions(fmt, cfg)
    chosen = [f for f in files if f.lower().endswith(exts)]
    if not chosen:
        raise FileNotFoundError(f"no {fmt} files ({', '.join(exts)}) under {cfg.uri!r}")
    return chosen


def _read_batch(batch: pa.Table, fs: Any, rules: RowRules, root: str) -> pa.Table:
    tables = [read_fragment(Fragment.from_json(j), fs, rules, root) for j in batch.column("fragment").to_pylist()]
    return pa.concat_tables(tables) if tables else to_table([])


@dataclass
class Corpus:
    """A planned corpus: its files, format and fragments, and how to read fragments as a Ray dataset."""

    uri: str
    format: str
    files: list[str]
    fragments: list[Fragment]
    fs: Any
    rules: RowRules
    root: str

    def dataset(self, fragments: list[Fragment] | None = None) -> ray.data.Dataset:
        """Normalized rows of the given fragments (default: all); one Ray Data block per fragment."""
        frags = self.fragments if fragments is None else fragments
        items = [{"fragment": f.to_json()} for f in frags]
        ds = ray.data.from_items(items, override_num_blocks=max(1, len(items)))
        return ds.map_batches(_read_batch, batch_size=1, batch_format="pyarrow",
                              fn_kwargs={"fs": self.fs, "rules": self.rules, "root": self.root})


def open_corpus(cfg: SourceConfig) -> Corpus:
    """List, detect the format and plan the fragments of the source."""
    cfg = cfg.model_copy(update={"uri": resolve_source_uri(cfg.uri)})
    if cfg.image_root and scheme_of(cfg.image_root) != scheme_of(cfg.uri):
        raise ValueError(f"source.image_root {cfg.image_root!r} must be on the same store as source.uri")
    files = list_files(cfg)
    fmt = detect_format(cfg, files)
    files = _select(files, fmt, cfg)
    fs = arrow_filesystem(cfg.uri, cfg.storage_options())
    root = strip_scheme(cfg.uri)
    if len(files) == 1 and files[0] == root:
        root = posixpath.dirname(root) if is_remote(cfg.uri) else os.path.dirname(root)
    frags = plan_fragments(fs, files, fmt, cfg.fragment_rows, cfg.fragment_files, cfg.fragment_bytes,
                           cfg.fragment_images, cfg.image_column)
    return Corpus(cfg.uri, fmt, files, frags, fs, rules_for(cfg), root)
