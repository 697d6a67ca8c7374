"""Storage behind one small interface: LanceDB by default, any LangChain VectorStore too."""

from aiprime.store.base import ChunkRecord, Hit, SourceInfo, Store, StoreError
from aiprime.store.lance import LanceStore

__all__ = ["ChunkRecord", "Hit", "LanceStore", "SourceInfo", "Store", "StoreError"]
