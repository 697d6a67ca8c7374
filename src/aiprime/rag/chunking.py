"""Structure-aware chunking measured in the embedding model's tokens.

Rules, in order: a chunk never crosses a heading; whole paragraphs are packed while they
fit; a paragraph too long for one chunk is cut between sentences, with ``overlap``
tokens of trailing sentences repeated in the next chunk; a sentence too long on its own
is cut between words, and a single word too long on its own between characters. Each
chunk is an exact slice ``doc.text[start:end]``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from aiprime.rag.loaders import Block, Document

TokenCounter = Callable[[Sequence[str]], list[int]]

_SENT_END = re.compile(r"(?<=[.!?])[\"')\]]*\s+(?=[\"'(\[]?[A-Z0-9])")


@dataclass(frozen=True)
class Chunk:
    source: str
    doc_id: str
    index: int
    title: str  # document title and heading path: context for the embedder and BM25
    text: str
    start: int
    end: int
    page: int = -1
    # The chunker's count of content tokens (title and text, no special tokens): lets
    # ingest embed in batches of equal length without tokenising again; 0 when unknown.
    tokens: int = 0

    @property
    def content(self) -> str:
        """What is embedded and indexed: the context line, then the chunk."""
        return f"{self.title}\n{self.text}" if self.title else self.text


@dataclass
class _Unit:
    start: int
    end: int
    tokens: int
    para: int  # paragraph number: units of one paragraph join with a space, not a break


def _sentences(text: str, start: int, end: int) -> list[tuple[int, int]]:
    out, pos = [], start
    for m in _SENT_END.finditer(text, start, end):
        out.append((pos, m.start()))
        pos = m.end()
    out.append((pos, end))
    return [(s, e) for s, e in out if e > s]


def split_sentences(text: str, start: int = 0, end: int | None = None) -> list[tuple[int, int]]:
    """Sentence spans of ``text[start:end]`` (the chunker's own rule, for answer quotes)."""
    return _sentences(text, start, len(text) if end is None else end)


def _words(text: str, start: int, end: int) -> list[tuple[int, int]]:
    return [(m.start(), m.end()) for m in re.finditer(r"\S+", text[:end]) if m.start() >= start]


class Chunker:
    def __init__(
        self, count_tokens: TokenCounter, size_tokens: int = 200, overlap_tokens: int = 32
    ):
        if overlap_tokens >= size_tokens:
            raise ValueError("overlap_tokens must be smaller than size_tokens")
        self.count = count_tokens
        self.size = size_tokens
        self.overlap = overlap_tokens

    @property
    def fingerprint(self) -> str:
        """Identifies the chunking rules and sizes; stored with each file's version."""
        return f"chunker-v1|{self.size}|{self.overlap}"

    def _units(self, doc: Document, blocks: Sequence[Block], ctx: str) -> tuple[list[_Unit], int]:
        """The packing units of a section, and the token count of its context line."""
        text = doc.text
        ctx_tokens, *counts = self.count([ctx, *(text[b.start : b.end] for b in blocks)])
        units: list[_Unit] = []
        for p, (b, n) in enumerate(zip(blocks, counts, strict=True)):
            if n <= self.size:
                units.append(_Unit(b.start, b.end, n, p))
                continue
            sents = _sentences(text, b.start, b.end)
            scounts = self.count([text[s:e] for s, e in sents])
            for (s, e), sn in zip(sents, scounts, strict=True):
                if sn <= self.size:
                    units.append(_Unit(s, e, sn, p))
                    continue
                words = _words(text, s, e)
                wcounts = self.count([text[a:z] for a, z in words])
                pieces = [
                    p
                    for (a, z), wn in zip(words, wcounts, strict=True)
                    for p in ([(a, z, wn)] if wn <= self.size else self._cut_word(text, a, z))
                ]
                cur_s, cur_n, last_e = words[0][0], 0, words[0][0]
                for a, z, wn in pieces:
                    if cur_n and cur_n + wn > self.size:
                        units.append(_Unit(cur_s, last_e, cur_n, p))
                        cur_s, cur_n = a, 0
                    cur_n += wn
                    last_e = z
                units.append(_Unit(cur_s, last_e, cur_n, p))
        return units, ctx_tokens

    def _cut_word(self, text: str, start: int, end: int) -> list[tuple[int, int, int]]:
        """Cut one whitespace-free run (a hash, a URL) longer than the budget by characters."""
        out: list[tuple[int, int, int]] = []
        pos = start
        while pos < end:
            lo, hi = pos + 1, end  # longest prefix text[pos:cut] that fits the budget
            while lo < hi:
                mid = (lo + hi + 1) // 2
                if self.count([text[pos:mid]])[0] <= self.size:
                    lo = mid
                else:
                    hi = mid - 1
            out.append((pos, lo, self.count([text[pos:lo]])[0]))
            pos = lo
        return out

    def _pack(self, units: list[_Unit]) -> list[tuple[int, int, int]]:
        """(start, end, tokens) of each chunk."""
        spans: list[tuple[int, int, int]] = []
        cur: list[_Unit] = []
        total = 0
        for u in units:
            if cur and total + u.tokens > self.size:
                spans.append((cur[0].start, cur[-1].end, total))
                # Overlap only inside a paragraph that was cut: a paragraph break is
                # already a clean boundary, repeating text across it only adds noise.
                keep: list[_Unit] = []
                kept = 0
                for prev in reversed(cur):
                    if prev.para != u.para or kept + prev.tokens > self.overlap:
                        break
                    keep.insert(0, prev)
                    kept += prev.tokens
                if kept + u.tokens > self.size:
                    keep, kept = [], 0
                cur, total = keep, kept
            cur.append(u)
            total += u.tokens
        if cur:
            spans.append((cur[0].start, cur[-1].end, total))
        return spans

    def split(self, doc: Document) -> list[Chunk]:
        sections: list[tuple[tuple[str, ...], list[Block]]] = []
        for b in doc.blocks:
            if b.is_heading or not sections or sections[-1][0] != b.heading:
                sections.append((b.heading, []))
            if not b.is_heading:
                sections[-1][1].append(b)
        chunks: list[Chunk] = []
        for heading, blocks in sections:
            if not blocks:
                continue
            ctx = " › ".join(h for h in (doc.title, *heading) if h)
            if heading and heading[0] == doc.title:
                ctx = " › ".join(h for h in heading if h)
            units, ctx_tokens = self._units(doc, blocks, ctx)
            for s, e, n in self._pack(units):
                page = next((b.page for b in blocks if b.start <= s < b.end + 1), -1)
                chunks.append(
                    Chunk(
                        doc.source,
                        doc.doc_id,
                        len(chunks),
                        ctx,
                        doc.text[s:e],
                        s,
                        e,
                        page,
                        tokens=ctx_tokens + n,
                    )
                )
        return chunks
