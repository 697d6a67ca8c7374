"""File loaders: bytes on disk to ``Document``s with structure (headings, paragraphs, pages).

Every failure is a ``LoadError`` naming the file and the reason, so a batch can report it
in one line and go on with the next file.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

SUPPORTED_SUFFIXES = {".txt", ".md", ".markdown", ".html", ".htm", ".pdf", ".jsonl"}
MAX_FILE_BYTES = 512 * 1024 * 1024


class LoadError(Exception):
    """A file that cannot be ingested; ``str()`` is the one line shown to the user."""

    def __init__(self, path: str | Path, reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{path}: {reason}")


@dataclass(frozen=True)
class Block:
    """A structural unit: a paragraph (or heading) with its place in ``Document.text``."""

    start: int
    end: int
    heading: tuple[str, ...] = ()
    page: int = -1
    is_heading: bool = False


@dataclass
class Document:
    source: str
    doc_id: str
    title: str
    text: str
    blocks: list[Block] = field(default_factory=list)


_MD_HEADING = re.compile(r"^(#{1,6})\s+(.+?)\s*#*\s*$")
_FENCE = re.compile(r"^(```|~~~)")


def _paragraph_blocks(text: str, base: int = 0, page: int = -1) -> list[Block]:
    blocks = []
    for m in re.finditer(r"\S(?:.*?\S)?(?=\n[ \t]*\n|\s*\Z)", text, flags=re.S):
        blocks.append(Block(base + m.start(), base + m.end(), page=page))
    return blocks


def _markdown_blocks(text: str) -> list[Block]:
    """Paragraphs with their heading path; fenced code stays whole and hides its '#' lines."""
    blocks: list[Block] = []
    path: list[tuple[int, str]] = []
    para_start: int | None = None
    in_fence = False
    pos = 0

    def close(end: int) -> None:
        nonlocal para_start
        if para_start is not None:
            seg = text[para_start:end]
            stripped_end = para_start + len(seg.rstrip())
            if stripped_end > para_start:
                blocks.append(Block(para_start, stripped_end, tuple(h for _, h in path)))
            para_start = None

    for line in text.splitlines(keepends=True):
        body = line.rstrip("\n")
        if _FENCE.match(body.strip()):
            if not in_fence:
                close(pos)
                para_start = pos
            in_fence = not in_fence
        elif not in_fence and (m := _MD_HEADING.match(body)):
            close(pos)
            level, title = len(m.group(1)), m.group(2).strip()
            path = [(lv, h) for lv, h in path if lv < level] + [(level, title)]
            blocks.append(Block(pos, pos + len(body), tuple(h for _, h in path), is_heading=True))
        elif not in_fence and not body.strip():
            close(pos)
        elif para_start is None:
            para_start = pos + (len(body) - len(body.lstrip()))
        pos += len(line)
    close(pos)
    return blocks


def _decode(path: Path, data: bytes) -> str:
    if not data.strip():
        raise LoadError(path, "empty file")
    if b"\x00" in data[:8192]:
        raise LoadError(path, "binary file (NUL bytes), not text")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise LoadError(
            path, f"not valid UTF-8 (byte 0x{data[e.start]:02x} at offset {e.start})"
        ) from e
    return text.replace("\r\n", "\n").replace("\r", "\n")


def _load_html(path: Path, data: bytes) -> Document:
    from bs4 import BeautifulSoup

    html = _decode(path, data)
    soup = BeautifulSoup(html, "html.parser")
    for tag in soup(["script", "style", "noscript", "template", "svg"]):
        tag.decompose()
    title = soup.title.get_text(" ", strip=True) if soup.title else path.stem
    parts: list[str] = []
    blocks: list[Block] = []
    heading: list[tuple[int, str]] = []
    pos = 0
    wanted = [
        "h1",
        "h2",
        "h3",
        "h4",
        "h5",
        "h6",
        "p",
        "li",
        "pre",
        "blockquote",
        "td",
        "th",
        "dd",
        "dt",
    ]
    for el in (soup.body or soup).find_all(wanted):
        if el.find_parent(wanted[6:]) is not None:
            continue  # already part of an enclosing block
        txt = el.get_text("\n" if el.name == "pre" else " ", strip=el.name != "pre").strip()
        if not txt:
            continue
        is_h = el.name[0] == "h" and el.name[1:].isdigit()
        if is_h:
            level = int(el.name[1])
            heading = [(lv, h) for lv, h in heading if lv < level] + [(level, txt)]
        start = pos
        parts.append(txt)
        pos += len(txt)
        blocks.append(Block(start, pos, tuple(h for _, h in heading), is_heading=is_h))
        parts.append("\n\n")
        pos += 2
    if not blocks:  # no block markup: fall back to the visible text
        text = soup.get_text("\n").strip()
        if not text:
            raise LoadError(path, "HTML has no visible text")
        return Document(str(path), path.name, title, text, _paragraph_blocks(text))
    return Document(str(path), path.name, title, "".join(parts).rstrip(), blocks)


def _load_pdf(path: Path, data: bytes) -> Document:
    import io

    from pypdf import PdfReader
    from pypdf.errors import PdfReadError

    if not data.startswith(b"%PDF"):
        raise LoadError(path, "corrupt PDF (no %PDF header)")
    try:
        reader = PdfReader(io.BytesIO(data))
        if reader.is_encrypted:
            raise LoadError(path, "encrypted PDF")
        pages = [p.extract_text() or "" for p in reader.pages]
    except LoadError:
        raise
    except (PdfReadError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise LoadError(path, f"corrupt PDF ({type(e).__name__}: {e})") from e
    text_parts: list[str] = []
    blocks: list[Block] = []
    pos = 0
    for i, page in enumerate(pages):
        page = page.replace("\r\n", "\n").strip()
        if not page:
            continue
        blocks.extend(_paragraph_blocks(page, base=pos, page=i + 1))
        text_parts.append(page + "\n\n")
        pos += len(page) + 2
    if not blocks:
        raise LoadError(path, "PDF has no extractable text (scanned images need OCR)")
    return Document(str(path), path.name, path.stem, "".join(text_parts).rstrip(), blocks)


def _load_jsonl(path: Path, data: bytes, errors: list[LoadError]) -> Iterator[Document]:
    """One document per line: ``text`` (required), ``title``, ``_id``/``id`` (BEIR layout)."""
    text = _decode(path, data)
    seen = 0
    for lineno, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            errors.append(LoadError(f"{path}:{lineno}", f"invalid JSON ({e.msg})"))
            continue
        if not isinstance(rec, dict) or not isinstance(rec.get("text"), str):
            errors.append(LoadError(f"{path}:{lineno}", "record has no string field 'text'"))
            continue
        body = rec["text"].strip()
        title = str(rec.get("title") or "").strip()
        if not body and not title:
            errors.append(LoadError(f"{path}:{lineno}", "empty record"))
            continue
        body = body or title
        doc_id = str(rec.get("_id", rec.get("id", lineno)))
        seen += 1
        yield Document(str(path), doc_id, title, body, _paragraph_blocks(body))
    if not seen and not errors:
        raise LoadError(path, "no records")


def load_file(path: Path, errors: list[LoadError] | None = None) -> list[Document]:
    """Load one file; per-record problems (jsonl) go to ``errors``, fatal ones raise."""
    errs = errors if errors is not None else []
    suffix = path.suffix.lower()
    if suffix not in SUPPORTED_SUFFIXES:
        raise LoadError(path, f"unsupported file type {suffix or '(none)'!r}")
    try:
        size = path.stat().st_size
        if size > MAX_FILE_BYTES:
            raise LoadError(path, f"file too large ({size} bytes > {MAX_FILE_BYTES})")
        data = path.read_bytes()
    except PermissionError as e:
        raise LoadError(path, "unreadable (permission denied)") from e
    except IsADirectoryError as e:
        raise LoadError(path, "is a directory") from e
    except FileNotFoundError as e:
        raise LoadError(path, "no such file") from e
    except OSError as e:
        raise LoadError(path, f"unreadable ({e.strerror or e})") from e
    if suffix in {".html", ".htm"}:
        return [_load_html(path, data)]
    if suffix == ".pdf":
        return [_load_pdf(path, data)]
    if suffix == ".jsonl":
        return list(_load_jsonl(path, data, errs))
    text = _decode(path, data)
    if suffix in {".md", ".markdown"}:
        blocks = _markdown_blocks(text)
        h1 = next((b.heading[0] for b in blocks if b.is_heading and len(b.heading) == 1), None)
        return [Document(str(path), path.name, h1 or path.stem, text, blocks)]
    return [Document(str(path), path.name, path.stem, text, _paragraph_blocks(text))]


def discover(paths: list[Path]) -> tuple[list[Path], list[LoadError]]:
    """Expand folders (recursively, hidden entries skipped) into supported files."""
    files: list[Path] = []
    errors: list[LoadError] = []
    for p in paths:
        if p.is_dir():
            for f in sorted(p.rglob("*")):
                rel = f.relative_to(p).parts
                if any(part.startswith(".") for part in rel):
                    continue
                if f.is_file() and f.suffix.lower() in SUPPORTED_SUFFIXES:
                    files.append(f.resolve())
        elif p.is_file():
            files.append(p.resolve())
        else:
            errors.append(LoadError(p, "no such file or directory"))
    return list(dict.fromkeys(files)), errors
