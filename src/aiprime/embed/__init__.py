"""Text embedders with one interface: ``encode`` returns L2-normalised float32 rows."""

from aiprime.embed.base import Embedder, load_embedder, resolve_model_path
from aiprime.embed.cache import CachedEmbedder, EmbeddingCache

__all__ = ["CachedEmbedder", "Embedder", "EmbeddingCache", "load_embedder", "resolve_model_path"]
