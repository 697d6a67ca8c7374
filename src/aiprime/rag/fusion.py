"""Rank fusion for hybrid retrieval. Pure functions over ``Hit`` lists."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace

from aiprime.store import Hit


def _merge(named: Mapping[str, Sequence[Hit]]) -> dict[str, Hit]:
    """One ``Hit`` per chunk id, carrying every retriever's score and rank."""
    merged: dict[str, Hit] = {}
    for name, hits in named.items():
        for rank, h in enumerate(hits, start=1):
            m = merged.get(h.id)
            if m is None:  # copy once per chunk: callers keep their own hits unchanged
                m = merged[h.id] = replace(h, scores=dict(h.scores))
            m.scores[name] = h.score
            m.scores[f"{name}_rank"] = float(rank)
    return merged


def rrf(named: Mapping[str, Sequence[Hit]], k: int = 60) -> list[Hit]:
    """Reciprocal rank fusion (Cormack et al., 2009): scale-free, needs no tuning."""
    merged = _merge(named)
    for h in merged.values():
        h.score = sum(1.0 / (k + h.scores[f"{n}_rank"]) for n in named if f"{n}_rank" in h.scores)
    return sorted(merged.values(), key=lambda h: -h.score)


def minmax(scores: Sequence[float]) -> list[float]:
    if not scores:
        return []
    lo, hi = min(scores), max(scores)
    if hi - lo < 1e-12:
        return [1.0 for _ in scores]
    return [(s - lo) / (hi - lo) for s in scores]


def score_mix(named: Mapping[str, Sequence[Hit]], weights: dict[str, float]) -> list[Hit]:
    """Convex mix of per-query min-max normalised scores; a missing score counts as 0."""
    norm: dict[str, dict[str, float]] = {
        n: dict(zip((h.id for h in hits), minmax([h.score for h in hits]), strict=True))
        for n, hits in named.items()
    }
    merged = _merge(named)
    for h in merged.values():
        h.score = sum(weights.get(n, 0.0) * norm[n].get(h.id, 0.0) for n in named)
    return sorted(merged.values(), key=lambda h: -h.score)


def best_per_doc(hits: Sequence[Hit]) -> dict[str, float]:
    """Document score = its best chunk's score (the MaxP convention)."""
    out: dict[str, float] = {}
    for h in hits:
        if h.score > out.get(h.doc_id, float("-inf")):
            out[h.doc_id] = h.score
    return out
