"""Shared by the export tests: one small MiniLM index with two versions, built once per test session.

v000001: 300 documents of the bundled corpus in 3 JSONL files (3 shards). v000002 (a reindex): 5 documents
edited, 5 deleted, 20 added. The index lives under pytest's session base temp directory, so every export
test module reuses it (copy it before changing it). Query vectors (MiniLM, query role) are cached next to it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from conftest import job_config, sample_docs

QUERIES = [
    "how do I read a compressed file", "parse a JSON string", "abstract base class registration",
    "list the files in a directory", "send an email message", "format a date as text",
    "split a string into words", "open a network socket", "compute a hash of bytes",
    "sort a list in place", "copy a file", "generate a random number",
]


@dataclass
class SharedIndex:
    uri: str
    corpus: str
    docs: list[dict]
    edited: list[str]
    deleted: list[str]
    added: list[str]
    queries: np.ndarray  # [n, 384] unit query vectors (MiniLM, query role)

    def config(self) -> dict:
        return job_config(self.corpus, self.uri)


def _write(path: Path, docs: list[dict]) -> None:
    path.write_text("".join(json.dumps(d) + "\n" for d in docs))


def shared_index(tmp_path_factory) -> SharedIndex:
    """Build (once per session) or reuse the two-version index; needs the `ray_cluster` fixture."""
    import embindex
    from embindex.reindex import reindex

    root = tmp_path_factory.getbasetemp() / "export-shared"
    corpus, uri = root / "corpus", str(root / "index")
    docs = sample_docs(320)
    base = docs[:300]
    edited = [d["id"] for d in base[100:105]]
    deleted = [d["id"] for d in base[105:110]]
    added = [d["id"] for d in docs[300:320]]
    done = root / "done.json"
    if not done.exists():
        corpus.mkdir(parents=True, exist_ok=True)
        for i in range(3):
            _write(corpus / f"f{i}.jsonl", base[i * 100:(i + 1) * 100])
        cfg = job_config(str(corpus), uri)
        embindex.build(cfg, log=None)
        f1 = [dict(d, text=d["text"] + "\n\nEdited: now about sockets.") for d in base[100:105]] + base[110:200]
        _write(corpus / "f1.jsonl", f1)
        _write(corpus / "f3.jsonl", docs[300:320])
        second = reindex(cfg, log=None)
        assert second.version == "v000002", second.version
        reader = embindex.open_index(uri)
        texts = QUERIES + [d["text"][:80] for d in docs[::40]]
        np.save(root / "queries.npy", reader.encode_queries(texts))
        done.write_text("{}")
    return SharedIndex(uri=uri, corpus=str(corpus), docs=docs, edited=edited, deleted=deleted, added=added,
                       queries=np.load(root / "queries.npy"))


def reader_top10(uri: str, version: str, width: int, queries: np.ndarray) -> list[list[str]]:
    """Exact top-10 ids of embindex at `width`: IndexReader on a Flat tier (exhaustive) with rescoring off
    (rescore=1), tombstoned rows skipped inside the FAISS search."""
    import embindex

    reader = embindex.open_index(uri, version=version)
    if width != reader.manifest.dim or any(t.dim == width for t in reader.manifest.tiers):
        assert reader.manifest.tier(width).factory == "Flat", "the reference side must be exact"
    hits = reader.search_vectors(queries, k=10, tier=width, rescore=1)
    return [[h.id for h in row] for row in hits]


def live_ids(uri: str, version: str) -> set[str]:
    import embindex

    reader = embindex.open_index(uri, version=version)
    dead = set(reader.tombstones.tolist())
    return {i for j, i in enumerate(reader.ids) if j not in dead}
