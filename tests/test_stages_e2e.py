"""Builds through generative stages, end to end: a WARC crawl on S3 through ReaderLM-v2, and a folder of
images through jina-vlm captions, each into a text-embedding index that is searched; a reindex regenerates
only the changed page."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner
from warcio.warcwriter import WARCWriter

from embindex.cli import app
from embindex.models.generator import GenerationInput
from test_s3 import _upload_dir
from test_web_sources import PNG, response

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).parent / "fixtures"
READERLM = FIXTURES / "readerlm-v2-tiny"
PAGES = ["news_article.html", "recipe_blog.html", "docs_page.html", "forum_thread.html", "produkt_de_zh.html"]
MAX_NEW = 32


def _url(page: str) -> str:
    return f"https://example.org/{page.removesuffix('.html')}"


def _crawl(pages: dict[str, bytes]) -> bytes:
    """A gzipped WARC: the pages, a PNG (not HTML) and a page that is empty once cleaned."""
    buf = io.BytesIO()
    w = WARCWriter(buf, gzip=True)
    for page, body in pages.items():
        w.write_record(response(w, _url(page), body))
    w.write_record(response(w, "https://example.org/logo.png", PNG, ctype="image/png"))
    w.write_record(response(w, "https://example.org/tracker", b"<script>track()</script><!-- x -->"))
    return buf.getvalue()


def _sets(values: dict) -> list[str]:
    return [a for k, v in values.items() for a in ("--set", f"{k}={json.dumps(v)}")]


def _stored(manifest: dict, store_root: str, opts: dict, column: str) -> dict[str, str]:
    """id -> `column` of every stored document row holding it (a document's first row)."""
    from embindex.storage import Storage, StorageOptions

    store = Storage(store_root, StorageOptions.from_dict(opts))
    out = {}
    for shard in manifest["shards"]:
        with store.fs.open(store.fs_path(shard["path"]), "rb") as f:
            for row in pq.read_table(f).to_pylist():
                if row.get(column) is not None:
                    out[row["id"]] = row
    return out


@pytest.fixture(scope="module")
def readerlm():
    from embindex.models.readerlm_v2 import ReaderLMV2

    return ReaderLMV2(str(READERLM), device="cpu", clean_svg=True, clean_base64=True)


def test_warc_on_s3_through_readerlm_then_reindex_one_changed_page(ray_cluster, s3_bucket, minilm_path, tmp_path,
                                                                   readerlm):
    bucket, opts, client = s3_bucket
    pages = {p: (READERLM / p).read_bytes() for p in PAGES}
    client.put_object(Bucket=bucket, Key="crawl/crawl-0.warc.gz", Body=_crawl(pages))
    _upload_dir(client, bucket, str(READERLM), "models/readerlm-v2")
    index = f"s3://{bucket}/indexes/web"
    sets = _sets({
        "source.uri": f"s3://{bucket}/crawl/", "source.storage": opts, "index.uri": index, "index.storage": opts,
        "index.tiers": [64, "full"], "index.quality_sample": 20,
        "stages.2.model.path": f"s3://{bucket}/models/readerlm-v2", "stages.2.model.storage": opts,
        "stages.2.model.cache_dir": str(tmp_path / "cache"), "stages.2.max_new_tokens": MAX_NEW,
        "stages.2.resources.gpus_per_actor": None, "stages.2.resources.batch_tokens": 8192,
        "model.name": "hf-encoder", "model.path": "builtin:all-MiniLM-L6-v2", "model.task": None,
        "model.max_length": 128, "resources.gpus_per_actor": None, "run.progress": False,
    })
    runner = CliRunner()
    r = runner.invoke(app, ["build", str(ROOT / "configs" / "web-readerlm.yaml"), *sets])
    assert r.exit_code == 0, r.output
    assert "rows in 7: indexed 5, rejected 2" in r.output
    assert "html_to_markdown (readerlm-v2): generated 5 document(s)" in r.output

    manifest = json.loads(client.get_object(Bucket=bucket, Key="indexes/web/versions/v000001/manifest.json")
                          ["Body"].read())
    assert {k: v for r_ in manifest["rejects"] for k, v in r_["reasons"].items()} == \
        {"not_html": 1, "empty_after_cleaning": 1}
    stage = manifest["stages"][2]
    assert stage["stage"] == "html_to_markdown" and stage["family"] == "readerlm-v2"
    assert stage["counts"]["documents"] == 5 and stage["fingerprint"].startswith("sha256:")
    assert [s for s in manifest["stages"] if isinstance(s, str)] == ["read", "normalize", "tokenize", "embed",
                                                                       "write"]
    assert manifest["config"]["stages"][2]["model"]["storage"]["secret"] == "***"

    # the stored Markdown is what ReaderLM-v2 writes for the page with the configured options
    stored = _stored(manifest, index, opts, "markdown")
    assert set(stored) == {_url(p) for p in PAGES}
    expected = readerlm.generate([GenerationInput(text=pages[p].decode()) for p in PAGES], MAX_NEW)
    for page, gen in zip(PAGES, expected):
        row = stored[_url(page)]
        assert row["markdown"] == gen.text and row["markdown_tokens"] == len(gen.ids)
        assert row["markdown_status"] == ("ok" if gen.finished else "unfinished")
        assert row["markdown_model"] == stage["fingerprint"]

    # searchable: a page's Markdown (the embedded text, stored as content) finds the page
    from embindex import open_index

    reader = open_index(index, storage=opts, model_path=minilm_path)
    target = _url("docs_page.html")
    hits = reader.search([stored[target]["content"]], k=3)[0]
    assert hits[0].id == target

    # a later crawl changes one page: the reindex regenerates that page only
    pages["forum_thread.html"] = pages["forum_thread.html"].replace(b"</body>", b"<p>A new reply.</p></body>")
    client.put_object(Bucket=bucket, Key="crawl/crawl-0.warc.gz", Body=_crawl(pages))
    r = runner.invoke(app, ["reindex", str(ROOT / "configs" / "web-readerlm.yaml"), *sets])
    assert r.exit_code == 0, r.output
    assert "html_to_markdown (readerlm-v2): generated 1 document(s)" in r.output
    manifest2 = json.loads(client.get_object(Bucket=bucket, Key="indexes/web/versions/v000002/manifest.json")
                           ["Body"].read())
    assert manifest2["stages"][2]["counts"]["documents"] == 1
    assert manifest2["delta"]["changed"] == 1 and manifest2["counts"]["documents"] == 5
    changed = readerlm.generate([GenerationInput(text=pages["forum_thread.html"].decode())], MAX_NEW)[0]
    restored = _stored(manifest2, index, opts, "markdown")
    assert restored[_url("forum_thread.html")]["markdown"] == changed.text

    # compaction copies the stored Markdown and generates nothing: the stage is kept, its counts are 0
    from embindex.incremental.compact import compact

    compacted = compact(index, storage=opts, force=True).model_dump(mode="json")
    assert compacted["stages"][2]["counts"] == {"documents": 0, "tokens": 0}
    assert compacted["stages"][2]["fingerprint"] == stage["fingerprint"] and compacted["stages"][:2] == ["read", "normalize"]
    assert _stored(compacted, index, opts, "markdown") == restored


VLM = FIXTURES / "jina-vlm-tiny"
CAPTION_PROMPT = "Write one sentence of alt text for this image."


def _png(width: int, height: int, seed: int) -> bytes:
    import numpy as np
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 255, (height, width, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def test_image_folder_through_jina_vlm_captions_into_a_text_index(ray_cluster, minilm_path, tmp_path):
    import embindex
    from embindex.models.jina_vlm import JinaVLM

    folder = tmp_path / "images"
    folder.mkdir()
    images = {"photo.png": (VLM / "photo_80x60.png").read_bytes(), "banner.png": (VLM / "banner_90x150.png")
              .read_bytes(), "noise.png": _png(120, 90, 0), "thin.png": _png(600, 2, 1)}
    for name, data in images.items():
        (folder / name).write_bytes(data)
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png")
    index = tmp_path / "index"
    result = embindex.build(ROOT / "configs" / "images-captioned.yaml", overrides={
        "source.uri": str(folder), "index.uri": str(index), "index.tiers": [64, "full"],
        "index.quality_sample": 10, "stages.2.model.path": str(VLM), "stages.2.max_new_tokens": 24,
        "stages.2.resources.gpus_per_actor": None, "model.name": "hf-encoder",
        "model.path": "builtin:all-MiniLM-L6-v2", "model.task": None, "model.max_length": 128,
        "resources.gpus_per_actor": None, "run.progress": False}, log=None)
    assert result.counts["rows_in"] == 5 and result.counts["documents"] == 3 and result.counts["rejected"] == 2
    reasons = {k for r in result.manifest.rejects for k in r.reasons}
    assert reasons == {"image_decode_error", "image_not_supported"}  # both from the caption stage
    caption = result.manifest.stages[2]
    assert caption["stage"] == "caption" and caption["counts"]["documents"] == 3

    # the stored caption is jina-vlm's for that image, next to the image; the caption is what was embedded
    vlm = JinaVLM(str(VLM), device="cpu", prompt=CAPTION_PROMPT)
    stored = _stored(result.manifest.model_dump(), str(index), {}, "caption")
    assert set(stored) == {"photo.png", "banner.png", "noise.png"}
    for name, gen in zip(stored, vlm.generate([GenerationInput(image=images[n]) for n in stored], 24)):
        row = stored[name]
        assert row["caption"] == gen.text and row["caption_tokens"] == len(gen.ids)
        assert row["content_image"] == images[name] and row["content"] == gen.text
        assert row["modality"] == "text" and row["caption_model"] == caption["fingerprint"]

    # a text query finds the image by its caption
    reader = embindex.open_index(str(index), model_path=minilm_path)
    assert reader.search([stored["banner.png"]["caption"]], k=1)[0][0].id == "banner.png"


def test_generative_and_embed_pools_share_one_gpu_with_fractions(tmp_path):
    """On a node with one GPU, a ReaderLM pool (0.75 GPU) and the embed pool (0.25) run at once: their own
    actor pools, scheduled side by side. Run in a fresh Ray (one logical GPU) in a subprocess; without CUDA
    the actors compute on the CPU."""
    import subprocess
    import sys

    pages = tmp_path / "pages"
    pages.mkdir()
    for p in PAGES:
        (pages / p).write_bytes((READERLM / p).read_bytes())
    cfg = {"source": {"uri": str(pages), "format": "html"},
           "stages": ["read", "normalize", {"stage": "html_to_markdown", "model": {"path": str(READERLM)},
                                            "max_new_tokens": 8,
                                            "resources": {"gpus_per_actor": 0.75, "cpus_per_actor": 1}},
                      "tokenize", "embed", "write"],
           "model": {"name": "hf-encoder", "path": "builtin:all-MiniLM-L6-v2", "max_length": 128},
           "index": {"uri": str(tmp_path / "index"), "tiers": ["full"], "quality_sample": 5},
           "resources": {"gpus_per_actor": 0.25, "cpus_per_actor": 1}, "run": {"progress": False}}
    script = ("import json, sys, ray, embindex\n"
              "ray.init(num_cpus=3, num_gpus=1, include_dashboard=False, log_to_driver=False)\n"
              "r = embindex.build(json.loads(sys.argv[1]))\n"
              "print(r.summary())\n")
    out = subprocess.run([sys.executable, "-c", script, json.dumps(cfg)], capture_output=True, text=True,
                         timeout=240, env={**__import__("os").environ, "RAY_ADDRESS": ""})
    assert out.returncode == 0, out.stderr[-3000:]
    assert "html_to_markdown actors: 1 x (1 CPU, 0.75 GPU" in out.stderr
    assert "embed actors: 1 x (1 CPU, 0.25 GPU" in out.stderr
    assert "rows in 5: indexed 5, rejected 0" in out.stdout
    assert "html_to_markdown (readerlm-v2): generated 5 document(s)" in out.stdout
