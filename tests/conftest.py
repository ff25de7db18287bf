"""Shared fixtures: one local Ray cluster per session, a real S3 server (moto) on loopback, corpora."""

from __future__ import annotations

import gzip
import json
import os
import re
import socket
from importlib.resources import files
from pathlib import Path

import pytest

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("RAY_worker_niceness", "0")

FIXTURES = Path(__file__).parent / "fixtures"
S3_KEY, S3_SECRET, S3_REGION = "testing", "testing", "us-east-1"
SESSION_WORKERS_KEPT = 6  # worker processes (actors included) the session's Ray keeps alive; see ray_cluster


def sample_docs(n: int | None = None) -> list[dict]:
    """Real text: the bundled sample corpus (Python stdlib docstrings)."""
    path = files("embindex") / "data" / "sample_corpus.jsonl.gz"
    with gzip.open(str(path), "rt", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    return rows[:n] if n else rows


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray for the whole session: 3 logical CPUs so read tasks never starve the actors.

    Idle workers are kept between builds (`num_workers_soft_limit`): by default Ray keeps at most num_cpus
    (3) worker processes, counting actors, and kills idle ones after a second; Ray Data's helper actors
    (stats, autoscaling coordinator, actor location tracker) already hold 3, so every build started fresh
    workers for its census, write and tier tasks (1-2 per build, ~1-3 s each on 2 cores)."""
    import ray
    import ray.data

    ray.init(num_cpus=3, include_dashboard=False, log_to_driver=False, configure_logging=False,
             _system_config={"num_workers_soft_limit": SESSION_WORKERS_KEPT})
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_server():
    """A real S3-compatible HTTP server (moto server mode) on a free loopback port."""
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    yield {"endpoint_url": endpoint, "key": S3_KEY, "secret": S3_SECRET, "region": S3_REGION}
    server.stop()


@pytest.fixture()
def s3_bucket(s3_server, request):
    """A fresh bucket on the loopback server; returns (bucket name, storage options)."""
    import boto3

    name = "b-" + re.sub(r"[^a-z0-9]+", "-", request.node.name.lower())[:40].strip("-")
    client = boto3.client("s3", endpoint_url=s3_server["endpoint_url"], aws_access_key_id=S3_KEY,
                          aws_secret_access_key=S3_SECRET, region_name=S3_REGION)
    client.create_bucket(Bucket=name)
    return name, dict(s3_server), client


@pytest.fixture(scope="session")
def minilm_path() -> str:
    from embindex.checkpoints import resolve_model_path

    return resolve_model_path("builtin:all-MiniLM-L6-v2")


@pytest.fixture(scope="module")
def tokenizer(family):
    """The tokenizer of the test module's `family` fixture."""
    return family.load_tokenizer()


@pytest.fixture(scope="module")
def encoder(family):
    """The CPU encoder of the test module's `family` fixture."""
    return family.load_encoder("cpu")


def pooled_batch(tokenizer, encoder, ids, task=None, side: str = "right", role=None):
    """`encoder.forward_pooled` of token id lists padded as one batch -> [B, D] fp32 numpy."""
    import torch

    from embindex.text.batching import pad_batch

    input_ids, mask = pad_batch(ids, tokenizer.pad_token_id, side)
    out = encoder.forward_pooled(torch.from_numpy(input_ids), torch.from_numpy(mask), task, role)
    assert out.dtype == torch.float32
    return out.numpy()


def job_config(source_uri: str, index_uri: str, **sections) -> dict:
    """A small, fast job config on the bundled MiniLM (fp32 for reference-exact vectors)."""
    cfg = {
        "source": {"uri": source_uri},
        "model": {"name": "hf-encoder", "path": "builtin:all-MiniLM-L6-v2", "dtype": "float32",
                  "max_length": 128},
        "index": {"uri": index_uri, "tiers": [32, 64, 128, "full"], "quality_sample": 100},
        "resources": {"actors": 1, "cpus_per_actor": 1, "batch_tokens": 8192},
        "run": {"progress": False},
    }
    for name, values in sections.items():
        cfg.setdefault(name, {}).update(values)
    return cfg
