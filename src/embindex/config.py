"""Job configuration: the pydantic schema of a YAML job config, validated before any worker starts."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from .storage import StorageOptions


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _Stored:
    """A section with a `storage` dict of filesystem options (endpoint, credentials, ...)."""

    def storage_options(self) -> StorageOptions:
        return StorageOptions.from_dict(self.storage)  # type: ignore[attr-defined]


class SourceConfig(_Stored, _Section):
    """Where the corpus is and how its rows map to documents."""

    uri: str
    format: Literal["auto", "parquet", "jsonl", "text", "images", "mixed", "html", "warc"] = "auto"
    id_column: str = "id"
    text_column: str = "text"
    image_column: str | None = Field(
        None, description="Parquet/JSONL column with image bytes, a {bytes, path} struct or a path/URI "
        "(relative paths resolve against the source root); a row with an image there is embedded as an "
        "image. Off by default: an existing `image` column of a text corpus stays metadata")
    image_root: str | None = Field(
        None, description="image paths/URIs must lie under this prefix (default: the source root); "
        "other references are rejected, so a corpus cannot make the job read arbitrary objects")
    metadata_columns: list[str] | None = None  # None: every other column
    max_text_bytes: int = Field(1_000_000, gt=0)
    max_image_bytes: int = Field(32_000_000, gt=0, description="larger encoded images are rejected")
    max_image_pixels: int = Field(64_000_000, gt=0, description="larger decoded images are rejected")
    text_extensions: list[str] = [".txt", ".md", ".rst"]
    image_extensions: list[str] = [".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"]
    html_extensions: list[str] = Field([".html", ".htm"], description="files of an html corpus (one page each)")
    storage: dict[str, Any] = Field(default_factory=dict)
    fragment_rows: int = Field(10_000, gt=0, description="Parquet rows per fragment (unit of work and resume)")
    fragment_files: int = Field(256, gt=0, description="text or image files per fragment")
    fragment_bytes: int = Field(256 << 20, gt=0, description="data per fragment (Parquet row groups "
                                "uncompressed, file sizes): keeps image blocks small")
    fragment_images: int = Field(256, gt=0, description="rows per fragment when rows hold images (Parquet "
                                 "with image_column, image folders): bounds the prepared pixels per block")


class ModelConfig(_Stored, _Section):
    """Which model family and checkpoint, and how to call it."""

    name: str = "hf-encoder"
    path: str = "builtin:all-MiniLM-L6-v2"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    max_length: int | None = Field(None, gt=0)
    task: str | None = None
    role: Literal["document", "query"] = "document"
    pooling: Literal["auto", "mean", "cls", "last"] = "auto"
    force_dtype: bool = Field(False, description="run float16 on a family that refuses it (Qwen-based: overflow)")
    storage: dict[str, Any] = Field(default_factory=dict)
    cache_dir: str | None = None


class ChunkingConfig(_Section):
    """Chunks with character offsets: `tokens` (fixed token windows), `sentences` (n per chunk) or
    `paragraphs` (blank lines / Markdown headings, merged up to chunk_size tokens)."""

    chunker: Literal["tokens", "sentences", "paragraphs"] = "sentences"
    chunk_size: int = Field(256, gt=0)
    n_sentences: int = Field(5, gt=0)
    overlap: int = Field(0, ge=0, description="units shared by consecutive chunks (naive chunking)")

    @model_validator(mode="after")
    def _overlap(self) -> "ChunkingConfig":
        size = self.chunk_size if self.chunker == "tokens" else self.n_sentences
        if self.chunker != "paragraphs" and self.overlap >= size:
            raise ValueError(f"chunk overlap {self.overlap} must be smaller than the chunk ({size})")
        return self


class LateChunkingConfig(ChunkingConfig):
    """Whole document through the model once, then each chunk's token span mean-pooled. Documents longer
    than `window` tokens are embedded in macro windows overlapping by `window_overlap` tokens."""

    window: int | None = Field(None, gt=0, description="macro window in tokens (default: model max_length)")
    window_overlap: int | None = Field(None, ge=0, description="default: min(256, window // 4)")
    max_doc_tokens: int = Field(131072, gt=0, description="longer documents are truncated to this many tokens")


class MultivectorConfig(_Section):
    """Token vectors per document (ColBERT style), MaxSim at search time."""

    candidates: Literal["tokens", "pooled"] = "tokens"
    token_k: int = Field(64, gt=0, description="nearest stored tokens per query token (tokens candidates)")


class OutputsConfig(_Section):
    single: Literal[True] = Field(True, description="one vector per row (document, chunk, or the pooled "
                                  "vector beside multi-vector tokens), which the tiers index; always on")
    late_chunking: LateChunkingConfig | None = None
    chunking: ChunkingConfig | None = None
    multivector: MultivectorConfig | None = None

    @field_validator("multivector", mode="before")
    @classmethod
    def _mv_bool(cls, v: Any) -> Any:
        if v is True:
            return {}
        if v is False:
            return None
        return v

    @field_validator("single", mode="before")
    @classmethod
    def _single_on(cls, v: Any) -> Any:
        if v is False:
            raise ValueError("outputs.single cannot be turned off: every output mode stores one vector per "
                             "row (the document, each chunk, or the pooled vector beside multi-vector tokens) "
                             "and the tiers index it; remove the key")
        return v

    @model_validator(mode="after")
    def _combination(self) -> "OutputsConfig":
        if self.late_chunking is not None and self.chunking is not None:
            raise ValueError("choose outputs.late_chunking or outputs.chunking (naive), not both")
        if self.multivector is not None and (self.late_chunking is not None or self.chunking is not None):
            raise ValueError("outputs.multivector stores token vectors per document; it cannot be combined "
                             "with chunked outputs")
        return self

    @property
    def mode(self) -> str:
        """document | late | naive | multivector"""
        if self.late_chunking is not None:
            return "late"
        if self.chunking is not None:
            return "naive"
        if self.multivector is not None:
            return "multivector"
        return "document"


Tier = int | Literal["full"]


class IndexConfig(_Stored, _Section):
    uri: str
    tiers: list[Tier] = [64, 128, 256, "full"]
    factory: str | dict[str, str] = "auto"
    metric: Literal["ip"] = "ip"
    quality_sample: int = Field(1000, ge=0)
    rescore: int = Field(10, ge=1, description="shortlist = k * rescore, rescored at full width")
    memory_budget_mb: float = Field(4096, gt=0, description="per-tier budget of index bytes that `auto` fits")
    train_sample: int = Field(100_000, gt=0, description="sampled rows (uniform across shards) that trained tiers learn on")
    single_file_max_rows: int = Field(200_000, ge=0, description="non-IVF tiers up to this size are one file")
    store_content: bool = Field(False, description="store each row's text (a chunk row: its span) and encoded "
                                "image in the shards, so rerankers and exports read candidates from the index")
    storage: dict[str, Any] = Field(default_factory=dict)
    keep_versions: int | None = Field(None, gt=0, description="versions kept after a publish (None: all)")
    gc_grace_seconds: float = Field(3600, ge=0, description="an older version's files are deleted only this long "
                                    "after it stopped being the latest (readers that opened it keep working)")
    gc_inflight_seconds: float = Field(7 * 86400, gt=0, description="an unpublished run this recent protects "
                                       "the version it started from; older ones count as abandoned")
    commit: Literal["auto", "conditional", "lease"] = Field(
        "auto", description="publish protocol: conditional writes (local disk, S3), or a lease object for "
        "stores without them; auto picks conditional where the store has it")
    retrain_growth: float = Field(2.0, gt=1, description="reindex retrains tiers once rows exceed this x trained")
    max_tier_deltas: int = Field(8, ge=1, description="a reindex adds one delta index per tier; at this many the "
                                 "tiers are rebuilt from the stored vectors (search latency stays bounded)")

    @field_validator("tiers")
    @classmethod
    def _tiers(cls, v: list[Tier]) -> list[Tier]:
        if not v:
            raise ValueError("index.tiers needs at least one tier")
        ints = [t for t in v if t != "full"]
        if any(t <= 0 for t in ints):
            raise ValueError("index.tiers must be positive widths or 'full'")
        return v

    def factory_for(self, dim: int) -> str:
        if isinstance(self.factory, str):
            return self.factory
        return self.factory.get(str(dim), self.factory.get("default", "auto"))


class ActorRange(_Section):
    """An autoscaling actor pool: Ray Data grows it from `min` to `max` actors while work is queued."""

    min: int = Field(1, ge=1)
    max: int = Field(..., ge=1)

    @model_validator(mode="after")
    def _ordered(self) -> "ActorRange":
        if self.max < self.min:
            raise ValueError(f"resources.actors: max {self.max} < min {self.min}")
        return self


class ActorResources(_Section):
    """One stage's actor pool: how many actors, and what each asks Ray for."""

    actors: int | ActorRange = Field(1, description="actors: a number, or {min, max} for an autoscaling pool")
    accelerator: Literal["auto", "gpu", "cpu"] = Field(
        "auto", description="gpu: actors ask for GPUs even when none is up yet (the autoscaler provisions them); "
        "cpu: never; auto: GPUs when the cluster has them or its autoscaler can start a node type with GPUs")
    cpus_per_actor: float | None = Field(None, gt=0)
    gpus_per_actor: float | None = Field(None, ge=0, description="fractions share a GPU between stages' actors")
    batch_tokens: int = Field(4096, gt=0, description="max padded tokens per forward batch (GPUs: 16k-64k)")
    torch_threads: int | None = Field(None, gt=0)

    @field_validator("actors", mode="before")
    @classmethod
    def _actors(cls, v: Any) -> Any:
        if isinstance(v, int) and not isinstance(v, bool) and v < 1:
            raise ValueError("actors must be >= 1")
        return v


class ResourcesConfig(ActorResources):
    """The embed stage's actor pool, and the Ray session the job runs in."""

    ray_address: str | None = None
    num_cpus: int | None = Field(None, gt=0, description="CPUs of a local Ray started in-process")


class RunConfig(_Section):
    id: str | None = None
    resume: bool = False
    progress: bool = True
    progress_seconds: float = Field(10.0, gt=0, description="interval of the embedded-rows progress line")
    max_attempts: int = Field(3, ge=1, description="passes over uncommitted fragments after a failure")


# -- stages: the build as an ordered list (read -> normalize -> [generative stages] -> tokenize -> embed -> write)

BUILTIN_STAGES = ("read", "normalize", "tokenize", "embed", "write")
GENERATIVE_STAGES = ("html_to_markdown", "caption")
DEFAULT_STAGES = list(BUILTIN_STAGES)


class GeneratorModelConfig(_Stored, _Section):
    """A generative model's checkpoint (local directory, s3:// or gs:// prefix) and how to run it."""

    name: str | None = Field(None, description="generator family (default: the stage's: readerlm-v2, jina-vlm)")
    path: str
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    force_dtype: bool = Field(False, description="run float16 on a family that refuses it (Qwen-based: overflow)")
    storage: dict[str, Any] = Field(default_factory=dict)
    cache_dir: str | None = None


class GenerateStageConfig(_Section):
    """A generative stage before the embed stage, on its own actor pool: `html_to_markdown` (ReaderLM-v2: the
    HTML of text rows -> Markdown, or JSON with `options.schema`) or `caption` (jina-vlm: image rows -> a
    caption, embedded as text). Its output is stored in the shards with the model's fingerprint."""

    stage: Literal["html_to_markdown", "caption"]
    model: GeneratorModelConfig
    options: dict[str, Any] = Field(default_factory=dict, description="family options, e.g. ReaderLM-v2's "
                                    "instruction, schema, clean_svg, clean_base64; jina-vlm's prompt")
    max_new_tokens: int = Field(1024, gt=0)
    unfinished: Literal["keep", "reject"] = Field(
        "keep", description="an output that hit max_new_tokens without a stop token: kept and flagged in the "
        "status column, or rejected (reason generation_unfinished)")
    resources: ActorResources = Field(default_factory=lambda: ActorResources(batch_tokens=16384))


StageEntry = str | GenerateStageConfig


def check_stages(stages: list[StageEntry]) -> None:
    """The built-in stages once each, in order; generative stages between normalize and tokenize."""
    names = [s if isinstance(s, str) else s.stage for s in stages]
    unknown = [n for n in names if n not in BUILTIN_STAGES + GENERATIVE_STAGES]
    if unknown:
        raise ValueError(f"unknown stage(s) {unknown}; built in: {list(BUILTIN_STAGES)}, generative: "
                         f"{list(GENERATIVE_STAGES)} (a mapping with stage:, model:)")
    bare = [n for n in GENERATIVE_STAGES if n in stages]
    if bare:
        raise ValueError(f"stage {bare[0]!r} needs its model: write it as a mapping {{stage: {bare[0]}, model: "
                         "{path: ...}}")
    builtin = [n for n in names if n in BUILTIN_STAGES]
    if builtin != list(BUILTIN_STAGES):
        raise ValueError(f"stages must hold {' -> '.join(BUILTIN_STAGES)} once each, in that order; got {names}")
    first, last = names.index("normalize"), names.index("tokenize")
    for i, s in enumerate(stages):
        if not isinstance(s, str) and not first < i < last:
            raise ValueError(f"generative stage {s.stage!r} must come after normalize and before tokenize")
    outputs = [s.stage for s in stages if not isinstance(s, str)]
    if len(set(outputs)) != len(outputs):
        raise ValueError("each generative stage may appear once")


class SearchConfig(_Section):
    """Defaults for readers of the index (recorded in the manifest with the rest of the config)."""

    recall_target: float = Field(0.99, gt=0, le=1, description="a query without a tier uses the narrowest "
                                 "tier whose build-time rescored recall@10 reaches this (else the widest)")


class RerankConfig(_Stored, _Section):
    """A reranker: its family (from the registry; default: read from the checkpoint's config.json), the
    checkpoint, and how many retrieved candidates per query it reorders."""

    name: str | None = None
    path: str
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    force_dtype: bool = Field(False, description="run float16 on a family that refuses it (Qwen-based: overflow)")
    device: str | None = None
    depth: int = Field(50, gt=0, description="candidates per query reranked (the funnel's top N)")
    options: dict[str, Any] = Field(default_factory=dict, description="family options, e.g. max_length, "
                                    "batch_size (see the family's module)")
    storage: dict[str, Any] = Field(default_factory=dict)
    cache_dir: str | None = None


class JobConfig(_Section):
    source: SourceConfig
    model: ModelConfig = Field(default_factory=ModelConfig)
    outputs: OutputsConfig = Field(default_factory=OutputsConfig)
    index: IndexConfig
    resources: ResourcesConfig = Field(default_factory=ResourcesConfig)
    run: RunConfig = Field(default_factory=RunConfig)
    search: SearchConfig = Field(default_factory=SearchConfig)
    stages: list[StageEntry] = Field(default_factory=lambda: list(DEFAULT_STAGES), description=(
        "the build's stages in order: read, normalize, [html_to_markdown | caption ...], tokenize, embed, write"))

    @field_validator("stages")
    @classmethod
    def _stages(cls, v: list[StageEntry]) -> list[StageEntry]:
        check_stages(v)
        return v

    def generative_stages(self) -> list[GenerateStageConfig]:
        return [s for s in self.stages if isinstance(s, GenerateStageConfig)]


def _set_path(d: dict[str, Any], dotted: str, value: Any) -> None:
    """Set `a.b.c` in nested mappings; a number steps into a list (`stages.2.model.path`)."""
    keys = dotted.split(".")
    cur: Any = d
    for depth, k in enumerate(keys):
        last = depth == len(keys) - 1
        if isinstance(cur, list):
            if not k.isdigit() or int(k) >= len(cur):
                raise ValueError(f"cannot set {dotted!r}: {k!r} is not an index of a {len(cur)}-item list")
            if last:
                cur[int(k)] = value
                return
            cur = cur[int(k)]
            continue
        if not isinstance(cur, dict):
            raise ValueError(f"cannot set {dotted!r}: {keys[depth - 1]!r} is not a section")
        if last:
            cur[k] = value
            return
        if cur.get(k) is None:
            cur[k] = {}
        cur = cur[k]


def parse_override(item: str) -> tuple[str, Any]:
    """'index.tiers=[64,128]' -> ('index.tiers', [64, 128]); values are parsed as YAML."""
    if "=" not in item:
        raise ValueError(f"override {item!r} must look like key.path=value")
    key, raw = item.split("=", 1)
    return key.strip(), yaml.safe_load(raw) if raw.strip() else ""


def load_config(
    config: str | Path | dict[str, Any] | JobConfig,
    overrides: dict[str, Any] | None = None,
) -> JobConfig:
    """Load a job config from YAML (path) or dict, apply dotted overrides, validate."""
    if isinstance(config, JobConfig):
        if not overrides:
            return config
        config = config.model_dump()
    return JobConfig.model_validate(_config_data(config, overrides))


def _config_data(config: str | Path | dict[str, Any], overrides: dict[str, Any] | None) -> dict[str, Any]:
    """The mapping of a YAML file (path) or a dict, with dotted overrides applied."""
    if isinstance(config, dict):
        data = copy.deepcopy(config)
    else:
        path = Path(config)
        if not path.exists():
            raise FileNotFoundError(f"config file not found: {path}")
        data = yaml.safe_load(path.read_text()) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{path}: a config must be a mapping")
    for key, value in (overrides or {}).items():
        _set_path(data, key, value)
    return data


# -- `embindex retrieve`: queries -> search -> rerank -> results, run file, metrics -------------------------


class RetrieveIndexConfig(_Stored, _Section):
    uri: str
    version: str | None = Field(None, description="default: the latest, pinned when the job starts")
    model_path: str | None = Field(None, description="query encoder checkpoint (default: the manifest's)")
    storage: dict[str, Any] = Field(default_factory=dict)


class QueriesConfig(_Stored, _Section):
    """A query set: JSONL or Parquet file(s) (a file or a folder/prefix), local or object storage."""

    uri: str
    format: Literal["auto", "jsonl", "parquet"] = "auto"
    id_column: str = Field("id", description="query id column (BEIR's `_id` is found when `id` is absent)")
    text_column: str = "text"
    storage: dict[str, Any] = Field(default_factory=dict)


class QrelsConfig(_Stored, _Section):
    uri: str = Field(..., description="TREC, BEIR TSV or JSONL judgments")
    storage: dict[str, Any] = Field(default_factory=dict)


class RetrieveSearchConfig(_Section):
    k: int = Field(100, gt=0, description="results kept per query (and the deepest metric cut-off)")
    tier: int | None = Field(None, gt=0, description="tier of the final results (default: the index's default tier)")
    rescore: int | None = Field(None, ge=0, description="shortlist factor (default: the index's)")
    evaluate_tiers: bool = Field(True, description="with qrels: also score every tier alone and rescored")


class RetrieveResources(_Section):
    actors: int = Field(1, ge=1, description="search actors (each holds the query encoder and the tiers)")
    cpus_per_actor: float = Field(1, gt=0)
    gpus_per_actor: float = Field(0, ge=0)
    rerank_actors: int = Field(1, ge=1)
    rerank_cpus_per_actor: float = Field(1, gt=0)
    rerank_gpus_per_actor: float | None = Field(None, ge=0, description="default: 1 on a cluster with GPUs")
    batch_queries: int = Field(32, gt=0, description="queries per actor call")
    torch_threads: int | None = Field(None, gt=0)
    ray_address: str | None = None
    num_cpus: int | None = Field(None, gt=0, description="CPUs of a local Ray started in-process")


class RetrieveConfig(_Section):
    index: RetrieveIndexConfig
    queries: QueriesConfig
    qrels: QrelsConfig | None = None
    search: RetrieveSearchConfig = Field(default_factory=RetrieveSearchConfig)
    rerank: RerankConfig | None = None
    content: Literal["auto", "index", "source"] = Field(
        "auto", description="where reranker candidates come from: the index's stored content, or the "
        "build's source joined by id (auto: the index when it stores content)")
    source_storage: dict[str, Any] | None = Field(None, description="filesystem options of the build's source "
                                                  "for content: source (default: index.storage)")
    resources: RetrieveResources = Field(default_factory=RetrieveResources)
    output: str = Field(..., description="folder/prefix for results.parquet, run.trec, metrics.json")
    output_storage: dict[str, Any] = Field(default_factory=dict)
    run_name: str = "embindex"


def load_retrieve_config(config: str | Path | dict[str, Any], overrides: dict[str, Any] | None = None
                         ) -> RetrieveConfig:
    """Load an `embindex retrieve` config from YAML (path) or dict, apply dotted overrides, validate."""
    return RetrieveConfig.model_validate(_config_data(config, overrides))
