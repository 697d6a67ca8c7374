"""The reference backend: sentence-transformers on PyTorch."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch


class SentenceTransformerEmbedder:
    """Any sentence-transformers model from a local directory."""

    def __init__(
        self,
        path: str | Path,
        max_seq_length: int = 256,
        batch_size: int = 64,
        threads: int = 0,
        name: str | None = None,
    ) -> None:
        from sentence_transformers import SentenceTransformer

        if threads:
            torch.set_num_threads(threads)
        self.model = SentenceTransformer(str(path), device="cpu")
        self.model.max_seq_length = min(max_seq_length, self.model.max_seq_length or max_seq_length)
        self.batch_size = batch_size
        self.model_id = name or Path(path).name
        dim = self.model.get_embedding_dimension()
        if dim is None:
            raise ValueError(f"{path}: model does not declare its embedding dimension")
        self.dim = int(dim)

    def encode(
        self, texts: Sequence[str], batch_size: int | None = None, show_progress: bool = False
    ) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        out = self.model.encode(
            list(texts),
            batch_size=batch_size or self.batch_size,
            normalize_embeddings=True,
            convert_to_numpy=True,
            show_progress_bar=show_progress,
        )
        return np.asarray(out, dtype=np.float32)

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        enc = self.model.tokenizer(list(texts), add_special_tokens=False, verbose=False)[
            "input_ids"
        ]
        return [len(x) for x in enc]
