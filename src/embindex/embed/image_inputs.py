"""Image rows on CPU tasks: decode (`models.images`, guarded against broken or oversized images), and turn each
image into the model's prepared uint8 pixels (`ImageProcessor`). A bad image becomes a reject with a
reason here, never an exception in an embed actor.

Prepared pixels travel to the actors as raw bytes (`pixels`, with `height` / `width`): 1 byte per
value; normalization and patching happen in the encoder.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ..models.base import ImageNotSupported, ImageProcessor
from ..models.images import ImageRejected, decode_image
from ..sources.normalize import Reasons, with_rejects

PIXEL_COLUMNS = ("pixels", "height", "width")


def prepare(processor: ImageProcessor, image: Any) -> np.ndarray:
    """The processor's uint8 pixels; an image it cannot take (or fails on) is an ImageRejected."""
    try:
        return processor(image)
    except ImageNotSupported as e:
        raise ImageRejected(Reasons.IMAGE_UNSUPPORTED, str(e)) from None
    except (ValueError, OSError, MemoryError) as e:  # e.g. a mode conversion Pillow cannot do
        raise ImageRejected(Reasons.IMAGE_UNREADABLE, f"cannot prepare the {image.mode} {image.size[0]}x"
                            f"{image.size[1]} image ({type(e).__name__}: {e})") from None


def prepare_image_rows(batch: pa.Table, processor: ImageProcessor | None, model: str,
                       max_pixels: int) -> pa.Table:
    """Replace the `image` column by the prepared `pixels` / `height` / `width` columns; image rows that
    cannot be decoded, are too large, or meet a text-only model (`processor` None) become rejects."""
    n = batch.num_rows
    is_image = pc.and_(pc.is_null(batch.column("reject")), pc.equal(batch.column("modality"), "image"))
    rows = np.flatnonzero(pc.fill_null(is_image, False).to_numpy(zero_copy_only=False))
    pixels: list[bytes | None] = [None] * n
    heights: list[int | None] = [None] * n
    widths: list[int | None] = [None] * n
    rejects: dict[int, tuple[str, str]] = {}
    images = batch.column("image")
    for i in rows:
        try:
            if processor is None:
                raise ImageRejected(Reasons.UNSUPPORTED_MODALITY, f"model family {model!r} embeds text only")
            arr = prepare(processor, decode_image(images[int(i)].as_py(), max_pixels))
        except ImageRejected as e:
            rejects[int(i)] = (e.reason, e.detail)
            continue
        pixels[i], heights[i], widths[i] = np.ascontiguousarray(arr, np.uint8).tobytes(), arr.shape[0], arr.shape[1]
    out = with_rejects(batch.drop_columns(["image"]), rejects)
    out = out.append_column("pixels", pa.array(pixels, pa.binary()))
    out = out.append_column("height", pa.array(heights, pa.int32()))
    return out.append_column("width", pa.array(widths, pa.int32()))


def pixels_of(batch: pa.Table, rows: np.ndarray) -> list[np.ndarray]:
    """The prepared [H, W, 3] uint8 images of the given rows."""
    data, hs, ws = (batch.column(c) for c in PIXEL_COLUMNS)
    return [np.frombuffer(data[int(i)].as_py(), np.uint8).reshape(hs[int(i)].as_py(), ws[int(i)].as_py(), 3)
            for i in rows]
