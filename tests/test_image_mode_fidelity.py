"""Images with alpha, grey or a palette, which need resizing, are prepared as the references prepare them:
jina-clip-v2 converts every input to RGB before its processor; jina-clip-v2 and jina-embeddings-v4 load
files with `Image.open(f).convert('RGB')` (alpha dropped, not composited), and v4 composites a PIL image
given with alpha on white (transformers' `convert_to_rgb`)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from embindex.embed.image_inputs import pixels_of, prepare_image_rows
from embindex.models.images import decode_image
from embindex.models import ModelSpec, load_family

FIX = Path(__file__).parent / "fixtures"


def _images() -> dict[str, Image.Image]:
    """Unseen inputs whose size differs from the models' input size, so the processors resize them."""
    rng = np.random.default_rng(7)
    rgb = rng.integers(0, 256, (70, 90, 3), dtype=np.uint8)
    alpha = np.tile(np.linspace(0, 255, 90, dtype=np.uint8), (70, 1))
    grey_alpha = np.stack([rgb[..., 0], alpha], axis=-1)
    palette = Image.fromarray(rgb).quantize(16)
    palette.info["transparency"] = 3
    return {
        "RGBA": Image.fromarray(np.concatenate([rgb, alpha[..., None]], axis=-1), mode="RGBA"),
        "LA": Image.fromarray(grey_alpha, mode="LA"),
        "P+transparency": palette,
    }


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def clip_processor():
    return load_family(ModelSpec(name="jina-clip-v2", path=str(FIX / "jina-clip-v2-tiny"),
                                 dtype="float32")).load_image_processor()


@pytest.fixture(scope="module")
def v4_processor():
    return load_family(ModelSpec(name="jina-embeddings-v4", path=str(FIX / "jina-embeddings-v4-tiny"),
                                 dtype="float32")).load_image_processor()


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P+transparency"])
def test_clip_converts_to_rgb_before_resizing(clip_processor, mode):
    image = _images()[mode]
    assert image.size != (56, 56)
    expected = clip_processor(image.convert("RGB"))
    assert np.array_equal(clip_processor(image), expected)  # a PIL query image
    assert np.array_equal(clip_processor(decode_image(_png(image), 10**8)), expected)  # a file


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P+transparency"])
def test_v4_files_drop_alpha_and_pil_images_composite_on_white(v4_processor, mode):
    image = _images()[mode]
    reference_file = v4_processor(Image.open(io.BytesIO(_png(image))).convert("RGB"))
    assert np.array_equal(v4_processor(decode_image(_png(image), 10**8)), reference_file)
    white = Image.new("RGBA", image.size, (255, 255, 255, 255))
    composited = Image.alpha_composite(white, image.convert("RGBA")).convert("RGB")
    assert np.array_equal(v4_processor(image), v4_processor(composited))
    assert not np.array_equal(reference_file, v4_processor(composited))  # the two paths really differ here


def test_pipeline_rows_prepare_files_as_the_reference(clip_processor):
    """The CPU stage that turns corpus image bytes into pixels takes the file path of the reference."""
    image = _images()["RGBA"]
    batch = pa.table({"reject": pa.array([None], pa.string()), "modality": ["image"], "image": [_png(image)]})
    out = prepare_image_rows(batch, clip_processor, "jina-clip-v2", 10**8)
    [pixels] = pixels_of(out, np.array([0]))
    assert np.array_equal(pixels, clip_processor(image.convert("RGB")))
