"""Text embedders with one interface: ``encode`` returns L2-normalised float32 rows."""

from aiprime.embed.base import Embedder, encode_queries, load_embedder, resolve_model_path
from aiprime.embed.cache import CachedEmbedder, EmbeddingCache

__all__ = [
    "CachedEmbedder",
    "Embedder",
    "EmbeddingCache",
    "encode_queries",
    "load_embedder",
    "resolve_model_path",
]
