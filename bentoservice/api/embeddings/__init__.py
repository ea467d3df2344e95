"""Embeddings and rerank routes."""
