"""Serving: scheduling inference off the event loop, prefetching embeddings, encoder runtimes."""
