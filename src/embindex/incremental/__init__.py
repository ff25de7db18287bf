"""Incremental re-indexing: snapshot diff by content hash, tombstones, delta tiers."""
