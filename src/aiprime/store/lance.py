"""LanceDB store: vectors, a native BM25 full-text index and metadata in one on-disk table.

Consistency without transactions across calls: each write batch is one ``add`` (one
atomic Lance commit) followed by one ``delete`` of the sources' older versions. A crash
between the two leaves two versions of a source; ``repair`` (run before every write)
keeps the newest. Writers take a file lock; readers never block (MVCC versions).
"""

from __future__ import annotations

import fcntl
import json
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from aiprime.store.base import ChunkRecord, Hit, SourceInfo, StoreError, check_collection_name

_COLUMNS = [
    "id",
    "source",
    "doc_id",
    "title",
    "text",
    "chunk_index",
    "start",
    "end",
    "page",
    "modality",
]


def _schema(dim: int) -> pa.Schema:
    return pa.schema(
        [
            pa.field("id", pa.string()),
            pa.field("source", pa.string()),
            pa.field("source_hash", pa.string()),
            pa.field("doc_id", pa.string()),
            pa.field("title", pa.string()),
            pa.field("text", pa.string()),
            pa.field("content", pa.string()),
            pa.field("chunk_index", pa.int32()),
            pa.field("start", pa.int32()),
            pa.field("end", pa.int32()),
            pa.field("page", pa.int32()),
            pa.field("modality", pa.string()),
            pa.field("ingested_at", pa.int64()),
            pa.field("vector", pa.list_(pa.float32(), dim)),
        ]
    )


def sql_str(value: str) -> str:
    """A SQL string literal; the only way user text reaches a filter expression."""
    return "'" + value.replace("'", "''") + "'"


class LanceStore:
    def __init__(
        self,
        path: Path,
        collection: str = "default",
        dim: int | None = None,
        model_id: str | None = None,
        read_consistency_s: float = 1.0,
        ann_min_rows: int = 10_000,
    ) -> None:
        import lancedb

        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self.name = check_collection_name(collection)
        self.ann_min_rows = ann_min_rows
        self.db = lancedb.connect(
            str(self.path), read_consistency_interval=timedelta(seconds=read_consistency_s)
        )
        self._meta_path = self.path / f"{self.name}.meta.json"
        meta = self._read_meta()
        if meta:
            if dim is not None and meta["dim"] != dim:
                raise StoreError(
                    f"collection {self.name!r} holds {meta['dim']}-d vectors from "
                    f"{meta['model_id']!r}; the configured embedder gives {dim}-d. Use another "
                    "collection or the same model."
                )
            if model_id is not None and meta["model_id"].split("|")[0] != model_id.split("|")[0]:
                raise StoreError(
                    f"collection {self.name!r} was embedded with {meta['model_id']!r}, not "
                    f"{model_id!r}; mixing models makes scores meaningless"
                )
            self.dim = int(meta["dim"])
            self.model_id = str(meta["model_id"])
        else:
            if dim is None:
                raise StoreError(f"collection {self.name!r} does not exist yet")
            self.dim = dim
            self.model_id = model_id or "unknown"
        self._table: Any = None

    # -- metadata and locking -------------------------------------------------------
    def _read_meta(self) -> dict[str, Any] | None:
        if not self._meta_path.exists():
            return None
        return dict(json.loads(self._meta_path.read_text()))

    def _write_meta(self) -> None:
        tmp = self._meta_path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"dim": self.dim, "model_id": self.model_id}))
        os.replace(tmp, self._meta_path)

    @contextmanager
    def write_lock(self) -> Iterator[None]:
        """One writer per collection across processes; readers are never blocked."""
        lock_path = self.path / f".{self.name}.lock"
        with lock_path.open("w") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    @property
    def table(self) -> Any:
        if self._table is None:
            try:
                self._table = self.db.open_table(self.name)
            except ValueError:  # "Table ... was not found"
                return None
        return self._table

    def _ensure_table(self) -> Any:
        if self.table is None:
            self._table = self.db.create_table(self.name, schema=_schema(self.dim), exist_ok=True)
            self._write_meta()
        return self._table

    # -- writes ---------------------------------------------------------------------
    def _to_arrow(self, records: Sequence[ChunkRecord]) -> pa.Table:
        vec = np.stack([np.asarray(r.vector, dtype=np.float32) for r in records])
        if vec.shape[1] != self.dim:
            raise StoreError(f"vectors are {vec.shape[1]}-d, collection expects {self.dim}-d")
        schema = _schema(self.dim)
        cols: dict[str, Any] = {
            name: [getattr(r, name) for r in records]
            for name in schema.names
            if name != "vector"  # "content" is a property of ChunkRecord
        }
        cols["vector"] = pa.FixedSizeListArray.from_arrays(pa.array(vec.reshape(-1)), self.dim)
        return pa.table(cols, schema=schema)

    def replace_sources(self, records: Sequence[ChunkRecord], sources: dict[str, str]) -> None:
        if not sources:
            return
        table = self._ensure_table()
        if records:
            table.add(self._to_arrow(records))
        for chunk in _batched(sorted(sources.items()), 200):
            cond = " OR ".join(
                f"(source = {sql_str(s)} AND source_hash != {sql_str(h)})" for s, h in chunk
            )
            table.delete(cond)

    def remove_sources(self, sources: Sequence[str]) -> int:
        table = self.table
        if table is None or not sources:
            return 0
        before = table.count_rows()
        for chunk in _batched(list(sources), 200):
            table.delete("source IN (" + ", ".join(sql_str(s) for s in chunk) + ")")
        return int(before - table.count_rows())

    def _versions(self) -> dict[str, list[SourceInfo]]:
        """Every stored (source, hash) version, newest first; more than one means a
        write was interrupted between its add and its delete."""
        table = self.table
        if table is None:
            return {}
        cols = self._scan(table, ["source", "source_hash", "ingested_at"])
        agg = cols.group_by(["source", "source_hash"]).aggregate(
            [("ingested_at", "max"), ("ingested_at", "count")]
        )
        out: dict[str, list[SourceInfo]] = {}
        for r in agg.to_pylist():
            info = SourceInfo(
                r["source"], r["source_hash"], r["ingested_at_count"], r["ingested_at_max"]
            )
            out.setdefault(r["source"], []).append(info)
        for versions in out.values():
            versions.sort(key=lambda v: -v.ingested_at)
        return out

    def repair(self) -> int:
        """Drop older versions left by a write interrupted between add and delete."""
        stale = {s: vs[0].source_hash for s, vs in self._versions().items() if len(vs) > 1}
        if not stale:
            return 0
        before = self.count()
        self.replace_sources([], stale)
        return before - self.count()

    def finalize(self) -> None:
        """Index new rows: build the BM25 index once, then fold new data into it."""
        from lancedb.index import FTS, HnswSq

        table = self.table
        if table is None:
            return
        names = {ix.name for ix in table.list_indices()}
        if "content_idx" not in names:
            table.create_index(
                "content",
                config=FTS(stem=True, remove_stop_words=True, ascii_folding=True),
                replace=True,
                name="content_idx",
            )
        n = table.count_rows()
        if n >= self.ann_min_rows and "vector_idx" not in names:
            table.create_index("vector", config=HnswSq(distance_type="cosine"), name="vector_idx")
        table.optimize(cleanup_older_than=timedelta(days=1))

    # -- reads ----------------------------------------------------------------------
    @staticmethod
    def _scan(table: Any, columns: list[str]) -> pa.Table:
        """Read only ``columns`` of every row (``to_arrow`` would read vectors and text)."""
        return table.search().select(columns).limit(None).to_arrow()

    def sources(self) -> dict[str, SourceInfo]:
        return {s: vs[0] for s, vs in self._versions().items()}

    def count(self) -> int:
        table = self.table
        return 0 if table is None else int(table.count_rows())

    @staticmethod
    def _hits(rows: list[dict[str, Any]], key: str, sign: float, base: float) -> list[Hit]:
        return [Hit(**{c: r[c] for c in _COLUMNS}, score=base + sign * float(r[key])) for r in rows]

    def dense_search(self, vector: np.ndarray, k: int, where: str | None = None) -> list[Hit]:
        table = self.table
        if table is None:
            return []
        q = table.search(np.asarray(vector, dtype=np.float32), vector_column_name="vector")
        q = q.distance_type("cosine").limit(k).select([*_COLUMNS, "_distance"])
        if where:
            q = q.where(where, prefilter=True)
        # cosine distance = 1 - cosine similarity; report the similarity.
        return self._hits(q.to_list(), "_distance", -1.0, 1.0)

    def text_search(self, query: str, k: int, where: str | None = None) -> list[Hit]:
        table = self.table
        if table is None or not query.strip():
            return []
        q = table.search(query, query_type="fts", fts_columns="content")
        q = q.limit(k).select([*_COLUMNS, "_score"])
        if where:
            q = q.where(where, prefilter=True)
        try:
            rows = q.to_list()
        except Exception as e:  # no index yet, or a query the tokenizer rejects
            if "index" in str(e).lower():
                raise StoreError(f"collection {self.name!r} has no full-text index yet") from e
            raise
        return self._hits(rows, "_score", 1.0, 0.0)


def _batched(items: list[Any], n: int) -> Iterator[list[Any]]:
    for i in range(0, len(items), n):
        yield items[i : i + n]
