"""The re-ranker contract: small typed components that reorder a hit list."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from aiprime.store import Hit


@runtime_checkable
class Reranker(Protocol):
    """Reorders ``hits`` for ``query``; returns the best ``k`` (all when ``k`` is None)
    with ``Hit.score`` set to the stage's score and ``Hit.scores[name]`` recording it."""

    name: str

    def rerank(self, query: str, hits: list[Hit], k: int | None = None) -> list[Hit]: ...


def apply_scores(hits: list[Hit], scores: list[float], name: str, k: int | None) -> list[Hit]:
    """Write a stage's scores into the hits and sort by them (stable for ties)."""
    for h, s in zip(hits, scores, strict=True):
        h.score = float(s)
        h.scores[name] = float(s)
    ranked = sorted(hits, key=lambda h: -h.score)
    for rank, h in enumerate(ranked, start=1):
        h.scores[f"{name}_rank"] = float(rank)
    return ranked if k is None else ranked[:k]
