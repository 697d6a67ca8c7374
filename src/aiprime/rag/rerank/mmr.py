"""Maximal marginal relevance (Carbonell & Goldstein, 1998) for diverse results."""

from __future__ import annotations

import numpy as np

from aiprime.embed import Embedder
from aiprime.rag.rerank.base import apply_scores
from aiprime.store import Hit


class MMRReranker:
    """Greedy MMR over chunk embeddings: each pick maximises
    ``lambda * relevance - (1 - lambda) * max similarity to the picks so far``.

    Relevance is the incoming score, min-max normalised. Chunks are re-embedded through
    the (cached) embedder, so for ingested chunks this is a cache lookup. Only the first
    ``top_k`` positions are chosen by MMR; the others follow in their incoming order.
    """

    name = "mmr"

    def __init__(self, embedder: Embedder, lam: float = 0.7, top_k: int = 10) -> None:
        if not 0.0 <= lam <= 1.0:
            raise ValueError(f"MMR lambda {lam}: must be in [0, 1]")
        self.embedder = embedder
        self.lam = lam
        self.top_k = top_k
        self.depth: int | None = None

    def rerank(self, query: str, hits: list[Hit], k: int | None = None) -> list[Hit]:
        if not hits:
            return []
        vecs = self.embedder.encode([h.content for h in hits])
        rel = np.array([h.score for h in hits], dtype=np.float64)
        span = rel.max() - rel.min()
        rel = (rel - rel.min()) / span if span > 1e-12 else np.ones_like(rel)
        sim = vecs @ vecs.T
        picked: list[int] = []
        left = list(range(len(hits)))
        max_sim = np.full(len(hits), -np.inf)
        while left and len(picked) < min(self.top_k, len(hits)):
            red = np.where(np.isfinite(max_sim[left]), max_sim[left], 0.0)
            mmr = self.lam * rel[left] - (1 - self.lam) * red
            best = left[int(np.argmax(mmr))]
            picked.append(best)
            left.remove(best)
            max_sim = np.maximum(max_sim, sim[best])
        order = picked + left
        n = len(order)
        scores = [0.0] * n
        for pos, i in enumerate(order):
            scores[i] = float(n - pos)  # rank-derived: MMR values are not comparable
        return apply_scores(hits, scores, self.name, k)
