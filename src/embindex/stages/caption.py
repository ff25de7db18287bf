"""`caption`: jina-vlm writes a caption (alt text) for image rows; the caption is embedded as text (so a
text-only model indexes an image corpus) and stored in the `caption` column, next to the image."""

from __future__ import annotations

from .generate import Generate


class Caption(Generate):
    name = "caption"
    family = "jina-vlm"
    modality = "image"

    def output_column(self) -> str:
        return "caption"
