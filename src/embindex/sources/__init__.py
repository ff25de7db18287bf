"""Corpus sources: readers (Ray Data over fsspec/pyarrow filesystems) and row normalization."""
