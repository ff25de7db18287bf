"""`embindex export INDEX --to URI`: load a version of an index into a serving engine, or bring a target
that holds an older version up to date with only the delta (see plan.py).

The driver plans, then sends the shards in waves: one task per shard reads it and builds its export rows
(Ray tasks when Ray is up, `run_tasks`), and either writes them itself (sinks that take parallel writers:
Postgres, Elasticsearch) or hands them to the driver (LanceDB, one writer). After each wave the target's
state records the shards it now holds, so an interrupted export resumes where it stopped. Deletes of
tombstoned rows and of dropped shards follow the upserts; the state names the new version last.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from ..index.publish import read_manifest
from ..logs import Log
from ..ray_runtime import run_tasks
from .plan import ExportPlan, RowOptions, ShardTask, export_rows, make_plan, open_store, resolve_width
from .sinks import Sink, open_sink
from .state import ExportError


@dataclass
class ExportResult:
    target: str  # as it may be logged
    version: str
    previous: str | None  # the version the target held before (None: it held nothing)
    width: int
    rows_upserted: int = 0
    rows_deleted: int = 0
    shards_written: int = 0
    shards_total: int = 0
    seconds: float = 0.0  # the whole export
    load_seconds: float = 0.0  # reading shards and writing their rows (what rows/s counts)
    up_to_date: bool = False
    finish: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> str:
        if self.up_to_date:
            return f"{self.target} already holds {self.version} ({self.width} dims): nothing to do"
        base = f"from {self.previous}" if self.previous else "into an empty target"
        rate = self.rows_upserted / self.load_seconds if self.load_seconds else 0.0
        extra = "".join(f"; {k} {v}" for k, v in self.finish.items())
        return (f"exported {self.version} {base} -> {self.target}: {self.rows_upserted} rows upserted "
                f"({self.shards_written}/{self.shards_total} shards, {rate:.0f} rows/s), {self.rows_deleted} "
                f"deleted; {self.width} dims; {self.seconds:.1f} s{extra}")


@dataclass
class _ShardFailure:
    path: str
    message: str


def export_shard(task: ShardTask, index: str, storage: dict[str, Any] | None, rows: RowOptions,
                 sink: Sink | None = None, fresh: bool = False) -> Any:
    """One shard: its export rows, written by `sink` when given (returns the count), else returned.
    An ExportError (a row the target refused) comes back as a value, so the wave's other shards count."""
    table = export_rows(open_store(index, storage), task, rows)
    if sink is None:
        return table
    try:
        return sink.write(table, fresh=fresh)
    except ExportError as e:
        return _ShardFailure(task.path, str(e))


def _wave_size() -> int:
    try:
        import ray

        if ray.is_initialized():
            return max(2, int(ray.cluster_resources().get("CPU", 2)))
    except ImportError:  # pragma: no cover
        pass
    return 1


def _tokens_default(manifest: Any, sink: Sink) -> bool:
    return manifest.outputs.get("mode") == "multivector" and getattr(sink, "takes_tokens", False)


def export_index(index: str, target: str, *, version: str | None = None, tier: int | str | None = None,
                 storage: dict[str, Any] | None = None, replace: bool = False, content: bool = True,
                 full_vector: bool = False, tokens: bool | None = None, build_index: bool | None = None,
                 recall_target: float | None = None, options: dict[str, Any] | None = None,
                 wave: int | None = None, log: Log | None = None) -> ExportResult:
    """Export `version` (default: the latest) of the index at `index` to the target URI `target`.

    `tier`: the exported width (a tier width, "full", or None: what the target holds, else the narrowest
    tier whose recall@10 without rescoring reaches `recall_target`, else full); `replace`: drop what the
    target holds and reload; `content`: include stored text; `full_vector`: also the full-width vector
    (Elasticsearch: a second, unindexed field for rescoring); `tokens`: token vectors of a multi-vector
    index (Elasticsearch rank_vectors; default on there); `build_index`: the target's ANN index (default:
    Postgres HNSW on, LanceDB IVF-PQ off, Elasticsearch always indexes); `options`: target settings.
    Raises ExportError (TargetError, ConflictError) with one clear line, before any row is sent."""
    log = log or (lambda _m: None)
    t0 = time.time()
    store = open_store(index, storage)
    manifest = read_manifest(store, version)
    sink = open_sink(target, index=build_index, **(options or {}))
    try:
        return _run(sink, store, manifest, index, storage, tier, replace, content, full_vector, tokens,
                    recall_target, wave, log, t0)
    except ExportError as e:
        raise type(e)(sink.scrub(str(e))) from None
    finally:
        sink.close()


def _run(sink: Sink, store: Any, manifest: Any, index: str, storage: dict[str, Any] | None, tier: Any,
         replace: bool, content: bool, full_vector: bool, tokens: bool | None, recall_target: float | None,
         wave: int | None, log: Log, t0: float) -> ExportResult:
    sink.connect()
    state = None if replace else sink.read_state()
    width = resolve_width(manifest, tier if tier is not None else (state.width if state else None), recall_target)
    rows = RowOptions(width=width, content=content, full_vector=full_vector,
                      tokens=_tokens_default(manifest, sink) if tokens is None else tokens)
    plan = make_plan(store, manifest, state, rows)
    result = ExportResult(target=sink.describe(), version=plan.version, previous=plan.base, width=width,
                          shards_total=len(plan.shards))
    if state and state.version == plan.version and not state.pending and plan.nothing_to_do:
        result.up_to_date = True
        return result
    sink.prepare(plan, replace=replace)
    sink.save_state(plan.state())  # `pending` is recorded before any row is sent
    log(f"[embindex] export {plan.version} -> {sink.describe()}: {len(plan.upsert)} shard(s) to write "
        f"({plan.upsert_rows} rows), {len(plan.deletes)} row(s) and {len(plan.dropped)} shard(s) to delete; "
        f"{width} dims")
    t_load = time.time()
    result.rows_upserted, result.shards_written = _write_shards(sink, plan, index, storage, fresh=state is None,
                                                                wave=wave or _wave_size(), log=log, t0=t_load)
    result.load_seconds = time.time() - t_load
    result.rows_deleted = sink.delete_rows(plan.deletes) + sink.delete_shards(plan.dropped)
    result.finish = sink.finish(plan)
    sink.save_state(plan.state(version=plan.version, pending=None, shards=plan.shards))
    result.seconds = time.time() - t0
    return result


def _write_shards(sink: Sink, plan: ExportPlan, index: str, storage: dict[str, Any] | None, fresh: bool,
                  wave: int, log: Log, t0: float) -> tuple[int, int]:
    """Send the plan's shards wave by wave, recording each wave's shards in the target's state."""
    done = list(plan.held)
    written = shards = 0
    failures: list[_ShardFailure] = []
    shared = {"index": index, "storage": storage, "rows": plan.rows, "fresh": fresh,
              "sink": sink if sink.parallel else None}
    for start in range(0, len(plan.upsert), wave):
        batch = plan.upsert[start:start + wave]
        results = run_tasks(export_shard, [(t,) for t in batch], shared=shared)
        for task, res in zip(batch, results):
            if isinstance(res, pa.Table):
                res = sink.write(res, fresh=fresh)
            if isinstance(res, _ShardFailure):
                failures.append(res)
                continue
            written += int(res)
            shards += 1
            done.append(task.path)
        sink.save_state(plan.state(shards=done))
        log(f"[embindex] export: {shards}/{len(plan.upsert)} shard(s), {written} rows "
            f"({written / max(time.time() - t0, 1e-9):.0f} rows/s)")
    if failures:
        detail = "; ".join(f"{f.path}: {f.message}" for f in failures[:5])
        raise ExportError(f"{len(failures)} shard(s) not exported (the other {shards} are recorded; run the export "
                          f"again to resume): {detail}")
    return written, shards
