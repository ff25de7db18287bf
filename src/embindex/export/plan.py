"""Plan an export: which shards of a version to send, which rows to delete, and the rows themselves.

Export rows (one per live row of a shard; tombstoned rows are left out):

    key       the row's key in the target: the document id, or `<id>#<chunk>` for chunk rows
    id, chunk, start, end, modality, meta (the metadata JSON), content (the stored text, when the index
    stores content and the export includes it), shard (the shard the row comes from)
    vector    the first `width` dims of the full vector, L2-renormalized (the Matryoshka tier of that
              width), float32; `vector_full` the full width renormalized (optional); `tokens` the token
              vectors of a multi-vector index (optional)

Against what a target already holds (its ExportState), a version's export is a delta: rows of shards the
target does not hold are upserted, rows tombstoned since the target's version are deleted (by key *and*
shard, so a replaced document's new row is never deleted with its old one), and rows of shards the version
no longer has (a compaction, a full rebuild) are deleted by shard once the new rows are in.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ..index.manifest import Manifest
from ..index.publish import read_manifest
from ..index.quality import narrowest_tier_reaching
from ..index.shards import CONTENT_COLUMN, read_table, vectors_of
from ..index.tiers import truncate
from ..index.tombstones import read_tombstones
from ..index.vector_io import read_rows
from ..storage import Storage, StorageOptions
from .state import ConflictError, ExportState, index_identity

META_SAMPLE_ROWS = 2000  # rows of metadata read to infer the target's typed metadata fields
SCALAR_KINDS = ("keyword", "long", "double", "boolean")


@dataclass
class ShardTask:
    """One shard to send: its path, row count and the local rows to leave out (tombstoned)."""

    path: str
    rows: int
    skip: list[int] = field(default_factory=list)

    @property
    def live(self) -> int:
        return self.rows - len(self.skip)


@dataclass
class RowOptions:
    """What each export row carries besides key, ids, offsets, metadata and the tier vector."""

    width: int
    content: bool = True  # the stored text (only when the index stored content)
    full_vector: bool = False  # the full-width vector as a second column (rescoring in the target)
    tokens: bool = False  # token vectors of a multi-vector index


@dataclass
class ExportPlan:
    index: str  # the index's identity (normalized URI)
    version: str
    manifest: Manifest
    rows: RowOptions
    base: str | None  # the version the target holds completely (None: an empty target)
    upsert: list[ShardTask]  # shards whose live rows are written
    deletes: list[tuple[str, str]]  # (key, shard) of rows tombstoned since `base`, in shards the target holds
    dropped: list[str]  # shards the target holds that this version no longer has: their rows are deleted
    shards: list[str]  # the version's shards: what the target holds once the export is done
    fields: dict[str, Any]  # metadata field kinds (infer_fields), fixed when the target is created
    held: list[str] = field(default_factory=list)  # shards the target already held (and keeps)

    @property
    def width(self) -> int:
        return self.rows.width

    @property
    def full_dim(self) -> int:
        return self.manifest.dim

    @property
    def upsert_rows(self) -> int:
        return sum(t.live for t in self.upsert)

    @property
    def nothing_to_do(self) -> bool:
        return not (self.upsert or self.deletes or self.dropped)

    def state(self, **changes: Any) -> ExportState:
        """The target's state record for this export (with `changes` applied)."""
        values = dict(index=self.index, fingerprint=self.manifest.fingerprint, width=self.width,
                      full_dim=self.full_dim, version=self.base, pending=self.version,
                      shards=list(self.held), fields=self.fields)
        values.update(changes)
        return ExportState(**values)


# -- width --------------------------------------------------------------------------------------------

def default_width(manifest: Manifest, recall_target: float) -> int:
    """The narrowest tier whose build-time recall@k *without rescoring* reaches `recall_target`, else the
    full width: an export target serves the exported vectors as they are, with no full-width rescoring."""
    found = narrowest_tier_reaching(manifest, recall_target, rescored=False)
    return found if found is not None else manifest.dim


def resolve_width(manifest: Manifest, tier: int | str | None, recall_target: float | None = None) -> int:
    """`tier`: a width of the manifest's tiers, "full" (the model's width), or None/"auto" (default_width)."""
    if tier is None or tier == "auto":
        from ..search.reader import recall_target_of

        return default_width(manifest, recall_target_of(manifest) if recall_target is None else recall_target)
    try:
        width = manifest.dim if tier == "full" else int(tier)
    except ValueError:
        raise ValueError(f"--tier takes a width, 'full' or 'auto', got {tier!r}") from None
    if width == manifest.dim:
        return width
    return manifest.tier(width).dim  # raises for a width the index has no tier of


# -- metadata fields ------------------------------------------------------------------------------------

def _kind(value: Any) -> Any:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "long"
    if isinstance(value, float):
        return "double"
    if isinstance(value, str):
        return "keyword"
    if isinstance(value, dict):
        return {"object": infer_fields([value])}
    if isinstance(value, list):
        kinds = [_kind(v) for v in value if v is not None]
        out: Any = None
        for k in kinds:
            out = k if out is None else _merge(out, k)
        return out
    return "flattened"


def _merge(a: Any, b: Any) -> Any:
    if a is None or a == b:
        return b if a is None else a
    if b is None:
        return a
    if isinstance(a, str) and isinstance(b, str) and {a, b} == {"long", "double"}:
        return "double"
    if isinstance(a, dict) and isinstance(b, dict):
        props = dict(a["object"])
        for k, v in b["object"].items():
            props[k] = _merge(props.get(k), v)
        return {"object": props}
    return "flattened"


def infer_fields(metas: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """Field kinds of metadata objects: keyword / long / double / boolean, {"object": {...}} for nested
    objects, "flattened" where the sample disagrees (or holds anything else). Null values say nothing."""
    out: dict[str, Any] = {}
    for meta in metas:
        for key, value in (meta or {}).items():
            if value is None:
                continue
            out[key] = _merge(out.get(key), _kind(value))
    return {k: v for k, v in out.items() if v is not None}


def sample_fields(store: Storage, manifest: Manifest, rows: int = META_SAMPLE_ROWS) -> dict[str, Any]:
    """infer_fields over the metadata of the first `rows` rows of the version."""
    metas: list[dict] = []
    for shard in manifest.shards:
        col = read_table(store, shard.path, columns=["meta"]).column("meta").to_pylist()
        metas.extend(json.loads(m) for m in col[: rows - len(metas)] if m)
        if len(metas) >= rows:
            break
    return infer_fields(metas)


# -- the plan ---------------------------------------------------------------------------------------------

def _local_rows(manifest: Manifest, ordinals: np.ndarray) -> dict[str, np.ndarray]:
    """Tombstoned ordinals of a version -> {shard path: sorted local rows}."""
    offsets = np.concatenate([[0], np.cumsum([s.rows for s in manifest.shards])]).astype(np.int64)
    out: dict[str, np.ndarray] = {}
    shard_of = np.searchsorted(offsets, ordinals, side="right") - 1
    for s in np.unique(shard_of):
        out[manifest.shards[int(s)].path] = ordinals[shard_of == s] - offsets[s]
    return out


def check_target(state: ExportState | None, index: str, manifest: Manifest, width: int) -> None:
    """Refuse an export the target's state does not allow (another index, other vectors, another width,
    a version older than the one it holds)."""
    if state is None:
        return
    from ..index.layout import version_number

    if state.index != index:
        raise ConflictError(f"the target holds an export of another index ({state.index}); refusing to export "
                            f"{index} into it: choose another table/index name, or --replace to drop and reload it")
    if state.fingerprint != manifest.fingerprint:
        raise ConflictError(f"the target holds vectors of another model or outputs setting (fingerprint "
                            f"{state.fingerprint}, this version {manifest.fingerprint}): they are not comparable; "
                            "--replace drops and reloads the target")
    if state.width != width:
        raise ConflictError(f"the target holds {state.width}-dim vectors; export with --tier "
                            f"{'full' if state.width == manifest.dim else state.width}, or --replace to reload it "
                            f"at {width} dims")
    if state.version and version_number(manifest.version) < version_number(state.version):
        raise ConflictError(f"the target holds {state.version}, newer than {manifest.version}; --replace reloads "
                            "it with the older version")


def make_plan(store: Storage, manifest: Manifest, state: ExportState | None, rows: RowOptions) -> ExportPlan:
    """The delta that brings a target holding `state` (None: nothing) to `manifest`'s version."""
    index = index_identity(store.root)
    check_target(state, index, manifest, rows.width)
    held = set(state.shards if state else [])
    paths = [s.path for s in manifest.shards]
    tomb = _local_rows(manifest, read_tombstones(store, manifest))
    upsert = [ShardTask(s.path, s.rows, sorted(int(r) for r in tomb.get(s.path, []))) for s in manifest.shards
              if s.path not in held]
    old_tomb: dict[str, np.ndarray] = {}
    if state and state.version:
        try:  # rows already deleted when the target's version was exported need not be deleted again
            old = read_manifest(store, state.version)
            old_tomb = _local_rows(old, read_tombstones(store, old))
        except (FileNotFoundError, OSError):  # that version was garbage-collected: delete them all again
            old_tomb = {}
    deletes: list[tuple[str, str]] = []
    for path in paths:
        if path not in held or path not in tomb:
            continue
        new = np.setdiff1d(tomb[path], old_tomb.get(path, np.zeros(0, np.int64)))
        if len(new):
            deletes.extend((key, path) for key in shard_keys(store, path, new))
    fields = state.fields if state and state.fields else sample_fields(store, manifest)
    return ExportPlan(index=index, version=manifest.version, manifest=manifest, rows=rows,
                      base=state.version if state else None, upsert=upsert, deletes=deletes,
                      dropped=sorted(held - set(paths)), shards=paths, fields=fields,
                      held=[p for p in paths if p in held])


# -- rows --------------------------------------------------------------------------------------------------

def _keys(table: pa.Table) -> pa.Array:
    ids = table.column("id").combine_chunks()
    chunk = table.column("chunk").combine_chunks()
    chunked = pc.binary_join_element_wise(ids, pc.cast(chunk, pa.string()), "#")
    return pc.if_else(pc.is_null(chunk), ids, chunked)


def shard_keys(store: Storage, path: str, local_rows: Sequence[int] | np.ndarray) -> list[str]:
    """Keys of some rows of a shard (reads only the id and chunk columns of their row groups)."""
    with store.fs.open(store.fs_path(path), "rb") as f:
        table = read_rows(pq.ParquetFile(f), np.asarray(local_rows, dtype=np.int64), ["id", "chunk"])
    return _keys(table).to_pylist()


def _columns_of(store: Storage, path: str) -> list[str]:
    with store.fs.open(store.fs_path(path), "rb") as f:
        return pq.ParquetFile(f).schema_arrow.names


def _fixed(matrix: np.ndarray) -> pa.FixedSizeListArray:
    m = np.ascontiguousarray(matrix, dtype=np.float32)
    return pa.FixedSizeListArray.from_arrays(pa.array(m.reshape(-1)), m.shape[1])


def _token_lists(col: pa.ChunkedArray) -> pa.Array:
    """token_vectors list<fixed_size_list<float16>[d]> -> list<fixed_size_list<float32>[d]>."""
    arr = col.combine_chunks()
    inner = arr.values
    d = inner.type.list_size
    floats = pc.cast(inner.values, pa.float32())
    return pa.ListArray.from_arrays(arr.offsets, pa.FixedSizeListArray.from_arrays(floats, d), mask=arr.is_null())


def export_rows(store: Storage, task: ShardTask, opts: RowOptions) -> pa.Table:
    """The export rows of one shard (its live rows only), see the module docstring."""
    names = set(_columns_of(store, task.path))
    cols = ["id", "chunk", "start", "end", "meta", "vector"]
    cols += [c for c in ("modality",) if c in names]
    if opts.content and CONTENT_COLUMN in names:
        cols.append(CONTENT_COLUMN)
    if opts.tokens and "token_vectors" in names:
        cols.append("token_vectors")
    table = read_table(store, task.path, columns=cols)
    if task.skip:
        keep = np.ones(table.num_rows, dtype=bool)
        keep[np.asarray(task.skip, dtype=np.int64)] = False
        table = table.filter(pa.array(keep))
    full = vectors_of(table)
    n = table.num_rows
    out = {
        "key": _keys(table),
        "id": table.column("id"),
        "chunk": table.column("chunk"),
        "start": table.column("start"),
        "end": table.column("end"),
        "modality": table.column("modality") if "modality" in cols else pa.array(["text"] * n, pa.string()),
        "meta": table.column("meta"),
    }
    if CONTENT_COLUMN in cols:
        out["content"] = table.column(CONTENT_COLUMN)
    out["shard"] = pa.array([task.path] * n, pa.string())
    out["vector"] = _fixed(truncate(full, opts.width)) if n else pa.array([], pa.list_(pa.float32(), opts.width))
    if opts.full_vector:
        out["vector_full"] = _fixed(truncate(full, full.shape[1])) if n else pa.array(
            [], pa.list_(pa.float32(), full.shape[1]))
    if "token_vectors" in cols:
        out["tokens"] = _token_lists(table.column("token_vectors"))
    return pa.table(out)


def open_store(uri: str, storage: dict[str, Any] | None) -> Storage:
    return Storage(uri, StorageOptions.from_dict(storage))
