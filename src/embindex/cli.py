"""`embindex build | reindex | compact | search | retrieve | inspect | export | config`."""

from __future__ import annotations

import json
import os
import sys
from typing import Any, List, Optional

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Offline embedding indexes on Ray.")


def _setup_env() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _fail(msg: str) -> None:
    typer.echo(f"error: {msg}", err=True)
    raise typer.Exit(code=1)


CONFIG_ARG = typer.Argument(..., help="job config YAML: sections source, model, outputs, index, resources, run, "
                            "search, stages (`embindex config --schema` prints them all; `embindex config "
                            "--example NAME` a commented example)")
SET_OPT = typer.Option([], "--set", help="override a config key: key.path=value (repeatable)")
QUIET_OPT = typer.Option(False, "--quiet", "-q", help="only the final summary")


def _run_job(run: Any, config: str, set_: List[str], quiet: bool) -> Any:
    """Parse overrides, run a build or reindex, print its summary; config errors exit 1 with a message."""
    from pydantic import ValidationError

    from .config import parse_override
    from .index.lease import LeaseTimeout
    from .index.publish import IndexChangedError
    from .pipeline import BuildError
    from .reconcile import ReconciliationError
    from .storage import ConditionalWritesUnsupported

    try:
        overrides = dict(parse_override(s) for s in set_)
        result = run(config, overrides, log=None if quiet else _log)
    except (ValidationError, ValueError, FileNotFoundError, ImportError, IndexChangedError,
            ConditionalWritesUnsupported, LeaseTimeout, BuildError, ReconciliationError) as e:
        _fail(str(e))
    typer.echo(result.summary())
    return result


@app.command()
def build(config: str = CONFIG_ARG, set_: List[str] = SET_OPT, quiet: bool = QUIET_OPT) -> None:
    """Build (or rebuild) an index and publish it as a new version."""
    _setup_env()
    from .pipeline import build as run_build

    _run_job(run_build, config, set_, quiet)


@app.command()
def reindex(config: str = CONFIG_ARG, set_: List[str] = SET_OPT, quiet: bool = QUIET_OPT) -> None:
    """Embed only new or changed documents, tombstone deleted ones, publish a new version."""
    _setup_env()
    from .reindex import reindex as run_reindex

    result = _run_job(run_reindex, config, set_, quiet)
    if result.manifest.delta:
        d = result.manifest.delta
        typer.echo(f"  delta: {d.get('added', 0)} added, {d.get('changed', 0)} changed, "
                   f"{d.get('deleted', 0)} deleted, {d.get('unchanged', 0)} unchanged")


@app.command()
def compact(
    index: str = typer.Argument(..., help="index URI"),
    threshold: float = typer.Option(0.2, "--threshold", help="compact when this fraction of rows is tombstoned"),
    force: bool = typer.Option(False, "--force", help="compact whatever the fraction"),
    keep: Optional[int] = typer.Option(None, "--keep", help="then keep only this many versions"),
    grace: float = typer.Option(3600, "--grace-seconds",
                                help="with --keep: delete a version only this long after it stopped being the latest"),
) -> None:
    """Rewrite the latest version without its tombstoned rows (no re-embedding) and retrain its tiers."""
    _setup_env()
    from .incremental.compact import compact as run_compact
    from .index.gc import collect_garbage
    from .index.publish import IndexChangedError
    from .storage import Storage

    try:
        m = run_compact(index, threshold=threshold, force=force, log=_log)
        if keep:
            collect_garbage(Storage(index), keep, _log, grace_seconds=grace)
    except (ValueError, FileNotFoundError, IndexChangedError) as e:
        _fail(str(e))
        return
    typer.echo(f"published {m.version} (compacted {m.parent})" if m else "nothing to compact")


def _log(msg: str) -> None:
    typer.echo(msg, err=True)


@app.command()
def search(
    index: str = typer.Argument(..., help="index URI (local path or s3://...)"),
    query: Optional[List[str]] = typer.Argument(None, help="query text (several allowed)"),
    image: Optional[List[str]] = typer.Option(None, "--image", help="query image file (repeatable)"),
    k: int = typer.Option(10, "-k", help="hits per query"),
    tier: Optional[int] = typer.Option(None, "--tier", help="ANN tier width (default: the narrowest tier whose "
                                       "build-time rescored recall@10 reaches the recall target)"),
    recall_target: Optional[float] = typer.Option(None, "--recall-target",
                                                  help="default-tier recall target (default: search.recall_target "
                                                       "of the build config, else 0.99)"),
    modality: Optional[str] = typer.Option(None, "--modality", help="only 'text' or only 'image' hits"),
    version: Optional[str] = typer.Option(None, "--version", help="a version other than _latest"),
    as_json: bool = typer.Option(False, "--json", help="JSON lines output"),
    rerank: Optional[str] = typer.Option(None, "--rerank", help="reranker: a YAML config (name, path, depth, "
                                         "options) or a checkpoint directory/URI; needs index.store_content"),
    rerank_depth: Optional[int] = typer.Option(None, "--rerank-depth", help="candidates reranked per query "
                                               "(default: the reranker config's depth, else 50)"),
) -> None:
    """Search an index with text queries and/or query images (multimodal models)."""
    _setup_env()
    from .search import open_index

    if not query and not image:
        _fail("give at least one query text or --image")
        return
    try:
        reader = open_index(index, version=version, recall_target=recall_target)
        opts = {"k": k, "tier": tier, "modality": modality, "rerank": rerank, "rerank_depth": rerank_depth}
        results = reader.search(query, **opts) if query else []
        if image:
            results += reader.search_images(image, **opts)
        query = (query or []) + [f"image:{p}" for p in image or []]
    except (ValueError, OSError) as e:
        _fail(str(e))
        return
    for q, hits in zip(query, results):
        if as_json:
            typer.echo(json.dumps({"query": q, "hits": [h.to_dict() for h in hits]}, ensure_ascii=False))
            continue
        typer.echo(f"query: {q}")
        for rank, h in enumerate(hits, 1):
            chunk = f" chars {h.chunk['start']}-{h.chunk['end']}" if h.chunk else ""
            kind = f" [{h.modality}]" if h.modality == "image" else ""
            reranked = "" if h.retrieval_score is None else f"  (retrieval {h.retrieval_score:.4f})"
            if h.rerank_reject:
                reranked += f"  not reranked: {h.rerank_reject}"
            typer.echo(f"{rank:3d}. {h.score:.4f}  {h.id}{chunk}{kind}{reranked}")


@app.command()
def retrieve(config: str = typer.Argument(..., help="retrieve config YAML"), set_: List[str] = SET_OPT,
             quiet: bool = QUIET_OPT) -> None:
    """Offline: search a query set (every tier, alone and rescored), rerank, write results, run file, metrics."""
    _setup_env()
    from pydantic import ValidationError

    from .config import parse_override
    from .retrieve.job import retrieve as run_retrieve
    from .retrieve.trec import QrelsError

    try:
        result = run_retrieve(config, dict(parse_override(s) for s in set_), log=(lambda m: None) if quiet else _log)
    except (ValidationError, ValueError, FileNotFoundError, ImportError, QrelsError) as e:
        _fail(str(e))
        return
    typer.echo(f"{result.queries} queries ({result.rejected} rejected) -> {result.output} "
               f"(results.parquet, run.trec{', metrics.json' if result.metrics else ''})")
    if result.metrics:
        typer.echo(result.table())


@app.command()
def inspect(
    index: str = typer.Argument(..., help="index URI"),
    version: Optional[str] = typer.Option(None, "--version"),
    as_json: bool = typer.Option(False, "--json", help="print the whole manifest"),
) -> None:
    """Print the manifest summary: versions, tiers, shards, counts, quality."""
    _setup_env()
    from .index.publish import latest_version, list_versions, read_manifest
    from .search.reader import default_tier, recall_target_of
    from .storage import Storage

    store = Storage(index)
    try:
        m = read_manifest(store, version)
    except FileNotFoundError as e:
        _fail(str(e))
        return
    if as_json:
        typer.echo(m.to_json())
        return
    latest = latest_version(store)
    lines: list[Any] = [
        f"index    {index}",
        f"version  {m.version}  created {m.created_at}  run {m.run_id}  parent {m.parent or '-'}",
        f"model    {m.model.name}  {m.model.path}  task={m.model.task}  pooling={m.model.pooling}  "
        f"max_length={m.model.max_length}  inputs={'+'.join(m.model.modalities)}  {m.model.checkpoint_hash[:19]}",
        f"source   {m.source.get('uri')} ({m.source.get('format')}, {m.source.get('files')} files)",
        f"counts   rows in {m.counts.rows_in}, documents {m.counts.documents}, vectors {m.counts.vectors}, "
        f"rejected {m.counts.rejected}",
        f"shards   {len(m.shards)} parquet, {sum(s.bytes for s in m.shards) / 1e6:.2f} MB; dim {m.dim}",
    ]
    lines.append("versions")
    for v in list_versions(store):
        vm = read_manifest(store, v)
        d = vm.delta
        delta = (f"  +{d.get('added', 0)} ~{d.get('changed', 0)} -{d.get('deleted', 0)}" if d else "  full build")
        lines.append(f"  {v}{' *' if v == latest else '  '} parent {vm.parent or '-':8s} {vm.created_at}  "
                     f"documents {vm.counts.documents}, rejected {vm.counts.rejected}{delta}")
    reasons: dict[str, int] = {}
    for r in m.rejects:
        for k, n in r.reasons.items():
            reasons[k] = reasons.get(k, 0) + n
    if reasons:
        lines.append("rejects  " + ", ".join(f"{k}={n}" for k, n in sorted(reasons.items())))
    q = m.quality.get("tiers", {})
    kq = m.quality.get("k", 10)
    lines.append(f"tiers    (recall@{kq} vs exact full width on {m.quality.get('queries', 0)} sampled queries)")
    for t in m.tiers:
        qt = q.get(str(t.dim), {})
        lines.append(
            f"  {t.dim:5d}  {t.factory:14s} {t.bytes_per_vector or 0:8.1f} B/vec  "
            f"recall {qt.get(f'recall@{kq}', float('nan')):.3f}  rescored {qt.get(f'recall@{kq}_rescored', float('nan')):.3f}"
        )
    target = recall_target_of(m)
    lines.append(f"search   default tier {default_tier(m, target)} (narrowest with rescored recall@{kq} >= "
                 f"{target:g}, else the widest)")
    typer.echo("\n".join(str(x) for x in lines))


@app.command("export")
def export_cmd(
    index: str = typer.Argument(..., help="index URI"),
    to: str = typer.Option(..., "--to", help="target: lancedb:///path/db/TABLE, lancedb+s3://bucket/db/TABLE, "
                           "postgresql://user:pass@host:port/db?table=NAME, es://host:9200/INDEX (ess:// = https), "
                           "file:///dir"),
    tier: Optional[str] = typer.Option(None, "--tier", help="exported width: a tier width, 'full', or 'auto' "
                                       "(default: the width the target holds, else the narrowest tier whose "
                                       "recall@10 without rescoring reaches the recall target, else full)"),
    version: Optional[str] = typer.Option(None, "--version", help="a version other than _latest"),
    replace: bool = typer.Option(False, "--replace", help="drop what the target holds and reload it"),
    build_index: Optional[bool] = typer.Option(None, "--index/--no-index", help="build the target's ANN index "
                                               "(default: Postgres HNSW on, LanceDB IVF-PQ off)"),
    content: bool = typer.Option(True, "--content/--no-content", help="include the stored text (index.store_content)"),
    full_vector: bool = typer.Option(False, "--full-vector", help="also the full-width vector (Elasticsearch: a "
                                     "second, unindexed field for rescoring)"),
    tokens: Optional[bool] = typer.Option(None, "--tokens/--no-tokens", help="token vectors of a multi-vector "
                                          "index (Elasticsearch rank_vectors; default on there)"),
    recall_target: Optional[float] = typer.Option(None, "--recall-target", help="for the default width"),
    opt: List[str] = typer.Option([], "--opt", help="target setting KEY=VALUE (repeatable), e.g. "
                                  "index_type=bbq_hnsw, oversample=3, m=16, num_partitions=256"),
    use_ray: bool = typer.Option(False, "--ray", help="one Ray task per shard (also when RAY_ADDRESS is set)"),
    ray_address: Optional[str] = typer.Option(None, "--ray-address", help="Ray cluster to run the shard tasks on"),
    quiet: bool = QUIET_OPT,
) -> None:
    """Export a version of an index to LanceDB, Postgres + pgvector, Elasticsearch or bulk files; a target that
    holds an older version of the same index gets only the delta."""
    _setup_env()
    import contextlib

    import yaml

    from .export import ExportError, export_index

    try:
        options = {}
        for item in opt:
            key, sep, value = item.partition("=")
            if not sep or not key:
                raise ValueError(f"--opt takes KEY=VALUE, got {item!r}")
            options[key.strip()] = yaml.safe_load(value)
        session = contextlib.nullcontext()
        if use_ray or ray_address or os.environ.get("RAY_ADDRESS"):
            from .config import ResourcesConfig
            from .ray_runtime import ray_session

            session = ray_session(ResourcesConfig(ray_address=ray_address))
        with session:
            result = export_index(index, to, version=version, tier=tier, replace=replace, content=content,
                                  full_vector=full_vector, tokens=tokens, build_index=build_index,
                                  recall_target=recall_target, options=options, log=None if quiet else _log)
    except (ExportError, ValueError, FileNotFoundError, ImportError) as e:
        _fail(str(e))
        return
    typer.echo(result.summary())


@app.command("config")
def config_cmd(
    schema: bool = typer.Option(False, "--schema", help="print the job config's JSON schema"),
    example: Optional[str] = typer.Option(None, "--example", help="print an example config: a model family "
                                          "(e.g. jina-embeddings-v3) or an example's name"),
) -> None:
    """Job config help: the JSON schema of every key, or a commented example to start from. Without an
    option, lists the examples."""
    from importlib.resources import files

    examples = {p.name[: -len(".yaml")]: p for p in files("embindex").joinpath("configs").iterdir()
                if p.name.endswith(".yaml")}
    if schema:
        from .config import JobConfig

        typer.echo(json.dumps(JobConfig.model_json_schema(), indent=2))
    elif example is not None:
        matches = [n for n in sorted(examples) if n == example or n.startswith(f"{example}-")]
        if not matches:
            _fail(f"no example {example!r}; examples: {', '.join(sorted(examples))}")
        typer.echo(examples[matches[0]].read_text(encoding="utf-8"), nl=False)
    else:
        typer.echo("examples (embindex config --example NAME):")
        for name in sorted(examples):
            typer.echo(f"  {name}")


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
