"""On-disk layout of an index: every path embindex writes is made here (a contract; the whole list, with
the tier layouts, in docs/manifest.md):

    INDEX_URI/
      _latest                          current version name, switched last (compare-and-swap)
      versions/v000001/manifest.json   created only if absent: claims the version number
      shards/<run_id>/part-*.parquet   documents with full-width vectors (immutable once published)
      shards/<run_id>/rejects-*.parquet
      shards/<run_id>/_commits/        one marker per committed fragment (resume, reconcile)
      shards/<run_id>/_run.json        the run's kind, base, fingerprint; _published.json once published
      shards/<run_id>/tier-<dim>...    one FAISS index per Matryoshka tier (single file, sharded or on-disk IVF)
      shards/<run_id>/tokens.faiss     multi-vector outputs: token vectors -> row ordinal
"""

from __future__ import annotations

import re

LATEST = "_latest"
VERSIONS_DIR = "versions"
SHARDS_DIR = "shards"
MANIFEST = "manifest.json"
VERSION_RE = re.compile(r"^v(\d{6,})$")


def version_name(n: int) -> str:
    return f"v{n:06d}"


def version_number(name: str) -> int:
    m = VERSION_RE.match(name)
    if not m:
        raise ValueError(f"not a version name: {name!r}")
    return int(m.group(1))


def manifest_path(version: str) -> str:
    return f"{VERSIONS_DIR}/{version}/{MANIFEST}"


def run_dir(run_id: str) -> str:
    return f"{SHARDS_DIR}/{run_id}"


def part_path(run_id: str, digest: str) -> str:
    return f"{run_dir(run_id)}/part-{digest}.parquet"


def vectors_beside(part_rel: str) -> str:
    """The float16 row matrix (.npy) written next to a part: row-level random access to its vectors."""
    return part_rel[: -len(".parquet")] + ".vectors.npy" if part_rel.endswith(".parquet") else part_rel + ".vectors.npy"


def rejects_path(run_id: str, digest: str) -> str:
    return f"{run_dir(run_id)}/rejects-{digest}.parquet"


def token_index_path(run_id: str) -> str:
    return f"{run_dir(run_id)}/tokens.faiss"


def commits_dir(run_id: str) -> str:
    return f"{run_dir(run_id)}/_commits"


def commit_path(run_id: str, fragment_id: str) -> str:
    return f"{commits_dir(run_id)}/{fragment_id}.json"


def run_record_path(run_id: str) -> str:
    """The run's kind, base and fingerprint, written when it starts."""
    return f"{run_dir(run_id)}/_run.json"


def published_path(run_id: str) -> str:
    """The version a run published, written between claiming it and switching _latest."""
    return f"{run_dir(run_id)}/_published.json"


def tier_path(run_id: str, dim: int) -> str:
    """A tier's index file ("single" layout; the IVF header of "ondisk")."""
    return f"{run_dir(run_id)}/tier-{dim:05d}.faiss"


def tier_ivfdata_path(run_id: str, dim: int) -> str:
    """The on-disk inverted lists of an "ondisk" tier."""
    return f"{run_dir(run_id)}/tier-{dim:05d}.ivfdata"


def tier_shard_path(run_id: str, dim: int, i: int) -> str:
    """A "shards" tier's index over Parquet shard i (and an "ondisk" tier's partial before the merge)."""
    return f"{run_dir(run_id)}/tier-{dim:05d}/shard-{i:05d}.faiss"


def tier_delta_path(run_id: str, dim: int) -> str:
    """The index of the rows a reindex added to a tier."""
    return f"{run_dir(run_id)}/tier-{dim:05d}-delta.faiss"


def token_partial_path(run_id: str, i: int) -> str:
    """Shard i's token vectors before the merge into tokens.faiss."""
    return f"{run_dir(run_id)}/tokens/part-{i:05d}.faiss"


def ivfdata_beside(index_path: str) -> str:
    """The on-disk lists file next to an IVF index header (x.faiss -> x.ivfdata)."""
    return index_path[: -len(".faiss")] + ".ivfdata"
