"""``KnowledgeBase``: the Python API that the CLI and the service are thin layers over."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from aiprime.config import Settings, load_settings
from aiprime.embed import Embedder, load_embedder
from aiprime.rag.chunking import Chunker
from aiprime.rag.ingest import Ingestor, IngestReport, Progress, remove
from aiprime.rag.retrieve import Mode, Retriever
from aiprime.store import Hit, SourceInfo, Store
from aiprime.store.lance import LanceStore

if TYPE_CHECKING:
    from langchain_core.language_models import BaseChatModel

    from aiprime.rag.answer import Answer, Calibration
    from aiprime.rag.rerank.stack import RerankStack


class KnowledgeBase:
    """One collection of the store, with the embedder and retriever that serve it.

    >>> kb = KnowledgeBase(home="/tmp/kb")             # doctest: +SKIP
    >>> kb.ingest(["docs/"])                             # doctest: +SKIP
    >>> kb.search("how are chunks sized?", k=5)          # doctest: +SKIP
    """

    def __init__(
        self,
        settings: Settings | None = None,
        *,
        home: str | Path | None = None,
        collection: str | None = None,
        embedder: Embedder | None = None,
        store: Store | None = None,
        reranker: RerankStack | Literal["auto"] | None = "auto",
    ) -> None:
        s = settings or load_settings(home)
        if collection:
            s = s.model_copy(update={"collection": collection})
        s.ensure_dirs()
        self.settings = s
        self._embedder = embedder
        self._store = store
        self._reranker = reranker

    @cached_property
    def embedder(self) -> Embedder:
        return self._embedder or load_embedder(self.settings)

    @cached_property
    def store(self) -> Store:
        """LanceDB by default; any ``Store`` (e.g. ``LangChainStore``) when given."""
        if self._store is not None:
            return self._store
        return LanceStore(
            self.settings.store_dir,
            self.settings.collection,
            self.embedder.dim,
            self.embedder.model_id,
            read_consistency_s=self.settings.store.read_consistency_s,
            ann_min_rows=self.settings.store.ann_min_rows,
        )

    @cached_property
    def retriever(self) -> Retriever:
        return Retriever(self.store, self.embedder, self.settings.retrieve)

    def ingest(self, paths: Sequence[str | Path], progress: Progress | None = None) -> IngestReport:
        chunker = Chunker(
            self.embedder.count_tokens,
            self.settings.chunk.size_tokens,
            self.settings.chunk.overlap_tokens,
        )
        return Ingestor(self.store, self.embedder, chunker).ingest(
            [Path(p) for p in paths], progress
        )

    def remove(self, paths: Sequence[str | Path], missing: bool = False) -> list[str]:
        return remove(self.store, [str(p) for p in paths], missing)

    @cached_property
    def reranker(self) -> RerankStack | None:
        """The configured re-ranking stack; by default every stage trained under the data
        directory (``aiprime rerank train``), None when there is none."""
        if self._reranker != "auto":
            return self._reranker
        from aiprime.rag.rerank.stack import build_stack

        return build_stack(self.settings, None, self.embedder)

    def search(
        self,
        query: str,
        k: int = 10,
        mode: Mode | None = None,
        where: str | None = None,
        rerank: bool = True,
    ) -> list[Hit]:
        """Retrieve, then re-rank the fused candidates when a re-ranker is configured
        (``rerank=False`` skips it, e.g. to compare)."""
        if not query.strip():
            raise ValueError("query is empty")
        stack = self.reranker if rerank else None
        if stack is None:
            return self.retriever.search(query, k, mode, where)
        hits = self.retriever.search(query, max(k, stack.depth), mode, where)
        return stack.rerank(query, hits, k)

    @cached_property
    def calibration(self) -> Calibration:
        from aiprime.rag.answer import load_calibration

        return load_calibration(self.settings.models_dir)

    def ask_stream(
        self,
        question: str,
        *,
        llm: str | BaseChatModel | None = None,
        rerank: bool = True,
        where: str | None = None,
    ) -> Iterator[str | Answer]:
        """Retrieve, re-rank and answer with citations; yields text pieces as they are
        produced, then the final ``Answer`` (``answered=False`` when the best score is below
        the calibrated threshold). ``llm`` defaults to ``settings.answer.llm``; None or an
        unset setting gives the offline extractive answer."""
        from aiprime.rag.answer import answer_signal, ask_stream

        a = self.settings.answer
        stack = self.reranker if rerank else None
        hits = self.search(question, k=max(a.top_chunks, 10), where=where, rerank=rerank)
        signal = answer_signal(stack.names if stack else [], self.embedder.model_id)
        yield from ask_stream(
            question,
            hits,
            signal=signal,
            threshold=self.calibration.threshold(signal),
            embedder=self.embedder,
            llm=llm if llm is not None else a.llm,
            top_chunks=a.top_chunks,
            max_sentences=a.max_sentences,
        )

    def ask(
        self,
        question: str,
        *,
        llm: str | BaseChatModel | None = None,
        rerank: bool = True,
        where: str | None = None,
    ) -> Answer:
        """``ask_stream`` drained: the final ``Answer`` only."""
        from aiprime.rag.answer import collect

        return collect(self.ask_stream(question, llm=llm, rerank=rerank, where=where))

    def sources(self) -> dict[str, SourceInfo]:
        return self.store.sources()

    def stats(self) -> dict[str, Any]:
        return {
            "home": str(self.settings.home),
            "collection": self.settings.collection,
            "chunks": self.store.count(),
            "sources": len(self.store.sources()),
            "embedder": self.embedder.model_id,
            "dim": self.embedder.dim,
        }


def list_collections(settings: Settings) -> list[str]:
    return sorted(p.name.removesuffix(".meta.json") for p in settings.store_dir.glob("*.meta.json"))
