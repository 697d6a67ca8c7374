"""Any LangChain ``VectorStore`` (Qdrant, Milvus, Elasticsearch, pgvector, ...) as the store.

For when a collection outgrows one machine. The adapter keeps aiprime's contract:
- per-source versions live in a small JSON manifest beside the application, written
  atomically; chunk ids are deterministic, so re-adding after a crash overwrites;
- a replacement adds the new chunks, records the old ids as pending, then deletes them;
  ``repair`` finishes a deletion that a crash interrupted;
- scores are exact cosine similarities recomputed from the (cached) embedder, so they do
  not depend on each backend's score convention;
- there is no BM25 on a generic vector store: ``text_search`` returns nothing, so hybrid
  search degrades to dense (use LanceDB for hybrid).

The ``VectorStore`` must embed with the same model, e.g. built with
``AiprimeEmbeddings(kb.embedder)``; with the embedding cache that costs a lookup, not a
second encoding.
"""

from __future__ import annotations

import fcntl
import json
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
from langchain_core.documents import Document
from langchain_core.vectorstores import VectorStore

from aiprime.embed import Embedder
from aiprime.store.base import ChunkRecord, Hit, SourceInfo, StoreError

_META = ("source", "doc_id", "title", "text", "chunk_index", "start", "end", "page", "modality")


class LangChainStore:
    def __init__(self, vectorstore: VectorStore, embedder: Embedder, manifest: Path) -> None:
        self.vs = vectorstore
        self.embedder = embedder
        self.dim = embedder.dim
        self.manifest_path = Path(manifest)
        self.manifest_path.parent.mkdir(parents=True, exist_ok=True)

    # -- manifest -------------------------------------------------------------------
    def _load(self) -> dict[str, Any]:
        if not self.manifest_path.exists():
            return {"model_id": self.embedder.model_id, "sources": {}, "pending_delete": []}
        m = dict(json.loads(self.manifest_path.read_text()))
        if m.get("model_id", "").split("|")[0] != self.embedder.model_id.split("|")[0]:
            raise StoreError(
                f"{self.manifest_path}: collection embedded with {m.get('model_id')!r}, "
                f"not {self.embedder.model_id!r}"
            )
        return m

    def _save(self, m: dict[str, Any]) -> None:
        tmp = self.manifest_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(m))
        os.replace(tmp, self.manifest_path)

    @contextmanager
    def write_lock(self) -> Iterator[None]:
        with self.manifest_path.with_suffix(".lock").open("w") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    # -- writes ---------------------------------------------------------------------
    def replace_sources(self, records: Sequence[ChunkRecord], sources: dict[str, str]) -> None:
        if not sources:
            return
        m = self._load()
        if records:
            docs = [
                Document(
                    page_content=r.content,
                    metadata={k: getattr(r, k) for k in _META} | {"source_hash": r.source_hash},
                )
                for r in records
            ]
            self.vs.add_documents(docs, ids=[r.id for r in records])
        stale: list[str] = []
        for src, digest in sources.items():
            old = m["sources"].get(src)
            if old and old["hash"] != digest:
                stale.extend(old["ids"])
            new_ids = [r.id for r in records if r.source == src]
            if new_ids:
                at = max(r.ingested_at for r in records if r.source == src)
                m["sources"][src] = {"hash": digest, "ids": new_ids, "ingested_at": at}
            elif old and old["hash"] != digest:
                del m["sources"][src]
        m["pending_delete"] = sorted(set(m["pending_delete"]) | set(stale))
        self._save(m)
        self.repair()

    def remove_sources(self, sources: Sequence[str]) -> int:
        m = self._load()
        ids: list[str] = []
        for s in sources:
            entry = m["sources"].pop(s, None)
            if entry:
                ids.extend(entry["ids"])
        m["pending_delete"] = sorted(set(m["pending_delete"]) | set(ids))
        self._save(m)
        self.repair()
        return len(ids)

    def repair(self) -> int:
        m = self._load()
        pending = m["pending_delete"]
        if pending:
            self.vs.delete(ids=list(pending))
            m["pending_delete"] = []
            self._save(m)
        return len(pending)

    def finalize(self) -> None:
        """Nothing to do: the backend indexes on write."""

    # -- reads ----------------------------------------------------------------------
    def sources(self) -> dict[str, SourceInfo]:
        return {
            s: SourceInfo(s, e["hash"], len(e["ids"]), e["ingested_at"])
            for s, e in self._load()["sources"].items()
        }

    def count(self) -> int:
        return sum(len(e["ids"]) for e in self._load()["sources"].values())

    def dense_search(self, vector: np.ndarray, k: int, where: str | None = None) -> list[Hit]:
        if where:
            raise StoreError("filters are not supported on LangChain vector stores")
        docs = self.vs.similarity_search_by_vector(list(map(float, vector)), k=k)
        if not docs:
            return []
        emb = self.embedder.encode([d.page_content for d in docs])
        sims = emb @ np.asarray(vector, dtype=np.float32)
        hits = [
            Hit(id=str(d.id), **{k_: d.metadata[k_] for k_ in _META}, score=float(s))
            for d, s in zip(docs, sims, strict=True)
        ]
        return sorted(hits, key=lambda h: -h.score)

    def text_search(self, query: str, k: int, where: str | None = None) -> list[Hit]:
        return []
