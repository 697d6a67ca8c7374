"""The store interface every backend implements, and the records that cross it."""

from __future__ import annotations

import re
from collections.abc import Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import numpy as np

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_\-]{0,63}$")


class StoreError(Exception):
    """A store problem the user can act on (bad name, model mismatch, missing index)."""


def check_collection_name(name: str) -> str:
    if not _NAME.match(name):
        raise StoreError(
            f"collection name {name!r}: use 1-64 letters, digits, '_' or '-', starting with "
            "a letter or digit"
        )
    return name


@dataclass
class ChunkFields:
    """Where a chunk comes from: what a stored record and a search hit share."""

    id: str
    source: str
    doc_id: str
    title: str
    text: str
    chunk_index: int
    start: int
    end: int
    page: int

    @property
    def content(self) -> str:
        """What is embedded and indexed: the context line (title, headings), then the text."""
        return f"{self.title}\n{self.text}" if self.title else self.text


@dataclass
class ChunkRecord(ChunkFields):
    source_hash: str
    ingested_at: int
    vector: np.ndarray
    modality: str = "text"


@dataclass
class Hit(ChunkFields):
    """One retrieved chunk, with where it came from and how each retriever scored it."""

    score: float
    scores: dict[str, float] = field(default_factory=dict)
    modality: str = "text"

    def to_dict(self) -> dict[str, object]:
        return dict(self.__dict__)


@dataclass(frozen=True)
class SourceInfo:
    source: str
    source_hash: str
    chunks: int
    ingested_at: int


@runtime_checkable
class Store(Protocol):
    """Minimal contract: atomic per-source replacement plus dense and lexical search."""

    dim: int

    def sources(self) -> dict[str, SourceInfo]: ...

    def replace_sources(self, records: Sequence[ChunkRecord], sources: dict[str, str]) -> None:
        """Make ``records`` the only chunks of each source in ``sources`` (source -> hash)."""
        ...

    def remove_sources(self, sources: Sequence[str]) -> int: ...

    def dense_search(self, vector: np.ndarray, k: int, where: str | None = None) -> list[Hit]: ...

    def text_search(self, query: str, k: int, where: str | None = None) -> list[Hit]: ...

    def count(self) -> int: ...

    def write_lock(self) -> AbstractContextManager[None]:
        """Held by the one writer of a collection across processes."""
        ...

    def repair(self) -> int:
        """Undo a write interrupted half-way; returns the number of rows dropped."""
        ...

    def finalize(self) -> None:
        """Bring indexes up to date after a batch of writes."""
        ...
