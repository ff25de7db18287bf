"""Text preparation: tokenization helpers and token-budget batching."""
