"""aiprime as LangChain components: retriever, compressor, LCEL chain, the docs example."""

from __future__ import annotations

import re
from pathlib import Path

from langchain_core.documents import Document
from langchain_core.documents.compressor import BaseDocumentCompressor
from langchain_core.language_models.fake_chat_models import GenericFakeChatModel
from langchain_core.messages import AIMessage
from langchain_core.retrievers import BaseRetriever

from aiprime.rag.langchain import (
    AiprimeReranker,
    AiprimeRetriever,
    build_rag_chain,
    document_to_hit,
    hit_to_document,
)
from aiprime.rag.rerank.base import apply_scores
from aiprime.rag.rerank.stack import RerankStack
from aiprime.store import Hit

REPO = Path(__file__).resolve().parents[2]


def _kb(make_kb, tmp_path: Path):
    root = tmp_path / "docs"
    root.mkdir()
    (root / "chunks.md").write_text(
        "# Chunking\n\nChunks are sized in tokens of the embedding model, 200 by default, "
        "with 32 tokens of overlap."
    )
    (root / "store.md").write_text("# Store\n\nLanceDB holds vectors and a BM25 index.")
    kb = make_kb()
    kb.ingest([root])
    return kb


def test_retriever_is_a_langchain_retriever(make_kb, tmp_path: Path) -> None:
    retriever = AiprimeRetriever(kb=_kb(make_kb, tmp_path), k=2)
    assert isinstance(retriever, BaseRetriever)
    docs = retriever.invoke("how are chunks sized in tokens")
    assert 1 <= len(docs) <= 2 and all(isinstance(d, Document) for d in docs)
    top = docs[0]
    assert top.metadata["source"].endswith("chunks.md")
    assert {"dense", "bm25"} & set(top.metadata["scores"])
    assert top.id and top.metadata["end"] > top.metadata["start"]
    batch = retriever.batch(["chunks", "LanceDB"])
    assert batch[1][0].metadata["source"].endswith("store.md")


def test_hit_document_round_trip() -> None:
    h = Hit("c1", "a.md", "a", "T", "body", 2, 5, 9, 3, score=0.5, scores={"dense": 0.5})
    assert document_to_hit(hit_to_document(h)) == h
    bare = document_to_hit(Document(page_content="plain text"), rank=3)
    assert bare.text == "plain text" and bare.id == "doc-3" and bare.score == -3


class _Overlap:
    """A test stage: scores by shared words with the query."""

    name = "overlap"

    def rerank(self, query: str, hits: list[Hit], k: int | None = None) -> list[Hit]:
        q = set(query.lower().split())
        scores = [len(q & set(h.text.lower().split())) for h in hits]
        return apply_scores(hits, [float(s) for s in scores], self.name, k)


def test_reranker_is_a_document_compressor() -> None:
    comp = AiprimeReranker(stack=RerankStack([_Overlap()]), top_n=2)
    assert isinstance(comp, BaseDocumentCompressor)
    docs = [
        Document(page_content="nothing relevant here"),
        Document(page_content="mixture of experts routing"),
        Document(page_content="experts routing tokens with a mixture of gates gate"),
    ]
    out = comp.compress_documents(docs, "mixture of experts routing gate")
    assert [d.page_content for d in out] == [
        "experts routing tokens with a mixture of gates gate",
        "mixture of experts routing",
    ]
    assert out[0].metadata["relevance_score"] == 5.0
    assert out[0].metadata["scores"]["overlap_rank"] == 1.0


def test_build_rag_chain_checks_citations(make_kb, tmp_path: Path) -> None:
    retriever = AiprimeRetriever(kb=_kb(make_kb, tmp_path), k=2)
    llm = GenericFakeChatModel(
        messages=iter([AIMessage(content="Chunks are 200 tokens [1]. See also [4].")])
    )
    out = build_rag_chain(llm, retriever).invoke("how are chunks sized")
    assert out["answer"] == "Chunks are 200 tokens [1]. See also ."
    assert out["removed_citations"] == [4]
    assert out["answered"]
    assert out["citations"][0]["n"] == 1 and out["citations"][0]["source"].endswith("chunks.md")


def test_docs_example_runs_as_written(make_kb, tmp_path: Path, capsys) -> None:
    """The LangChain example in docs/rag.md, executed with a fake chat model."""
    text = (REPO / "docs" / "rag.md").read_text()
    m = re.search(r"<!-- langchain-example -->\n```python\n(.*?)```", text, re.S)
    assert m, "docs/rag.md lost its LangChain example"
    llm = GenericFakeChatModel(
        messages=iter(
            [AIMessage(content="They are sized in tokens [1]."), AIMessage(content="In tokens.")]
        )
    )
    scope = {"kb": _kb(make_kb, tmp_path), "llm": llm}
    exec(compile(m.group(1), "docs/rag.md", "exec"), scope)
    assert scope["result"]["answer"] == "They are sized in tokens [1]."
    printed = capsys.readouterr().out
    assert "They are sized in tokens [1]. []" in printed and "In tokens." in printed
