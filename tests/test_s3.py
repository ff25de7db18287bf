"""Object storage on a real S3 server (moto server mode on loopback): s3:// corpus, model and index."""

from __future__ import annotations

import gzip
import io
import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import embindex
from conftest import job_config, sample_docs
from embindex.checkpoints import resolve_model_path
from embindex.storage import Storage, StorageOptions

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


def _upload_dir(client, bucket: str, local: str, prefix: str) -> None:
    for root, _, names in os.walk(local):
        for n in names:
            full = os.path.join(root, n)
            client.upload_file(full, bucket, f"{prefix}/{os.path.relpath(full, local)}")


def test_build_from_s3_into_s3_and_search_from_s3(ray_cluster, s3_bucket, minilm_path, tmp_path, capsys):
    bucket, opts, client = s3_bucket
    docs = sample_docs(120)
    # corpus: two Parquet files and one gzipped JSONL would be two formats; use Parquet + a bad row
    table = pa.table({"id": [d["id"] for d in docs[:60]], "text": [d["text"] for d in docs[:60]],
                      "module": [d["module"] for d in docs[:60]]})
    buf = io.BytesIO()
    pq.write_table(table, buf)
    client.put_object(Bucket=bucket, Key="corpus/part-0.parquet", Body=buf.getvalue())
    table2 = pa.table({"id": [d["id"] for d in docs[60:]] + ["empty"],
                       "text": [d["text"] for d in docs[60:]] + [""],
                       "module": [d["module"] for d in docs[60:]] + ["m"]})
    buf = io.BytesIO()
    pq.write_table(table2, buf)
    client.put_object(Bucket=bucket, Key="corpus/part-1.parquet", Body=buf.getvalue())
    _upload_dir(client, bucket, minilm_path, "models/minilm")

    cfg = job_config(f"s3://{bucket}/corpus/", f"s3://{bucket}/indexes/docs",
                     source={"storage": opts}, index={"storage": opts},
                     model={"path": f"s3://{bucket}/models/minilm", "storage": opts,
                            "cache_dir": str(tmp_path / "cache")})
    logs: list[str] = []
    result = embindex.build(cfg, log=logs.append)
    assert result.counts == {"rows_in": 121, "documents": 120, "chunks": 120, "vectors": 120, "rejected": 1}

    # the checkpoint was fetched once into the node cache and hashes like the local copy
    cached = [d for d in os.listdir(tmp_path / "cache") if not d.endswith(".lock")]
    assert len(cached) == 1
    from embindex.models.checkpoint_files import checkpoint_hash
    assert result.manifest.model.checkpoint_hash == checkpoint_hash(minilm_path)

    # the version is in the bucket, _latest included
    keys = {o["Key"] for o in client.list_objects_v2(Bucket=bucket, Prefix="indexes/docs/")["Contents"]}
    assert "indexes/docs/_latest" in keys and "indexes/docs/versions/v000001/manifest.json" in keys
    assert all(f"indexes/docs/{s.path}" in keys for s in result.manifest.shards)
    assert all(f"indexes/docs/{t.files[0]}" in keys for t in result.manifest.tiers)

    # search straight from s3://
    reader = embindex.open_index(f"s3://{bucket}/indexes/docs", storage=opts,
                                 model_path=minilm_path)
    for tier in (32, 128, 384):
        hits = reader.search([docs[5]["text"], docs[90]["text"]], k=5, tier=tier)
        assert [h[0].id for h in hits] == [docs[5]["id"], docs[90]["id"]]

    # credentials are never logged nor stored in the manifest
    manifest_text = client.get_object(Bucket=bucket, Key="indexes/docs/versions/v000001/manifest.json")[
        "Body"].read().decode()
    out = capsys.readouterr()
    for blob in ("\n".join(logs), manifest_text, out.out, out.err, repr(result)):
        assert opts["secret"] + '"' not in blob and f"'{opts['secret']}'" not in blob
    stored = json.loads(manifest_text)["config"]
    assert stored["index"]["storage"]["secret"] == "***" and stored["source"]["storage"]["key"] == "***"


def test_storage_env_fallback_and_repr(monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDEXAMPLE")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "topsecretvalue")
    r = StorageOptions().resolved()
    assert r.endpoint_url == "http://127.0.0.1:9" and r.key == "AKIDEXAMPLE" and r.secret == "topsecretvalue"
    assert "topsecretvalue" not in repr(r) and "AKIDEXAMPLE" not in repr(r)
    # explicit options win over the environment
    assert StorageOptions(endpoint_url="http://127.0.0.1:8").resolved().endpoint_url == "http://127.0.0.1:8"


def test_storage_roundtrip_on_s3(s3_bucket):
    bucket, opts, _ = s3_bucket
    store = Storage(f"s3://{bucket}/x", StorageOptions.from_dict(opts))
    store.write_text("a/b.txt", "hello")
    assert store.read_text("a/b.txt") == "hello" and store.exists("a/b.txt")
    assert store.listdir("a") == ["b.txt"]


def test_model_fetch_from_s3_is_cached(s3_bucket, minilm_path, tmp_path):
    bucket, opts, client = s3_bucket
    _upload_dir(client, bucket, minilm_path, "m")
    first = resolve_model_path(f"s3://{bucket}/m", StorageOptions.from_dict(opts), str(tmp_path))
    assert os.path.exists(os.path.join(first, "model.safetensors"))
    client.delete_object(Bucket=bucket, Key="m/config.json")  # a second resolve must not touch S3
    assert resolve_model_path(f"s3://{bucket}/m", StorageOptions.from_dict(opts), str(tmp_path)) == first
    with pytest.raises(FileNotFoundError):
        resolve_model_path(f"s3://{bucket}/nothing-here", StorageOptions.from_dict(opts), str(tmp_path))


def test_gz_jsonl_from_s3(ray_cluster, s3_bucket, tmp_path):
    bucket, opts, client = s3_bucket
    docs = sample_docs(30)
    body = gzip.compress("".join(json.dumps(d) + "\n" for d in docs).encode())
    client.put_object(Bucket=bucket, Key="c/docs.jsonl.gz", Body=body)
    cfg = job_config(f"s3://{bucket}/c/docs.jsonl.gz", str(tmp_path / "idx"), source={"storage": opts})
    result = embindex.build(cfg, log=None)
    assert result.counts["documents"] == 30 and result.counts["rejected"] == 0


def test_checkpoint_files_and_hash_count_pickled_weights_only_where_they_are_loaded(tmp_path, monkeypatch):
    """A sentence-transformers Dense head saved as pytorch_model.bin is fetched and fingerprinted; a .bin
    beside safetensors (a duplicate the loader never reads) is neither."""
    from embindex.checkpoints import checkpoint_files, default_cache_dir
    from embindex.models.checkpoint_files import checkpoint_hash

    paths = ["m/config.json", "m/model.safetensors", "m/pytorch_model.bin", "m/2_Dense/config.json",
             "m/2_Dense/pytorch_model.bin", "m/notes.md"]
    assert checkpoint_files(paths) == ["m/config.json", "m/model.safetensors", "m/2_Dense/config.json",
                                       "m/2_Dense/pytorch_model.bin"]
    for p in paths:
        (tmp_path / p).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / p).write_bytes(p.encode())
    before = checkpoint_hash(str(tmp_path / "m"))
    (tmp_path / "m/pytorch_model.bin").write_bytes(b"other")  # not loaded: same hash
    assert checkpoint_hash(str(tmp_path / "m")) == before
    (tmp_path / "m/2_Dense/pytorch_model.bin").write_bytes(b"other")  # the Dense weights: a new hash
    assert checkpoint_hash(str(tmp_path / "m")) != before
    monkeypatch.setenv("EMBINDEX_CACHE", str(tmp_path / "cache"))  # one root: models/ beside the tier cache's tiers/
    assert default_cache_dir() == str(tmp_path / "cache" / "models")
