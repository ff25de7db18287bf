"""`read`: the corpus fragments to process, read and normalized into rows (documents and rejects)."""

from __future__ import annotations

from typing import Any

import pyarrow as pa

from ..sources.fragments import read_fragment
from ..sources.readers import Corpus
from .base import Stage


class Read(Stage):
    name = "read"

    def __init__(self, corpus: Corpus, fragments: list[Any]):
        self.corpus, self.fragments = corpus, fragments

    def apply(self, ds: Any) -> Any:
        if ds is not None:
            raise ValueError("read is the first stage")
        return self.corpus.dataset(self.fragments)

    def run(self, table: pa.Table | None = None) -> pa.Table:
        c = self.corpus
        tables = [read_fragment(f, c.fs, c.rules, c.root) for f in self.fragments]
        return pa.concat_tables(tables)
