"""The Ray Data embedding stage: tokenization tasks and the embed actor pool."""
