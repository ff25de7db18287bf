"""Offline retrieval: queries -> search -> rerank -> results, run file and metrics."""
