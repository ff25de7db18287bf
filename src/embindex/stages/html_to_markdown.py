"""`html_to_markdown`: ReaderLM-v2 turns the HTML of text rows into Markdown (or JSON, given
`options.schema`), which is embedded and stored in the `markdown` (`json`) column."""

from __future__ import annotations

from .generate import Generate


class HtmlToMarkdown(Generate):
    name = "html_to_markdown"
    family = "readerlm-v2"
    modality = "text"

    def output_column(self) -> str:
        return "json" if self.cfg.options.get("schema") else "markdown"
