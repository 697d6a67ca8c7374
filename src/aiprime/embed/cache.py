"""Content-hash embedding cache, so re-ingesting unchanged text never re-embeds it.

SQLite in WAL mode: many readers, one writer, atomic commits, nothing pickled.
"""

from __future__ import annotations

import hashlib
import sqlite3
import threading
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from aiprime.embed.base import Embedder


class EmbeddingCache:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(path), check_same_thread=False, timeout=30)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("CREATE TABLE IF NOT EXISTS emb (key TEXT PRIMARY KEY, vec BLOB NOT NULL)")
        self._db.commit()

    @staticmethod
    def key(model_id: str, text: str) -> str:
        return hashlib.sha256(f"{model_id}\x00{text}".encode()).hexdigest()

    def get_many(self, keys: Sequence[str], dim: int) -> dict[str, np.ndarray]:
        found: dict[str, np.ndarray] = {}
        with self._lock:
            for i in range(0, len(keys), 500):
                part = list(keys[i : i + 500])
                q = f"SELECT key, vec FROM emb WHERE key IN ({','.join('?' * len(part))})"
                for k, blob in self._db.execute(q, part):
                    v = np.frombuffer(blob, dtype=np.float32)
                    if v.shape[0] == dim:
                        found[k] = v
        return found

    def put_many(self, items: dict[str, np.ndarray]) -> None:
        with self._lock:
            self._db.executemany(
                "INSERT OR REPLACE INTO emb (key, vec) VALUES (?, ?)",
                [(k, np.asarray(v, dtype=np.float32).tobytes()) for k, v in items.items()],
            )
            self._db.commit()

    def __len__(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM emb").fetchone()[0])

    def close(self) -> None:
        with self._lock:
            self._db.close()


class CachedEmbedder:
    """Wraps any embedder; only texts never seen by this model are encoded."""

    def __init__(self, inner: Embedder, cache: EmbeddingCache) -> None:
        self.inner = inner
        self.cache = cache
        self.model_id = inner.model_id
        # Keys name the exact weights/graph when the backend can (an ONNX export's
        # fingerprint), so a re-export never serves embeddings of the previous one.
        self.cache_id: str = getattr(inner, "cache_id", inner.model_id)
        self.dim = inner.dim
        self.hits = 0
        self.misses = 0

    def encode(
        self, texts: Sequence[str], batch_size: int | None = None, show_progress: bool = False
    ) -> np.ndarray:
        keys = [EmbeddingCache.key(self.cache_id, t) for t in texts]
        found = self.cache.get_many(list(dict.fromkeys(keys)), self.dim)
        # One index per distinct unseen text: duplicates within a call are encoded once.
        first = {k: i for i, k in reversed(list(enumerate(keys)))}
        todo = [first[k] for k in dict.fromkeys(keys) if k not in found]
        self.hits += len(texts) - len(todo)
        self.misses += len(todo)
        if todo:
            fresh = self.inner.encode([texts[i] for i in todo], batch_size, show_progress)
            new = {keys[i]: fresh[j] for j, i in enumerate(todo)}
            self.cache.put_many(new)
            found.update(new)
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        return np.stack([found[k] for k in keys]).astype(np.float32, copy=False)

    def encode_query(self, texts: Sequence[str]) -> np.ndarray:
        """Queries skip the cache: they rarely repeat, and a write per search costs latency."""
        return self.inner.encode(texts)

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        return self.inner.count_tokens(texts)
