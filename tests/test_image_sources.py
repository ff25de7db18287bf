"""Image rows from every source shape (folders, Parquet bytes / structs / paths, JSONL paths), local and
on the loopback S3 server, and the CPU preparation step: bad images become rejects with a reason."""

from __future__ import annotations

import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from embindex.config import SourceConfig
from embindex.embed.image_inputs import pixels_of, prepare_image_rows
from embindex.models.images import decode_image, open_image
from embindex.models.base import ImageProcessor
from embindex.sources.fragments import read_fragment
from embindex.sources.normalize import Reasons
from embindex.sources.readers import open_corpus

FIXTURES = __import__("pathlib").Path(__file__).parent / "fixtures"


def png(w: int = 20, h: int = 10, color=(200, 30, 30), mode: str = "RGB", fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, (w, h), color if mode == "RGB" else None).save(buf, format=fmt)
    return buf.getvalue()


def read_all(cfg: SourceConfig) -> pa.Table:
    corpus = open_corpus(cfg)
    return pa.concat_tables(read_fragment(f, corpus.fs, corpus.rules, corpus.root) for f in corpus.fragments)


class HalfSize(ImageProcessor):
    """A real (if simple) processor: halve each side with Pillow, RGB."""

    def __call__(self, image):
        w, h = image.size
        return np.asarray(image.convert("RGB").resize((max(1, w // 2), max(1, h // 2)), Image.BICUBIC))

    def sequence_length(self, height: int, width: int) -> int:
        return height * width


def test_image_folder_mixed_with_text(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "red.png").write_bytes(png())
    (tmp_path / "b.JPG").write_bytes(png(fmt="JPEG"))
    (tmp_path / "note.txt").write_text("a caption file")
    corpus = open_corpus(SourceConfig(uri=str(tmp_path)))
    assert corpus.format == "mixed"
    t = read_all(SourceConfig(uri=str(tmp_path)))
    rows = {r["id"]: r for r in t.to_pylist()}
    assert set(rows) == {"a/red.png", "b.JPG", "note.txt"}
    assert rows["a/red.png"]["modality"] == "image" and rows["a/red.png"]["image"] == png()
    assert rows["a/red.png"]["text"] is None and rows["a/red.png"]["content_hash"]
    assert rows["note.txt"]["modality"] == "text" and rows["note.txt"]["image"] is None
    only_images = SourceConfig(uri=str(tmp_path / "a"))
    assert open_corpus(only_images).format == "images"


def test_parquet_image_bytes_structs_and_paths(tmp_path):
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "p.png").write_bytes(png(color=(0, 0, 255)))
    table = pa.table({
        "id": ["bytes", "struct", "path", "missing", "text", "both", "toolarge"],
        "image": pa.array([
            {"bytes": png(), "path": None},
            {"bytes": png(color=(0, 255, 0)), "path": "x.png"},
            {"bytes": None, "path": "imgs/p.png"},
            {"bytes": None, "path": "imgs/nope.png"},
            None,
            {"bytes": png(), "path": None},
            {"bytes": b"\x89PNG" + b"0" * 5000, "path": None},
        ], pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
        "text": [None, None, None, None, "plain text row", "a caption", None],
        "lang": ["x"] * 7,
    })
    pq.write_table(table, tmp_path / "corpus.parquet")
    t = read_all(SourceConfig(uri=str(tmp_path / "corpus.parquet"), image_column="image", max_image_bytes=4000))
    rows = {r["id"]: r for r in t.to_pylist()}
    assert rows["bytes"]["image"] == png() and rows["bytes"]["modality"] == "image"
    assert rows["struct"]["image"] == png(color=(0, 255, 0))
    assert rows["path"]["image"] == png(color=(0, 0, 255))
    assert rows["missing"]["reject"] == Reasons.IMAGE_UNREADABLE and "imgs/nope.png" in rows["missing"]["reject_detail"]
    assert rows["text"]["modality"] == "text" and rows["text"]["text"] == "plain text row"
    # an image row keeps its text (a caption) as metadata, and the image is what is embedded
    assert rows["both"]["modality"] == "image" and json.loads(rows["both"]["meta"]) == {"text": "a caption",
                                                                                        "lang": "x"}
    assert rows["toolarge"]["reject"] == Reasons.IMAGE_TOO_LARGE
    assert len(rows) == 7


def test_parquet_plain_binary_and_string_path_columns(tmp_path):
    (tmp_path / "i.png").write_bytes(png())
    pq.write_table(pa.table({"id": ["b", "s"], "img": pa.array([png(), None], pa.binary()),
                             "text": [None, "t"]}), tmp_path / "a.parquet")
    rows = {r["id"]: r for r in read_all(SourceConfig(uri=str(tmp_path / "a.parquet"), image_column="img")).to_pylist()}
    assert rows["b"]["image"] == png() and rows["s"]["modality"] == "text"
    pq.write_table(pa.table({"id": ["p"], "image": [str(tmp_path / "i.png")]}), tmp_path / "b.parquet")
    rows = read_all(SourceConfig(uri=str(tmp_path / "b.parquet"), image_column="image")).to_pylist()
    assert rows[0]["image"] == png()
    # without image_column an `image` column is ordinary metadata of a text corpus
    pq.write_table(pa.table({"id": ["t"], "text": ["words"], "image": ["thumb.jpg"]}), tmp_path / "c.parquet")
    row = read_all(SourceConfig(uri=str(tmp_path / "c.parquet"))).to_pylist()[0]
    assert row["modality"] == "text" and json.loads(row["meta"]) == {"image": "thumb.jpg"}


def test_jsonl_image_paths_on_s3(s3_bucket):
    bucket, opts, client = s3_bucket
    client.put_object(Bucket=bucket, Key="corpus/imgs/a.png", Body=png())
    lines = [{"id": "rel", "image": "imgs/a.png"}, {"id": "abs", "image": f"s3://{bucket}/corpus/imgs/a.png"},
             {"id": "gone", "image": "imgs/missing.png"}, {"id": "t", "text": "hello"},
             {"id": "other-store", "image": "gs://elsewhere/x.png"}]
    client.put_object(Bucket=bucket, Key="corpus/rows.jsonl", Body="\n".join(json.dumps(x) for x in lines).encode())
    cfg = SourceConfig(uri=f"s3://{bucket}/corpus/rows.jsonl", storage=opts, image_column="image")
    rows = {r["id"]: r for r in read_all(cfg).to_pylist()}
    assert rows["rel"]["image"] == png() and rows["abs"]["image"] == png()
    assert rows["gone"]["reject"] == Reasons.IMAGE_UNREADABLE
    assert rows["other-store"]["reject"] == Reasons.IMAGE_UNREADABLE
    assert "filesystem" in rows["other-store"]["reject_detail"]
    assert rows["t"]["modality"] == "text"


def test_decode_guards():
    assert decode_image(png(), 10_000).size == (20, 10)
    with pytest.raises(ValueError) as e:
        decode_image(b"not an image at all", 10_000)
    assert e.value.reason == Reasons.IMAGE_UNREADABLE
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (200, 200, 3), dtype=np.uint8)).save(buf, "JPEG")
    truncated = buf.getvalue()[: len(buf.getvalue()) // 2]  # header intact, scan data cut
    with pytest.raises(ValueError) as e:
        decode_image(truncated, 10**8)
    assert e.value.reason == Reasons.IMAGE_UNREADABLE and "JPEG" in e.value.detail
    with pytest.raises(ValueError) as e:
        decode_image(png(200, 100), 19_999)
    assert e.value.reason == Reasons.IMAGE_TOO_LARGE and "200x100" in e.value.detail


def _batch(images: list[bytes | None], modality: list[str]) -> pa.Table:
    n = len(images)
    return pa.table({"id": [f"r{i}" for i in range(n)], "text": [None if m == "image" else "t" for m in modality],
                     "image": pa.array(images, pa.binary()), "modality": modality,
                     "reject": pa.array([None] * n, pa.string()), "reject_detail": pa.array([None] * n, pa.string())})


def test_prepare_image_rows_rejects_bad_images_and_keeps_good_ones():
    good, rgba = png(40, 20), png(8, 8, mode="RGBA")
    batch = _batch([good, b"garbage", None, rgba, png(300, 300)], ["image", "image", "text", "image", "image"])
    out = prepare_image_rows(batch, HalfSize(), "test-family", max_pixels=50_000)
    assert "image" not in out.column_names
    rej = out.column("reject").to_pylist()
    assert rej == [None, Reasons.IMAGE_UNREADABLE, None, None, Reasons.IMAGE_TOO_LARGE]
    px = pixels_of(out, np.array([0, 3]))
    assert px[0].shape == (10, 20, 3) and px[0].dtype == np.uint8
    assert tuple(px[0][5, 10]) == (200, 30, 30)
    assert px[1].shape == (4, 4, 3)
    assert out.column("pixels")[2].as_py() is None  # the text row carries no pixels


def test_text_only_model_rejects_image_rows():
    out = prepare_image_rows(_batch([png(), None], ["image", "text"]), None, "hf-encoder", 10**6)
    assert out.column("reject").to_pylist() == [Reasons.UNSUPPORTED_MODALITY, None]
    assert "hf-encoder" in out.column("reject_detail")[0].as_py()


def test_open_image_accepts_pil_bytes_and_paths(tmp_path):
    (tmp_path / "q.png").write_bytes(png())
    for x in (Image.open(io.BytesIO(png())), png(), str(tmp_path / "q.png"), tmp_path / "q.png"):
        assert open_image(x).size == (20, 10)
    with pytest.raises(ValueError):
        open_image(b"nope")


def test_fragments_close_on_bytes(tmp_path):
    """Image corpora: a fragment holds at most `fragment_bytes` of data, whatever the row / file counts."""
    for i in range(6):
        (tmp_path / f"{i}.png").write_bytes(png(60 + i, 40))
    sizes = sorted((tmp_path / f"{i}.png").stat().st_size for i in range(6))
    corpus = open_corpus(SourceConfig(uri=str(tmp_path), fragment_bytes=2 * sizes[-1]))
    assert [f.rows for f in corpus.fragments] == [2, 2, 2]
    assert len(open_corpus(SourceConfig(uri=str(tmp_path))).fragments) == 1
    big = [png(200 + i, 200) for i in range(8)]
    pq.write_table(pa.table({"id": [str(i) for i in range(8)], "image": pa.array(big, pa.binary())}),
                   tmp_path / "imgs.parquet", row_group_size=1)
    per_group = pq.ParquetFile(tmp_path / "imgs.parquet").metadata.row_group(0).total_byte_size
    cfg = SourceConfig(uri=str(tmp_path / "imgs.parquet"), fragment_bytes=3 * per_group + 10, image_column="image")
    frags = open_corpus(cfg).fragments
    assert sum(f.rows for f in frags) == 8 and max(f.rows for f in frags) <= 3 and len(frags) >= 3
    assert sorted(r["id"] for r in read_all(cfg).to_pylist()) == [str(i) for i in range(8)]


def test_image_references_stay_under_the_image_root(tmp_path):
    corpus, private = tmp_path / "corpus", tmp_path / "private"
    corpus.mkdir(), private.mkdir()
    (corpus / "ok.png").write_bytes(png())
    (private / "secret.png").write_bytes(png(color=(1, 1, 1)))
    refs = {"ok": "ok.png", "up": "../private/secret.png", "abs": str(private / "secret.png"),
            "uri": f"file://{private / 'secret.png'}", "etc": "/etc/hostname", "empty-scheme": "://x.png"}
    pq.write_table(pa.table({"id": list(refs), "image": list(refs.values())}), corpus / "rows.parquet")
    rows = {r["id"]: r for r in read_all(SourceConfig(uri=str(corpus / "rows.parquet"),
                                                      image_column="image")).to_pylist()}
    assert rows["ok"]["image"] == png()
    for key in ("up", "abs", "uri", "etc", "empty-scheme"):
        assert rows[key]["reject"] == Reasons.IMAGE_UNREADABLE, key
    assert "outside" in rows["up"]["reject_detail"]
    wider = SourceConfig(uri=str(corpus / "rows.parquet"), image_column="image", image_root=str(tmp_path))
    rows = {r["id"]: r for r in read_all(wider).to_pylist()}
    assert rows["up"]["image"] == rows["abs"]["image"] == rows["uri"]["image"] == png(color=(1, 1, 1))
    assert rows["etc"]["reject"] == Reasons.IMAGE_UNREADABLE
    with pytest.raises(ValueError, match="same store"):
        open_corpus(SourceConfig(uri=str(corpus), image_root="s3://bucket/x"))


def test_processor_failures_and_odd_images_become_rejects():
    """Extreme aspect ratios are `image_unsupported`; non-raster formats are not opened; odd modes work."""
    from embindex.models import ModelSpec, load_family

    clip = load_family(ModelSpec(name="jina-clip-v2", path=str(FIXTURES / "jina-clip-v2-tiny"))).load_image_processor()
    v4 = load_family(ModelSpec(name="jina-embeddings-v4",
                               path=str(FIXTURES / "jina-embeddings-v4-tiny"))).load_image_processor()
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n"
    odd = []
    for mode in ("I;16", "CMYK", "P", "LA", "1"):
        buf = io.BytesIO()
        Image.new(mode, (30, 20)).save(buf, "TIFF" if mode in ("I;16", "CMYK") else "PNG")
        odd.append(buf.getvalue())
    images = [png(300, 1), png(1, 250), eps, png(1, 1)] + odd
    for proc in (clip, v4):
        out = prepare_image_rows(_batch(images, ["image"] * len(images)), proc, "x", 10**6)
        rej = out.column("reject").to_pylist()
        assert rej[:3] == [Reasons.IMAGE_UNSUPPORTED, Reasons.IMAGE_UNSUPPORTED, Reasons.IMAGE_UNREADABLE]
        assert rej[3:] == [None] * (len(images) - 3), out.column("reject_detail").to_pylist()
        assert all(p.dtype == np.uint8 and p.shape[2] == 3 for p in pixels_of(out, np.arange(3, len(images))))


def test_image_rows_per_fragment_are_capped(tmp_path):
    pq.write_table(pa.table({"id": [str(i) for i in range(10)], "image": pa.array([png()] * 10, pa.binary())}),
                   tmp_path / "a.parquet", row_group_size=2)
    frags = open_corpus(SourceConfig(uri=str(tmp_path / "a.parquet"), image_column="image",
                                     fragment_images=4)).fragments
    assert [f.rows for f in frags] == [4, 4, 2]
    # a text corpus (no image_column) keeps fragment_rows
    assert len(open_corpus(SourceConfig(uri=str(tmp_path / "a.parquet"), fragment_images=4)).fragments) == 1
