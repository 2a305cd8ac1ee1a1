"""Embedding cards: what an adapter's training data looks like, as sentence-embedding vectors.

`card` (the format), `embedder` (sentence-transformers models), `data` (where training data comes from).
"""
