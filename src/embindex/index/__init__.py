"""Index layout, Parquet shards, FAISS tiers, manifest and atomic publish."""
