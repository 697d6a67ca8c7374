"""Incremental, crash-safe ingestion: files -> documents -> chunks -> vectors -> store.

A file is identified by its absolute path and the SHA-256 of its bytes: an unchanged file
is skipped, a changed one replaces its chunks atomically, a broken one is reported and
its previously stored version stays untouched.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from aiprime.embed import Embedder
from aiprime.rag.chunking import Chunk, Chunker
from aiprime.rag.loaders import LoadError, discover, load_file
from aiprime.store import ChunkRecord, Store


class Progress:
    """Hooks for a progress display; the default does nothing (library use, tests)."""

    def files_total(self, n: int) -> None: ...

    def file_done(self, path: str) -> None: ...

    def chunks_total(self, n: int) -> None: ...

    def chunks_done(self, n: int) -> None: ...

    def task(self, name: str, total: int) -> None:
        """Start a further named step (e.g. querying during an evaluation)."""

    def advance(self, n: int = 1) -> None: ...


@dataclass
class IngestReport:
    files_seen: int = 0
    files_ingested: int = 0
    files_unchanged: int = 0
    chunks_written: int = 0
    chunks_embedded: int = 0
    repaired: int = 0
    seconds: float = 0.0
    errors: list[LoadError] = field(default_factory=list)

    def to_dict(self) -> dict[str, object]:
        return {
            "files_seen": self.files_seen,
            "files_ingested": self.files_ingested,
            "files_unchanged": self.files_unchanged,
            "files_failed": len({e.path.split(":")[0] for e in self.errors}),
            "chunks_written": self.chunks_written,
            "chunks_embedded": self.chunks_embedded,
            "repaired_rows": self.repaired,
            "seconds": round(self.seconds, 3),
            "errors": [str(e) for e in self.errors],
        }


def file_hash(path: Path, salt: str = "") -> str:
    """SHA-256 of the file's bytes (and of ``salt``, when given)."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    if salt:
        h.update(b"\x00" + salt.encode())
    return h.hexdigest()


def chunk_id(source: str, source_hash: str, doc_id: str, index: int) -> str:
    return hashlib.sha256(f"{source}\x00{source_hash}\x00{doc_id}\x00{index}".encode()).hexdigest()[
        :24
    ]


class Ingestor:
    def __init__(
        self,
        store: Store,
        embedder: Embedder,
        chunker: Chunker,
        batch_chunks: int = 4096,
        embed_batch: int = 256,
    ) -> None:
        self.store = store
        self.embedder = embedder
        self.chunker = chunker
        self.batch_chunks = batch_chunks
        self.embed_batch = embed_batch

    def ingest(self, paths: Sequence[Path], progress: Progress | None = None) -> IngestReport:
        prog = progress or Progress()
        t0 = time.perf_counter()
        report = IngestReport()
        files, errors = discover([Path(p) for p in paths])
        report.errors.extend(errors)
        report.files_seen = len(files)
        prog.files_total(len(files))
        with self.store.write_lock():
            report.repaired = self.store.repair()
            known = self.store.sources()
            pending: list[tuple[str, str, list[Chunk]]] = []
            n_pending = 0
            for path in files:
                src = str(path)
                try:
                    # The chunking settings are part of a file's version: changing them
                    # re-chunks files whose bytes did not change.
                    digest = file_hash(path, self.chunker.fingerprint)
                except OSError as e:
                    report.errors.append(LoadError(path, f"unreadable ({e.strerror or e})"))
                    prog.file_done(src)
                    continue
                if src in known and known[src].source_hash == digest:
                    report.files_unchanged += 1
                    prog.file_done(src)
                    continue
                try:
                    docs = load_file(path, report.errors)
                    chunks = [c for d in docs for c in self.chunker.split(d)]
                    if not chunks:
                        raise LoadError(path, "no text to index")
                except LoadError as e:
                    report.errors.append(e)
                    prog.file_done(src)
                    continue
                pending.append((src, digest, chunks))
                n_pending += len(chunks)
                if n_pending >= self.batch_chunks:
                    self._flush(pending, report, prog)
                    pending, n_pending = [], 0
            if pending:
                self._flush(pending, report, prog)
            if report.files_ingested or report.repaired:
                self.store.finalize()
        report.seconds = time.perf_counter() - t0
        return report

    def _flush(
        self, pending: list[tuple[str, str, list[Chunk]]], report: IngestReport, prog: Progress
    ) -> None:
        chunks = [c for _, _, cs in pending for c in cs]
        prog.chunks_total(len(chunks))
        misses_before = getattr(self.embedder, "misses", None)
        # Embed in token-length order across the whole batch: each slice then holds
        # chunks of nearly equal length, which the embedder batches without padding, and
        # the progress bar still moves slice by slice. Longest first, so the bar's time
        # estimate errs long rather than short.
        texts = [c.content for c in chunks]
        order = sorted(
            range(len(texts)), key=lambda i: (chunks[i].tokens, len(texts[i])), reverse=True
        )
        vectors = np.empty((len(texts), self.embedder.dim), dtype=np.float32)
        for i in range(0, len(order), self.embed_batch):
            idx = order[i : i + self.embed_batch]
            vectors[idx] = self.embedder.encode([texts[j] for j in idx])
            prog.chunks_done(len(idx))
        now = time.time_ns()
        records: list[ChunkRecord] = []
        k = 0
        for src, digest, cs in pending:
            for c in cs:
                vec = vectors[k]
                records.append(
                    ChunkRecord(
                        id=chunk_id(src, digest, c.doc_id, c.index),
                        source=src,
                        source_hash=digest,
                        doc_id=c.doc_id,
                        title=c.title,
                        text=c.text,
                        chunk_index=c.index,
                        start=c.start,
                        end=c.end,
                        page=c.page,
                        ingested_at=now,
                        vector=vec,
                    )
                )
                k += 1
        self.store.replace_sources(records, {src: digest for src, digest, _ in pending})
        for src, _, _ in pending:
            prog.file_done(src)
        report.files_ingested += len(pending)
        report.chunks_written += len(records)
        misses_after = getattr(self.embedder, "misses", None)
        if misses_before is not None and misses_after is not None:
            report.chunks_embedded += misses_after - misses_before
        else:
            report.chunks_embedded += len(records)


def remove(store: Store, targets: Sequence[str], missing: bool = False) -> list[str]:
    """Remove sources by exact path, by folder prefix, or (``missing``) whose file is gone."""
    with store.write_lock():
        known = store.sources()
        chosen: set[str] = set()
        for t in targets:
            p = str(Path(t).expanduser().resolve())
            chosen.update(s for s in known if s == p or s.startswith(p.rstrip("/") + "/"))
        if missing:
            chosen.update(s for s in known if not Path(s).exists())
        if chosen:
            store.remove_sources(sorted(chosen))
            store.finalize()
    return sorted(chosen)
