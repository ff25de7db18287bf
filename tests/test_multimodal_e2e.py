"""Multimodal builds end to end on real Ray with corpora on the loopback S3 server: a mixed text + image
Parquet corpus with broken images (jina-clip-v2), an image folder with multi-vectors (jina-embeddings-v4),
and text -> image / image -> image search."""

from __future__ import annotations

import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

import embindex
from conftest import FIXTURES, job_config, sample_docs
from embindex.index.multivector import maxsim_scores
from embindex.models import ModelSpec, load_family
from embindex.models.embedder import Embedder
from embindex.sources.normalize import Reasons

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


def make_images(n: int, seed: int = 0) -> list[bytes]:
    """Distinct synthetic images: random sizes, a colour field, noise and a block; PNG and JPEG."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        h, w = int(rng.integers(30, 120)), int(rng.integers(30, 120))
        arr = np.clip(rng.normal(rng.integers(0, 255, 3), 40, (h, w, 3)), 0, 255).astype(np.uint8)
        arr[h // 4 : h // 2, w // 3 : w // 2] = rng.integers(0, 255, 3)
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format="PNG" if i % 2 else "JPEG")
        out.append(buf.getvalue())
    return out


def big_png() -> bytes:
    """1200 x 1000 pixels in a few KB: over the pixel limit, not the byte limit."""
    buf = io.BytesIO()
    Image.new("RGB", (1200, 1000), (10, 200, 10)).save(buf, "PNG")
    return buf.getvalue()


def truncated_jpeg() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (90, 90, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()[: len(buf.getvalue()) // 2]


def test_mixed_corpus_clip_v2_from_s3(ray_cluster, s3_bucket):
    bucket, opts, client = s3_bucket
    images = make_images(10)
    for i in range(3):  # three images referenced by path
        client.put_object(Bucket=bucket, Key=f"corpus/files/img{i}.png", Body=images[7 + i])
    texts = sample_docs(8)
    struct = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    rows = (
        [{"id": d["id"], "text": d["text"], "image": None} for d in texts]
        + [{"id": f"img-{i}", "text": f"caption {i}", "image": {"bytes": images[i], "path": None}} for i in range(7)]
        + [{"id": f"img-{7 + i}", "text": None, "image": {"bytes": None, "path": f"files/img{i}.png"}}
           for i in range(3)]
        + [{"id": "corrupt", "text": None, "image": {"bytes": b"\x89PNG\r\n\x1a\nnot really", "path": None}},
           {"id": "truncated", "text": None, "image": {"bytes": truncated_jpeg(), "path": None}},
           {"id": "huge", "text": None, "image": {"bytes": big_png(), "path": None}},
           {"id": "missing-file", "text": None, "image": {"bytes": None, "path": "files/nope.png"}},
           {"id": "nothing", "text": None, "image": None}]
    )
    table = pa.Table.from_pylist(rows, schema=pa.schema([("id", pa.string()), ("text", pa.string()),
                                                         ("image", struct)]))
    buf = io.BytesIO()
    pq.write_table(table, buf, row_group_size=9)
    client.put_object(Bucket=bucket, Key="corpus/rows.parquet", Body=buf.getvalue())

    model_dir = str(FIXTURES / "jina-clip-v2-tiny")
    index_uri = f"s3://{bucket}/idx/clip"
    cfg = job_config(f"s3://{bucket}/corpus/rows.parquet", index_uri,
                     source={"storage": opts, "fragment_rows": 9, "max_image_pixels": 1000 * 1000,
                             "image_column": "image"},
                     index={"storage": opts, "tiers": [8, "full"]},
                     model={"name": "jina-clip-v2", "path": model_dir, "max_length": 128})
    result = embindex.build(cfg, log=None)
    c = result.counts
    assert c["rows_in"] == len(rows) == c["documents"] + c["rejected"]
    assert c["documents"] == 8 + 10
    reasons = {}
    for r in result.manifest.rejects:
        for k, v in r.reasons.items():
            reasons[k] = reasons.get(k, 0) + v
    assert reasons == {Reasons.IMAGE_UNREADABLE: 3, Reasons.IMAGE_TOO_LARGE: 1, Reasons.MISSING_TEXT: 1}
    assert result.manifest.model.modalities == ["text", "image"]

    reader = embindex.open_index(index_uri, storage=opts)
    fam = load_family(ModelSpec(name="jina-clip-v2", path=model_dir, dtype="float32", max_length=128))
    emb = Embedder(fam)
    by_id = {i: row for row, i in enumerate(reader.ids)}
    # stored vectors equal the model's own (fp16 storage): images from bytes, texts with the document role
    img_ref = emb.encode_images(images)
    txt_ref = emb.encode([d["text"] for d in texts], role="document")
    for i in range(10):
        assert np.abs(reader.vectors[by_id[f"img-{i}"]] - img_ref[i]).max() < 2e-3
    for d, ref in zip(texts, txt_ref):
        assert np.abs(reader.vectors[by_id[d["id"]]] - ref).max() < 2e-3
    hit = reader.search_images(images[3], k=1)[0][0]
    assert hit.id == "img-3" and hit.modality == "image" and hit.score > 0.999
    assert hit.meta == {"text": "caption 3"}  # the caption column travels as metadata

    # text -> image: only image rows, ranked exactly as brute force over the stored image vectors
    queries = ["a red square", "sunset over the sea"]
    hits = reader.search(queries, k=4, modality="image", rescore=100)
    q = emb.encode(queries, role="query")
    image_rows = np.array([by_id[f"img-{i}"] for i in range(10)])
    for qv, hs in zip(q, hits):
        assert all(h.modality == "image" for h in hs)
        brute = reader.vectors[image_rows] @ qv
        assert [h.id for h in hs] == [reader.ids[image_rows[j]] for j in np.argsort(-brute)[:4]]
    assert all(h.modality == "text" for h in reader.search_images(images[0], k=3, modality="text")[0])


def test_image_folder_v4_multivector_from_s3(ray_cluster, s3_bucket):
    bucket, opts, client = s3_bucket
    images = make_images(6, seed=3)
    for i, data in enumerate(images):
        client.put_object(Bucket=bucket, Key=f"pages/p{i}.{'png' if i % 2 else 'jpg'}", Body=data)
    client.put_object(Bucket=bucket, Key="pages/broken.png", Body=b"\x89PNG\r\n\x1a\n" + b"\0" * 64)
    client.put_object(Bucket=bucket, Key="pages/readme.txt", Body=b"Passage about invoices and totals.")
    model_dir = str(FIXTURES / "jina-embeddings-v4-tiny")
    index_uri = f"s3://{bucket}/idx/v4"
    cfg = job_config(f"s3://{bucket}/pages/", index_uri, source={"storage": opts, "fragment_files": 4},
                     index={"storage": opts, "tiers": [16, "full"]},
                     model={"name": "jina-embeddings-v4", "path": model_dir, "task": "retrieval", "max_length": 256},
                     outputs={"multivector": {"candidates": "tokens", "token_k": 100_000}})
    result = embindex.build(cfg, log=None)
    assert result.manifest.source["format"] == "mixed"
    assert result.counts["documents"] == 7 and result.counts["rejected"] == 1
    mv = result.manifest.outputs["multivector"]
    assert result.manifest.dim == 64 and mv["dim"] == 16  # 64-d single vectors, 16-d token vectors

    reader = embindex.open_index(index_uri, storage=opts)
    fam = load_family(ModelSpec(name="jina-embeddings-v4", path=model_dir, dtype="float32", task="retrieval",
                                max_length=256))
    emb = Embedder(fam)
    pixels = emb.prepare_images(images)
    single, tokens = emb.embed_images(pixels, "retrieval", tokens=True)
    stored = reader.token_vectors()
    for i in range(6):
        row = reader.ids.index(f"p{i}.{'png' if i % 2 else 'jpg'}")
        assert np.abs(reader.vectors[row] - single[i]).max() < 2e-3
        assert stored[row].shape == tokens[i].shape and np.abs(stored[row] - tokens[i]).max() < 2e-3
    # image -> image by MaxSim: the page itself first, scores equal brute-force MaxSim
    hits = reader.search_images([images[2]], k=3, modality="image")[0]
    assert hits[0].id == "p2.jpg" and all(h.modality == "image" for h in hits)
    brute = maxsim_scores(tokens[2], stored)
    assert abs(hits[0].score - brute.max()) < 1e-3
    # text query with the query prefix and the retrieval adapter, MaxSim over every row
    q_single, q_tokens = emb.encode_multi(["total of the invoice"], role="query", task="retrieval")
    hits = reader.search(["total of the invoice"], k=7)[0]
    brute = maxsim_scores(q_tokens[0], stored)
    assert [h.id for h in hits] == [reader.ids[j] for j in np.argsort(-brute, kind="stable")[:7]]
    assert json.loads(json.dumps(hits[0].to_dict()))["modality"] in ("text", "image")
    # a tiny token_k with a modality filter still finds k documents of that modality (the shortlist widens)
    narrow = reader.search_multivector(["total of the invoice"], k=6, token_k=1, modality="image")[0]
    assert len(narrow) == 6 and {h.modality for h in narrow} == {"image"}
    assert [h.id for h in narrow] == [h.id for h in hits if h.modality == "image"]


def test_v4_late_chunking_mixed_folder_and_image_rows_whole(ray_cluster, tmp_path):
    """Late chunking on jina-embeddings-v4 (code adapter): text files become chunk rows pooled from one
    forward pass; image files stay one row (no chunk) with the image vector."""
    import torch

    from embindex.text.chunking import ChunkSpec, chunk_spans, token_spans

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    texts = {f"doc{i}.md": " ".join(d["text"].split()[:60]) + ". Second sentence here. And a third one."
             for i, d in enumerate(sample_docs(4))}
    for name, text in texts.items():
        (corpus / name).write_text(text)
    images = make_images(2, seed=9)
    for i, data in enumerate(images):
        (corpus / f"fig{i}.png").write_bytes(data)
    model_dir = str(FIXTURES / "jina-embeddings-v4-tiny")
    cfg = job_config(str(corpus), str(tmp_path / "idx"), index={"tiers": ["full"]},
                     model={"name": "jina-embeddings-v4", "path": model_dir, "task": "code", "max_length": 512},
                     outputs={"late_chunking": {"chunker": "sentences", "n_sentences": 1}})
    result = embindex.build(cfg, log=None)
    assert result.counts["documents"] == 6 and result.counts["chunks"] > 6
    reader = embindex.open_index(str(tmp_path / "idx"))
    fam = load_family(ModelSpec(name="jina-embeddings-v4", path=model_dir, dtype="float32", task="code",
                                max_length=512))
    emb = Embedder(fam)
    img_ref = emb.encode_images(images, task="code")
    for i in range(2):
        rows = [j for j, x in enumerate(reader.ids) if x == f"fig{i}.png"]
        assert len(rows) == 1 and reader._chunks[rows[0]] is None
        assert np.abs(reader.vectors[rows[0]] - img_ref[i]).max() < 2e-3
    for name, text in texts.items():
        t = emb.tokenizer.encode_with_offsets(text, "document", "code", truncate=False)
        chars = chunk_spans(text, ChunkSpec("sentences", n_sentences=1), t.offsets)
        ids = torch.from_numpy(t.ids.astype(np.int64))[None]
        states = emb.encoder.forward_token_states(ids, torch.ones_like(ids), "code")[0].float()
        stored = sorted((reader._chunks[j]["index"], j) for j, x in enumerate(reader.ids) if x == name)
        assert [(reader._chunks[j]["start"], reader._chunks[j]["end"]) for _, j in stored] == chars
        for (_, j), (s, e) in zip(stored, token_spans(t.offsets, chars)):
            ref = states[s:e].mean(0)
            assert float(np.dot(reader.vectors[j], (ref / ref.norm()).numpy())) > 0.9995
    hits = reader.search_images(images[1], k=2, modality="image")[0]
    assert hits[0].id == "fig1.png" and hits[0].chunk is None


def test_image_folder_reindex_and_cli_image_search(ray_cluster, tmp_path):
    """Incremental re-indexing of an image folder (content hash = image bytes): a replaced image is
    embedded again, an unchanged one is not, a deleted one disappears; `embindex search --image`."""
    from typer.testing import CliRunner

    from embindex.cli import app
    from embindex.reindex import reindex

    folder = tmp_path / "photos"
    folder.mkdir()
    images = make_images(6, seed=11)
    for i in range(5):
        (folder / f"{i}.png").write_bytes(images[i])
    index_uri = str(tmp_path / "idx")
    model_dir = str(FIXTURES / "jina-clip-v2-tiny")
    cfg = job_config(str(folder), index_uri, index={"tiers": [8, "full"]},
                     model={"name": "jina-clip-v2", "path": model_dir})
    first = reindex(cfg, log=None)
    assert first.counts["documents"] == 5
    (folder / "1.png").write_bytes(images[5])  # replaced content, same id
    (folder / "4.png").unlink()
    second = reindex(cfg, log=None)
    m = second.manifest
    assert m.delta["changed"] == 1 and m.delta["deleted"] == 1 and m.delta["unchanged"] == 3
    assert m.delta["documents_embedded"] == 1

    reader = embindex.open_index(index_uri)
    hit = reader.search_images(images[5], k=1)[0][0]
    assert hit.id == "1.png" and hit.score > 0.999  # the new content under the old id
    assert all(h.id != "4.png" for h in reader.search_images(images[4], k=5)[0])

    (tmp_path / "q.png").write_bytes(images[2])
    out = CliRunner().invoke(app, ["search", index_uri, "--image", str(tmp_path / "q.png"), "-k", "2", "--json"])
    assert out.exit_code == 0, out.output
    line = json.loads(out.stdout.strip().splitlines()[0])
    assert line["query"] == f"image:{tmp_path / 'q.png'}" and line["hits"][0]["id"] == "2.png"
    assert line["hits"][0]["modality"] == "image"
    both = CliRunner().invoke(app, ["search", index_uri, "a photo", "--image", str(tmp_path / "q.png"), "-k", "1"])
    assert both.exit_code == 0 and "query: a photo" in both.stdout and "2.png [image]" in both.stdout
    none = CliRunner().invoke(app, ["search", index_uri])
    assert none.exit_code != 0


def test_text_only_model_rejects_images_of_a_mixed_folder(ray_cluster, tmp_path):
    folder = tmp_path / "mixed"
    folder.mkdir()
    (folder / "a.txt").write_text("plain text document about files")
    (folder / "b.png").write_bytes(make_images(1)[0])
    result = embindex.build(job_config(str(folder), str(tmp_path / "idx")), log=None)
    assert result.counts["documents"] == 1 and result.counts["rejected"] == 1
    assert result.manifest.rejects[0].reasons == {Reasons.UNSUPPORTED_MODALITY: 1}
    reader = embindex.open_index(str(tmp_path / "idx"))
    assert reader.search("files", k=1)[0][0].modality == "text"
    with pytest.raises(ValueError, match="takes no images"):
        reader.search_images(make_images(1)[0])


def test_reindex_with_images_rejected_late_and_old_shards_without_modality(ray_cluster, tmp_path):
    """Rows only the embed pass can reject (an undecodable image, an image for a text-only model) do not
    break later reindexes; shards written before the modality column still search as text."""
    import pyarrow.parquet as pq_

    from embindex.reindex import reindex

    docs = sample_docs(12)
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\nbroken")
    (tmp_path / "imgs" / "good.png").write_bytes(make_images(1)[0])
    rows = docs + [{"id": "bad", "image": "imgs/bad.png"}, {"id": "good", "image": "imgs/good.png"}]
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = job_config(str(tmp_path / "rows.jsonl"), str(tmp_path / "idx"), source={"image_column": "image"})
    first = reindex(cfg, log=None)
    assert first.counts["documents"] == 12 and first.counts["rejected"] == 2  # text-only model
    second = reindex(cfg, log=None)  # nothing changed
    assert second.counts == first.counts and second.manifest.delta["rejected_when_embedded"] == 2
    assert second.manifest.delta["documents_embedded"] == 0

    # drop the modality column from every shard (an index written before image support)
    for shard in second.manifest.shards:
        path = tmp_path / "idx" / shard.path
        pq_.write_table(pq_.read_table(path).drop_columns(["modality"]), path)
    reader = embindex.open_index(str(tmp_path / "idx"))
    hits = reader.search(docs[3]["text"], k=3)[0]
    assert hits[0].id == docs[3]["id"] and hits[0].modality == "text"
    assert reader.search(docs[3]["text"], k=3, modality="image")[0] == []


def test_v4_multivector_reindex_and_compact(ray_cluster, tmp_path):
    """Token index of a v4 multi-vector build (128-d tokens vs 2048-d single vectors in the real model;
    16 vs 64 here) is rebuilt at the token width by reindex and compact."""
    from embindex.incremental.compact import compact
    from embindex.reindex import reindex

    folder = tmp_path / "pages"
    folder.mkdir()
    images = make_images(4, seed=21)
    for i in range(3):
        (folder / f"p{i}.png").write_bytes(images[i])
    cfg = job_config(str(folder), str(tmp_path / "idx"), index={"tiers": ["full"]},
                     model={"name": "jina-embeddings-v4", "path": str(FIXTURES / "jina-embeddings-v4-tiny"),
                            "task": "retrieval"},
                     outputs={"multivector": {"candidates": "tokens"}})
    reindex(cfg, log=None)
    (folder / "p3.png").write_bytes(images[3])
    second = reindex(cfg, log=None)
    assert second.manifest.delta["added"] == 1 and second.manifest.outputs["multivector"]["dim"] == 16
    hit = embindex.open_index(str(tmp_path / "idx")).search_images(images[3], k=1)[0][0]
    assert hit.id == "p3.png"
    compact(str(tmp_path / "idx"), force=True, log=None)
    hit = embindex.open_index(str(tmp_path / "idx")).search_images(images[1], k=1)[0][0]
    assert hit.id == "p1.png"
