"""``RoutedSearch``: embed the query, route it, run the chosen experts, fuse.

This is the object the CLI (``aiprime route ...``) and the HTTP service wrap. Feedback
enters through :meth:`RoutedSearch.feedback`, a plain Python call, so an endpoint is a
thin layer over it.
"""

from __future__ import annotations

import json
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from aiprime.config import Settings
from aiprime.embed import Embedder, encode_queries
from aiprime.routing.experts import Expert, RoutingError, build_experts
from aiprime.routing.router import QueryRouter, Route
from aiprime.store import Hit

if TYPE_CHECKING:
    from aiprime.rag.answer import Answer


@dataclass
class RoutedHit:
    expert: str
    hit: Hit
    score: float

    def to_dict(self) -> dict[str, Any]:
        return {"expert": self.expert, "score": self.score, **self.hit.to_dict()}


@dataclass
class RoutedResult:
    """Hits from the experts a query was sent to, with why it was sent there."""

    query: str
    hits: list[RoutedHit]
    experts: list[str]
    probs: dict[str, float]
    fallback: bool
    ms: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "query": self.query,
            "experts": self.experts,
            "probs": self.probs,
            "fallback": self.fallback,
            "ms": self.ms,
            "hits": [h.to_dict() for h in self.hits],
        }


def fuse_experts(
    results: dict[str, list[Hit]],
    k: int,
    rrf_k: int = 60,
    weights: dict[str, float] | None = None,
) -> list[RoutedHit]:
    """Reciprocal rank fusion across experts, each expert's ranks weighted by its gate.

    Raw scores live on different scales (BM25, min-max mixes, cross-encoder logits), ranks
    do not. Equal weighted ranks (every expert's first hit, say) are ordered by the dense
    cosine when the hits carry one: all experts share one embedder, so it is the one
    score comparable across collections. One expert: its own order, unchanged.
    """
    if len(results) == 1:
        name, hits = next(iter(results.items()))
        return [RoutedHit(name, h, h.score) for h in hits[:k]]
    fused = [
        RoutedHit(name, h, (weights or {}).get(name, 1.0) / (rrf_k + rank))
        for name, hits in results.items()
        for rank, h in enumerate(hits, start=1)
    ]
    fused.sort(key=lambda r: (-r.score, -r.hit.scores.get("dense", float("-inf"))))
    return fused[:k]


class SharedQueryEmbedder:
    """One embedder for the router and every expert, loaded on first use, that remembers
    the last few query vectors.

    Queries bypass the embedding cache (``CachedEmbedder.encode_query``), so without this
    a routed query would be embedded twice: once for the gate, once again by the chosen
    expert's dense search. Documents (``encode``) pass straight through.
    """

    def __init__(self, settings: Settings, inner: Embedder | None = None, size: int = 256) -> None:
        self._settings = settings
        self._inner = inner
        self._size = size
        self._memo: OrderedDict[str, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()

    @property
    def inner(self) -> Embedder:
        if self._inner is None:
            from aiprime.embed import load_embedder

            self._inner = load_embedder(self._settings)
        return self._inner

    @property
    def model_id(self) -> str:
        return self.inner.model_id

    @model_id.setter
    def model_id(self, value: str) -> None:
        raise AttributeError("model_id belongs to the wrapped embedder")

    @property
    def dim(self) -> int:
        return self.inner.dim

    @dim.setter
    def dim(self, value: int) -> None:
        raise AttributeError("dim belongs to the wrapped embedder")

    def forget(self) -> None:
        """Drop remembered query vectors (benchmarks: make every system embed its query)."""
        with self._lock:
            self._memo.clear()

    def encode(
        self, texts: Sequence[str], batch_size: int | None = None, show_progress: bool = False
    ) -> np.ndarray:
        return self.inner.encode(texts, batch_size=batch_size, show_progress=show_progress)

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        return self.inner.count_tokens(texts)

    def encode_query(self, texts: Sequence[str]) -> np.ndarray:
        texts = list(texts)
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        with self._lock:
            missing = [t for t in dict.fromkeys(texts) if t not in self._memo]
        found: dict[str, np.ndarray] = {}
        if missing:
            vecs = np.asarray(encode_queries(self.inner, missing), dtype=np.float32)
            found = dict(zip(missing, vecs, strict=True))
        with self._lock:
            for t, v in found.items():
                self._memo[t] = v
            for t in texts:
                if t in self._memo:
                    self._memo.move_to_end(t)
            out = np.stack([found[t] if t in found else self._memo[t] for t in texts])
            while len(self._memo) > self._size:
                self._memo.popitem(last=False)
        return out

    def __getattr__(self, name: str) -> Any:  # anything else a backend offers
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self.inner, name)


class RoutedSearch:
    """Experts declared in ``[routing]``, the router that picks among them, fusion."""

    def __init__(
        self,
        settings: Settings,
        experts: Sequence[Expert] | None = None,
        router: QueryRouter | None = None,
        embedder: Embedder | None = None,
    ) -> None:
        self.settings = settings
        self._embedder = SharedQueryEmbedder(settings, embedder)
        self.experts = (
            list(experts) if experts is not None else build_experts(settings, self._embedder)
        )
        self.by_name = {e.name: e for e in self.experts}
        self.router = router

    @classmethod
    def open(cls, settings: Settings, embedder: Embedder | None = None) -> RoutedSearch:
        """Experts from the settings; the saved router when there is one (else every query
        is sent to every expert until ``train`` or ``feedback`` creates one)."""
        rs = cls(settings, embedder=embedder)
        if (rs.router_dir / "router.json").is_file():
            router = QueryRouter.load(rs.router_dir)
            if router.experts != rs.names:
                raise RoutingError(
                    f"the saved router knows experts {router.experts}, the config declares "
                    f"{rs.names}: retrain it (aiprime route train)"
                )
            emb = router.meta.get("embedder")
            if emb and emb != rs.embedder.model_id:
                raise RoutingError(
                    f"the saved router was trained on {emb} embeddings, the configured "
                    f"embedder is {rs.embedder.model_id}: retrain it"
                )
            rs.router = router
        return rs

    @property
    def names(self) -> list[str]:
        return [e.name for e in self.experts]

    @property
    def router_dir(self) -> Path:
        return self.settings.routing.router_dir or self.settings.models_dir / "router"

    @property
    def embedder(self) -> SharedQueryEmbedder:
        return self._embedder

    def features(self, queries: Sequence[str]) -> np.ndarray:
        """The router's input: the query embeddings, from the experts' own model and
        remembered, so the chosen expert's dense search reuses them."""
        return self.embedder.encode_query(list(queries))

    def new_router(self, seed: int = 0) -> QueryRouter:
        r = QueryRouter.from_settings(
            self.names, self.embedder.dim, self.settings.routing, seed=seed
        )
        r.meta["embedder"] = self.embedder.model_id
        return r

    # -- routing and search -----------------------------------------------------------------

    def route(self, queries: Sequence[str], top_k: int | None = None) -> list[Route]:
        if self.router is None:
            n = len(self.experts)
            return [
                Route(list(range(n)), [1.0 / n] * n, [1.0 / n] * n, fallback=True) for _ in queries
            ]
        return self.router.route(self.features(queries), top_k=top_k)

    def search(
        self,
        query: str,
        k: int = 10,
        top_k: int | None = None,
        experts: Sequence[str] | None = None,
    ) -> RoutedResult:
        """Route ``query`` (or send it to the named ``experts``) and fuse their hits."""
        if not query.strip():
            raise ValueError("query is empty")
        t0 = time.perf_counter()
        if experts:
            unknown = [e for e in experts if e not in self.by_name]
            if unknown:
                raise RoutingError(f"unknown expert {unknown[0]!r}; experts: {self.names}")
            names = list(experts)
            probs = {n: float("nan") for n in self.names}
            fallback = False
        else:
            route = self.route([query], top_k)[0]
            names = [self.names[i] for i in route.experts]
            probs = dict(zip(self.names, route.probs, strict=True))
            fallback = route.fallback
        t1 = time.perf_counter()
        results = {n: self.by_name[n].search(query, k) for n in names}
        t2 = time.perf_counter()
        gates = None if experts or self.router is None else probs
        hits = fuse_experts(results, k, self.settings.routing.fusion_rrf_k, gates)
        ms = {"route": 1000 * (t1 - t0), "experts": 1000 * (t2 - t1)}
        return RoutedResult(query, hits, names, probs, fallback, ms)

    def search_all(self, query: str, k: int = 10, gated: bool = False) -> RoutedResult:
        """Every expert, fused by plain RRF; ``gated`` weighs each expert's ranks by the
        router's probability (soft routing: all the cost, less of the interleaving)."""
        if not gated or self.router is None:
            return self.search(query, k, experts=self.names)
        t0 = time.perf_counter()
        probs = dict(zip(self.names, self.route([query])[0].probs, strict=True))
        t1 = time.perf_counter()
        results = {n: e.search(query, k) for n, e in self.by_name.items()}
        t2 = time.perf_counter()
        hits = fuse_experts(results, k, self.settings.routing.fusion_rrf_k, probs)
        ms = {"route": 1000 * (t1 - t0), "experts": 1000 * (t2 - t1)}
        return RoutedResult(query, hits, self.names, probs, False, ms)

    def ask(
        self, question: str, *, expert: str | None = None, llm: Any = None
    ) -> tuple[str, Answer]:
        """Answer with one expert: the named one, else the router's most probable (with an
        unsure or untrained router that is a guess, and the expert's own no-answer gate
        decides). The expert's own re-rankers, calibration and ``answer_model`` apply."""
        if expert is None:
            route = self.route([question])[0]
            expert = self.names[max(range(len(self.names)), key=lambda i: route.probs[i])]
        elif expert not in self.by_name:
            raise RoutingError(f"unknown expert {expert!r}; experts: {self.names}")
        return expert, self.by_name[expert].kb.ask(question, llm=llm)

    # -- learning -----------------------------------------------------------------------------

    def train(
        self,
        queries: Sequence[str],
        labels: Sequence[str],
        *,
        epochs: int | None = None,
        seed: int = 0,
        save: bool = True,
    ) -> dict[str, Any]:
        """Fit a fresh router on labelled queries (label = the expert that should answer)."""
        if len(queries) != len(labels) or not queries:
            raise ValueError("need the same, non-zero number of queries and labels")
        unknown = sorted({lab for lab in labels if lab not in self.by_name})
        if unknown:
            raise RoutingError(f"labels name unknown experts {unknown}; experts: {self.names}")
        rs = self.settings.routing
        router = self.new_router(seed)
        y = [router.index(lab) for lab in labels]
        report = router.fit(
            self.features(queries),
            y,
            epochs=epochs or rs.epochs,
            lr=rs.lr,
            weight_decay=rs.weight_decay,
            class_weight=rs.class_weight,
        )
        self.router = router
        if save:
            report["saved"] = str(router.save(self.router_dir))
        return report

    def feedback(
        self, query: str, expert: str, relevant: bool = True, save: bool = True
    ) -> dict[str, Any]:
        """Learn online from a verdict: ``expert``'s results for ``query`` were relevant
        (accepted) or not. Creates an untrained router on first use. This is the call an
        HTTP feedback endpoint should make."""
        if expert not in self.by_name:
            raise RoutingError(f"unknown expert {expert!r}; experts: {self.names}")
        if self.router is None:
            self.router = self.new_router()
        x = self.features([query])
        before = self.router.probabilities(x)[0]
        loss = self.router.feedback(x, expert, relevant, lr=self.settings.routing.online_lr)
        after = self.router.probabilities(x)[0]
        if save:
            self.router.save(self.router_dir)
        return {
            "expert": expert,
            "relevant": relevant,
            "loss": loss,
            "prob_before": float(before[self.router.index(expert)]),
            "prob_after": float(after[self.router.index(expert)]),
            "feedback_total": int(self.router.meta.get("feedback", 0)),
        }


def read_labels(path: Path, split: str | None = None) -> tuple[list[str], list[str]]:
    """Labelled queries from JSONL: ``{"query": ..., "expert": ...}`` per line (``domain``
    is accepted for ``expert``; with ``split`` only rows whose ``split`` matches)."""
    queries: list[str] = []
    labels: list[str] = []
    with Path(path).open() as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            row = json.loads(line)
            if split is not None and row.get("split") != split:
                continue
            label = row.get("expert", row.get("domain"))
            if not isinstance(row.get("query"), str) or not isinstance(label, str):
                raise ValueError(f"{path}:{i}: need string fields 'query' and 'expert'")
            queries.append(row["query"])
            labels.append(label)
    return queries, labels
