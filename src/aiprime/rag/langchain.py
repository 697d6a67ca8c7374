"""aiprime's retrieval, re-ranking and cited answers as LangChain components.

* ``AiprimeRetriever`` — a ``BaseRetriever`` over a ``KnowledgeBase`` (hybrid search, then
  the trained re-rankers), so it drops into any LCEL chain.
* ``AiprimeReranker`` — a ``BaseDocumentCompressor`` over a ``RerankStack`` (LR features,
  cross-encoder, MMR), for ``ContextualCompressionRetriever`` or any chain that re-ranks.
* ``build_rag_chain(llm, retriever)`` — an LCEL chain: question → retrieve → JSON-quoted
  sources in the prompt → LLM → citations checked against the sources given.

Only ``langchain-core`` is needed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

from langchain_core.callbacks import CallbackManagerForRetrieverRun, Callbacks
from langchain_core.documents import Document
from langchain_core.documents.compressor import BaseDocumentCompressor
from langchain_core.output_parsers import StrOutputParser
from langchain_core.retrievers import BaseRetriever
from langchain_core.runnables import (
    Runnable,
    RunnableLambda,
    RunnableParallel,
    RunnablePassthrough,
)
from pydantic import ConfigDict

from aiprime.rag.answer import Citation, CitationFilter, build_messages, says_no_answer
from aiprime.store import Hit

if TYPE_CHECKING:
    from langchain_core.language_models import BaseChatModel

    from aiprime.rag.kb import KnowledgeBase
    from aiprime.rag.rerank.stack import RerankStack

_FIELDS = ("source", "doc_id", "title", "chunk_index", "start", "end", "page", "modality")


def hit_to_document(h: Hit) -> Document:
    """A hit as a LangChain ``Document``: the chunk text, its location and every score."""
    meta: dict[str, Any] = {f: getattr(h, f) for f in _FIELDS}
    meta["score"] = h.score
    meta["scores"] = dict(h.scores)
    return Document(page_content=h.text, id=h.id, metadata=meta)


def document_to_hit(d: Document, rank: int = 0) -> Hit:
    """Back to a ``Hit``; documents from other retrievers get neutral defaults, so the
    cross-encoder and MMR work on them (the LR stage wants aiprime's retriever scores)."""
    m = d.metadata
    return Hit(
        id=str(d.id or m.get("id") or f"doc-{rank}"),
        source=str(m.get("source", "")),
        doc_id=str(m.get("doc_id") or d.id or m.get("source") or f"doc-{rank}"),
        title=str(m.get("title", "")),
        text=d.page_content,
        chunk_index=int(m.get("chunk_index", 0)),
        start=int(m.get("start", 0)),
        end=int(m.get("end", len(d.page_content))),
        page=int(m.get("page", -1)),
        score=float(m.get("score", -rank)),
        scores=dict(m.get("scores", {})),
        modality=str(m.get("modality", "text")),
    )


class AiprimeRetriever(BaseRetriever):
    """Hybrid BM25 + dense search with the knowledge base's re-rankers, as a retriever.

    >>> retriever = AiprimeRetriever(kb=KnowledgeBase(home="~/kb"), k=5)  # doctest: +SKIP
    >>> retriever.invoke("how are chunks sized?")                           # doctest: +SKIP
    """

    model_config = ConfigDict(arbitrary_types_allowed=True)

    kb: Any  # KnowledgeBase; Any keeps pydantic from validating its internals
    k: int = 5
    mode: str | None = None
    rerank: bool = True
    where: str | None = None

    def _get_relevant_documents(
        self, query: str, *, run_manager: CallbackManagerForRetrieverRun
    ) -> list[Document]:
        kb: KnowledgeBase = self.kb
        mode: Any = self.mode
        hits = kb.search(query, k=self.k, mode=mode, where=self.where, rerank=self.rerank)
        return [hit_to_document(h) for h in hits]


class AiprimeReranker(BaseDocumentCompressor):
    """aiprime's re-ranking stack as a document compressor: keeps the best ``top_n``,
    with the stage scores in ``metadata["scores"]`` and ``metadata["relevance_score"]``."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    stack: Any  # RerankStack
    top_n: int | None = 5

    def compress_documents(
        self, documents: Sequence[Document], query: str, callbacks: Callbacks | None = None
    ) -> Sequence[Document]:
        stack: RerankStack = self.stack
        hits = [document_to_hit(d, i) for i, d in enumerate(documents, start=1)]
        out: list[Document] = []
        for h in stack.rerank(query, hits, self.top_n):
            d = hit_to_document(h)
            d.metadata["relevance_score"] = h.score
            out.append(d)
        return out


def _citations(docs: Sequence[Document]) -> list[Citation]:
    return [Citation.from_hit(i, document_to_hit(d, i)) for i, d in enumerate(docs, start=1)]


def _finish(x: dict[str, Any]) -> dict[str, Any]:
    cites: list[Citation] = x["citations"]
    filt = CitationFilter(c.n for c in cites)
    text = filt.filter(x["reply"]).strip()
    return {
        "question": x["question"],
        "answer": text,
        "answered": not says_no_answer(text),
        "citations": [asdict(c) for c in cites],
        "removed_citations": filt.removed,
    }


def build_rag_chain(
    llm: BaseChatModel | Runnable[Any, Any], retriever: BaseRetriever
) -> Runnable[str, dict[str, Any]]:
    """question → ``{"answer", "citations", "removed_citations", "answered", "question"}``.

    The retrieved chunks are numbered and placed in the user turn as JSON data (the
    system prompt is fixed, see ``aiprime.rag.answer.SYSTEM_PROMPT``); citations in the
    reply to numbers that were not given are removed and listed.
    """
    prompt: Runnable[dict[str, Any], list[Any]] = RunnableLambda(
        lambda x: build_messages(x["question"], x["citations"])
    )
    return (
        RunnableParallel(question=RunnablePassthrough(), docs=retriever)
        | RunnablePassthrough.assign(citations=lambda x: _citations(x["docs"]))
        | RunnablePassthrough.assign(reply=prompt | llm | StrOutputParser())
        | RunnableLambda(_finish)
    ).with_config(run_name="aiprime_rag")
