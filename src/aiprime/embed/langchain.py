"""aiprime's embedders as LangChain ``Embeddings``."""

from __future__ import annotations

from langchain_core.embeddings import Embeddings

from aiprime.embed.base import Embedder


class AiprimeEmbeddings(Embeddings):
    """Any aiprime embedder (ONNX int8, cached) where LangChain expects ``Embeddings``."""

    def __init__(self, embedder: Embedder) -> None:
        self.embedder = embedder

    def embed_documents(self, texts: list[str]) -> list[list[float]]:
        return [list(map(float, v)) for v in self.embedder.encode(texts)]

    def embed_query(self, text: str) -> list[float]:
        return [float(x) for x in self.embedder.encode([text])[0]]
