"""Reading an index back: funnel search over Matryoshka tiers."""

from .reader import Hit, IndexReader, open_index

__all__ = ["Hit", "IndexReader", "open_index"]
