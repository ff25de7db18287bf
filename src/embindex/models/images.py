"""Image decoding for the models and the image rows of a build (Pillow).

- `decode_image`: corpus bytes -> RGB, guarded (raster formats only, a pixel limit, truncation), failures
  as `ImageRejected` with a reject reason; `open_image`: a query image given as a PIL image, bytes or path.
- `load_upright_rgb`: what the rerankers' references do (transformers' `load_image`): EXIF rotation
  applied, then RGB.
"""

from __future__ import annotations

import io
import os
from typing import Any

from ..sources.normalize import Reasons

# raster formats only: Pillow would otherwise also open e.g. EPS (which runs Ghostscript on the data)
IMAGE_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")  # JPEG also opens MPO (phones)


class ImageRejected(ValueError):
    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason, self.detail = reason, detail


def decode_image(data: bytes, max_pixels: int) -> Any:
    """Encoded bytes -> a fully loaded RGB PIL image; ImageRejected when unreadable, truncated or too large.

    RGB right after decoding, before any resize, as the reference `encode_image` of jina-clip-v2 and
    jina-embeddings-v4 load a file (`Image.open(f).convert('RGB')`): alpha is dropped, not composited."""
    from PIL import Image

    try:
        im = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
        w, h = im.size
    except Image.DecompressionBombError as e:
        raise ImageRejected(Reasons.IMAGE_TOO_LARGE, str(e)) from None
    except Exception as e:  # noqa: BLE001 - any decoder failure is a reject, never a crashed worker
        raise ImageRejected(Reasons.IMAGE_UNREADABLE, f"not a readable {'/'.join(IMAGE_FORMATS)} image "
                            f"({type(e).__name__}: {e})") from None
    if w * h > max_pixels:
        raise ImageRejected(Reasons.IMAGE_TOO_LARGE, f"image is {w}x{h} = {w * h} pixels > max_image_pixels "
                            f"{max_pixels}")
    if w == 0 or h == 0:
        raise ImageRejected(Reasons.IMAGE_UNREADABLE, f"image has no pixels ({w}x{h})")
    try:
        im.load()
    except Image.DecompressionBombError as e:
        raise ImageRejected(Reasons.IMAGE_TOO_LARGE, str(e)) from None
    except Exception as e:  # noqa: BLE001 - truncated or corrupt data
        raise ImageRejected(Reasons.IMAGE_UNREADABLE, f"cannot decode {im.format or 'image'} "
                            f"({type(e).__name__}: {e})") from None
    try:
        return im.convert("RGB")
    except (ValueError, OSError) as e:  # a mode Pillow cannot convert
        raise ImageRejected(Reasons.IMAGE_UNREADABLE, f"cannot convert the {im.mode} image to RGB "
                            f"({type(e).__name__}: {e})") from None


def open_image(image: Any, max_pixels: int = 64_000_000) -> Any:
    """A query image given as a PIL image, encoded bytes or a local path -> a loaded PIL image."""
    if hasattr(image, "convert") and hasattr(image, "size"):
        return image
    if isinstance(image, (str, os.PathLike)):
        with open(image, "rb") as f:
            image = f.read()
    if isinstance(image, (bytes, bytearray)):
        try:
            return decode_image(bytes(image), max_pixels)
        except ImageRejected as e:
            raise ValueError(e.detail) from None
    raise TypeError(f"an image must be a PIL image, bytes or a path, got {type(image).__name__}")


def load_upright_rgb(image: Any) -> Any:
    """PIL image, encoded bytes or a local path -> upright RGB PIL image (raises on undecodable data)."""
    from PIL import Image, ImageOps

    if isinstance(image, Image.Image):
        img = image
    elif isinstance(image, (bytes, bytearray, memoryview)):
        img = Image.open(io.BytesIO(bytes(image)))
    elif isinstance(image, (str, os.PathLike)):
        img = Image.open(image)
    else:
        raise TypeError(f"not an image: {type(image).__name__}")
    img.load()
    return ImageOps.exif_transpose(img).convert("RGB")  # camera rotation applied, as transformers' load_image
