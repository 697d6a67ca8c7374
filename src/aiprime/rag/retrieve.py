"""Dense, BM25 and hybrid retrieval over a store."""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Literal

import numpy as np

from aiprime.config import RetrieveSettings
from aiprime.embed import Embedder, encode_queries
from aiprime.rag.fusion import rrf, score_mix
from aiprime.store import Hit, Store

Mode = Literal["bm25", "dense", "hybrid"]

_POOL = ThreadPoolExecutor(max_workers=4, thread_name_prefix="aiprime-retrieve")


class Retriever:
    """Returns chunks ranked by one retriever or by a fusion of both."""

    def __init__(
        self, store: Store, embedder: Embedder, settings: RetrieveSettings | None = None
    ) -> None:
        self.store = store
        self.embedder = embedder
        self.settings = settings or RetrieveSettings()

    def search(
        self, query: str, k: int = 10, mode: Mode | None = None, where: str | None = None
    ) -> list[Hit]:
        """One query, latency-first: BM25 runs on a worker thread while the query is
        embedded and the vector search runs (the store's native code releases the GIL)."""
        mode = mode or self.settings.mode
        if mode != "hybrid":
            return self.search_batch([query], k, mode, where)[0]
        depth = max(k, self.settings.candidates)
        lexical = _POOL.submit(self.store.text_search, query, depth, where)
        vector = self._encode_query([query])
        dense = self.store.dense_search(vector[0], depth, where)
        return self._fuse(dense, lexical.result())[:k]

    def _encode_query(self, texts: list[str]) -> np.ndarray:
        return encode_queries(self.embedder, texts)

    def _fuse(self, dense: list[Hit], lexical: list[Hit]) -> list[Hit]:
        s = self.settings
        named = {"dense": dense, "bm25": lexical}
        if s.fusion == "rrf":
            return rrf(named, s.rrf_k)
        return score_mix(named, {"dense": s.dense_weight, "bm25": 1.0 - s.dense_weight})

    def search_batch(
        self,
        queries: Sequence[str],
        k: int = 10,
        mode: Mode | None = None,
        where: str | None = None,
        vectors: np.ndarray | None = None,
    ) -> list[list[Hit]]:
        """Many queries at once: query embeddings are computed in one batch."""
        mode = mode or self.settings.mode
        s = self.settings
        depth = max(k, s.candidates) if mode == "hybrid" else k
        if mode != "bm25" and vectors is None:
            vectors = self._encode_query(list(queries))
        out: list[list[Hit]] = []
        for i, q in enumerate(queries):
            dense = self.store.dense_search(vectors[i], depth, where) if vectors is not None else []
            if mode == "dense":
                out.append(_label(dense, "dense")[:k])
                continue
            lexical = self.store.text_search(q, depth, where)
            if mode == "bm25":
                out.append(_label(lexical, "bm25")[:k])
                continue
            out.append(self._fuse(dense, lexical)[:k])
        return out


def _label(hits: list[Hit], name: str) -> list[Hit]:
    for rank, h in enumerate(hits, start=1):
        h.scores = {name: h.score, f"{name}_rank": float(rank)}
    return hits
