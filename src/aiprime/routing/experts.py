"""Routing experts: a named search pipeline over one collection.

An expert is deliberately nothing more than a :class:`~aiprime.rag.kb.KnowledgeBase` with
its own retrieval and re-ranking settings, so that everything measured for a single
collection (BEIR numbers, re-ranker latency) carries over unchanged to the routed system.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING

from aiprime.config import ExpertSettings, Settings
from aiprime.embed import Embedder
from aiprime.store import Hit

if TYPE_CHECKING:
    from aiprime.rag.kb import KnowledgeBase


class RoutingError(ValueError):
    """A routing problem the user can act on (no experts, unknown expert, no router)."""


@dataclass
class Expert:
    """One specialised pipeline; ``search`` is what the router dispatches a query to."""

    spec: ExpertSettings
    settings: Settings
    embedder: Embedder | None = None
    calls: int = 0
    seconds: float = 0.0
    _kb: KnowledgeBase | None = field(default=None, repr=False)

    @property
    def name(self) -> str:
        return self.spec.name

    @cached_property
    def kb(self) -> KnowledgeBase:
        from aiprime.rag.kb import KnowledgeBase

        if self._kb is not None:
            return self._kb
        if self.spec.rerank == []:
            return KnowledgeBase(self.settings, embedder=self.embedder, reranker=None)
        return KnowledgeBase(self.settings, embedder=self.embedder)

    def search(self, query: str, k: int = 10) -> list[Hit]:
        """The expert's own retrieval (and re-ranking), timed for load/latency reports."""
        t0 = time.perf_counter()
        hits = self.kb.search(query, k=k, mode=self.spec.mode)
        self.seconds += time.perf_counter() - t0
        self.calls += 1
        return hits

    def latency_ms(self) -> float:
        return 1000 * self.seconds / max(1, self.calls)


def expert_settings(base: Settings, spec: ExpertSettings) -> Settings:
    """The full settings an expert runs with: the base ones, overridden by its declaration."""
    update: dict[str, object] = {"collection": spec.collection}
    if spec.home is not None:
        update["home"] = spec.home
    retrieve = base.retrieve
    if spec.mode is not None:
        retrieve = retrieve.model_copy(update={"mode": spec.mode})
    if spec.dense_weight is not None:
        retrieve = retrieve.model_copy(update={"dense_weight": spec.dense_weight})
    update["retrieve"] = retrieve
    if spec.rerank is not None:
        update["rerank"] = base.rerank.model_copy(update={"stack": list(spec.rerank)})
    if spec.answer_model is not None:
        update["answer"] = base.answer.model_copy(update={"llm": spec.answer_model})
    return base.model_copy(update=update)


def build_experts(
    settings: Settings,
    embedder: Embedder | None = None,
    specs: Sequence[ExpertSettings] | None = None,
) -> list[Expert]:
    """Experts declared in ``[routing].experts`` (or ``specs``); they share one embedder,
    which must be the one their collections were built with (the store checks)."""
    declared = list(settings.routing.experts if specs is None else specs)
    if not declared:
        raise RoutingError(
            "no experts declared: add [[routing.experts]] entries (name, collection) to config.toml"
        )
    names = [s.name for s in declared]
    if len(set(names)) != len(names):
        raise RoutingError(f"expert names must be unique, got {names}")
    return [Expert(s, expert_settings(settings, s), embedder) for s in declared]
