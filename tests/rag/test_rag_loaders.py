"""Loaders: structure from each format, and one clear LoadError per broken file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from aiprime.rag.loaders import LoadError, discover, load_file


def make_pdf(pages: list[str]) -> bytes:
    """A minimal valid PDF, written byte by byte: one Helvetica text line per page."""
    objs: list[bytes] = []
    n = len(pages)
    kids = " ".join(f"{3 + 2 * i} 0 R" for i in range(n))
    font_id = 3 + 2 * n
    objs.append(b"<< /Type /Catalog /Pages 2 0 R >>")
    objs.append(f"<< /Type /Pages /Kids [{kids}] /Count {n} >>".encode())
    for i, text in enumerate(pages):
        content = f"BT /F1 12 Tf 72 720 Td ({text}) Tj ET".encode()
        objs.append(
            f"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] "
            f"/Resources << /Font << /F1 {font_id} 0 R >> >> /Contents {4 + 2 * i} 0 R >>".encode()
        )
        objs.append(b"<< /Length %d >>\nstream\n" % len(content) + content + b"\nendstream")
    objs.append(b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>")
    out = bytearray(b"%PDF-1.4\n")
    offsets = []
    for i, body in enumerate(objs, start=1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % i + body + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objs) + 1)
    for off in offsets:
        out += b"%010d 00000 n \n" % off
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objs) + 1, xref)
    return bytes(out)


def _write(tmp_path: Path, name: str, content: str | bytes) -> Path:
    p = tmp_path / name
    if isinstance(content, bytes):
        p.write_bytes(content)
    else:
        p.write_text(content, encoding="utf-8")
    return p


# -- text and markdown -------------------------------------------------------------------


def test_txt_paragraphs(tmp_path: Path) -> None:
    p = _write(tmp_path, "notes.txt", "First paragraph\nstill first.\n\n\nSecond one.\n")
    [doc] = load_file(p)
    assert doc.title == "notes" and doc.doc_id == "notes.txt" and doc.source == str(p)
    spans = [doc.text[b.start : b.end] for b in doc.blocks]
    assert spans == ["First paragraph\nstill first.", "Second one."]


def test_crlf_and_bom_normalised(tmp_path: Path) -> None:
    p = _write(tmp_path, "w.txt", b"\xef\xbb\xbfline one\r\n\r\nline two\r\n")
    [doc] = load_file(p)
    assert "\r" not in doc.text and not doc.text.startswith("\ufeff")
    assert [doc.text[b.start : b.end] for b in doc.blocks] == ["line one", "line two"]


def test_markdown_headings_and_paths(tmp_path: Path) -> None:
    md = (
        "# Guide\n\nIntro text.\n\n## Install\n\nRun pip.\n\n### Linux\n\nUse apt.\n\n"
        "## Usage\n\nCall it.\n"
    )
    [doc] = load_file(_write(tmp_path, "guide.md", md))
    assert doc.title == "Guide"
    paras = {doc.text[b.start : b.end]: b.heading for b in doc.blocks if not b.is_heading}
    assert paras == {
        "Intro text.": ("Guide",),
        "Run pip.": ("Guide", "Install"),
        "Use apt.": ("Guide", "Install", "Linux"),
        "Call it.": ("Guide", "Usage"),  # a level-2 heading pops the level-3 one
    }
    heads = [doc.text[b.start : b.end] for b in doc.blocks if b.is_heading]
    assert heads == ["# Guide", "## Install", "### Linux", "## Usage"]


def test_markdown_fenced_code_hides_hash_lines(tmp_path: Path) -> None:
    md = (
        "# Script\n\nBefore.\n\n```bash\n# not a heading\necho hi\n\n# also not\n```\n\n"
        "After the code.\n"
    )
    [doc] = load_file(_write(tmp_path, "s.md", md))
    heads = [doc.text[b.start : b.end] for b in doc.blocks if b.is_heading]
    assert heads == ["# Script"]
    code = [b for b in doc.blocks if "echo hi" in doc.text[b.start : b.end]]
    assert len(code) == 1  # the fence stays one block, blank line included
    assert doc.text[code[0].start : code[0].end].endswith("```")
    assert "# also not" in doc.text[code[0].start : code[0].end]
    after = next(b for b in doc.blocks if doc.text[b.start : b.end] == "After the code.")
    assert after.heading == ("Script",)


def test_markdown_title(tmp_path: Path) -> None:
    [doc] = load_file(_write(tmp_path, "readme.md", "Plain text, no heading.\n"))
    assert doc.title == "readme"
    [doc] = load_file(_write(tmp_path, "top.md", "## Top level here\n\nText.\n\n# Later H1\n"))
    assert doc.title == "Top level here"  # the first top-level heading


# -- html --------------------------------------------------------------------------------

HTML = """<!doctype html><html><head><title>Page Title</title>
<style>body { color: red; }</style><script>var secret = "scriptword";</script></head>
<body><h1>Main</h1><p>Opening paragraph.</p>
<h2>List section</h2><ul><li><p>Nested item text</p></li><li>Plain item</li></ul>
<noscript>enable js please</noscript>
<h2>Code</h2><pre>line1
line2</pre></body></html>"""


def test_html_structure(tmp_path: Path) -> None:
    [doc] = load_file(_write(tmp_path, "page.html", HTML))
    assert doc.title == "Page Title"
    assert "scriptword" not in doc.text and "color: red" not in doc.text
    assert "enable js" not in doc.text
    assert doc.text.count("Nested item text") == 1  # <p> inside <li> not duplicated
    by_text = {doc.text[b.start : b.end]: b for b in doc.blocks}
    assert by_text["Main"].is_heading and by_text["Main"].heading == ("Main",)
    assert by_text["Opening paragraph."].heading == ("Main",)
    assert by_text["Nested item text"].heading == ("Main", "List section")
    assert by_text["Plain item"].heading == ("Main", "List section")
    assert by_text["line1\nline2"].heading == ("Main", "Code")  # <pre> keeps its lines


def test_html_without_block_markup_falls_back_to_text(tmp_path: Path) -> None:
    [doc] = load_file(_write(tmp_path, "bare.htm", "<div>just some <b>div</b> text</div>"))
    assert "just some" in doc.text and "div" in doc.text
    assert doc.blocks


def test_html_without_visible_text(tmp_path: Path) -> None:
    with pytest.raises(LoadError, match="no visible text"):
        load_file(_write(tmp_path, "empty.html", "<html><script>x=1</script></html>"))


# -- pdf ---------------------------------------------------------------------------------


def test_pdf_text_and_pages(tmp_path: Path) -> None:
    p = _write(tmp_path, "paper.pdf", make_pdf(["Hello PDF world", "Second page words"]))
    [doc] = load_file(p)
    assert doc.title == "paper"
    assert "Hello PDF world" in doc.text and "Second page words" in doc.text
    pages = {doc.text[b.start : b.end]: b.page for b in doc.blocks}
    assert pages["Hello PDF world"] == 1
    assert pages["Second page words"] == 2


def test_single_page_pdf(tmp_path: Path) -> None:
    [doc] = load_file(_write(tmp_path, "one.pdf", make_pdf(["Only page"])))
    assert [(doc.text[b.start : b.end], b.page) for b in doc.blocks] == [("Only page", 1)]


def test_pdf_without_text(tmp_path: Path) -> None:
    with pytest.raises(LoadError, match="no extractable text"):
        load_file(_write(tmp_path, "blank.pdf", make_pdf([""])))


@pytest.mark.parametrize(
    "data",
    [
        b"not a pdf at all",
        b"%PDF-1.4\n1 0 obj\n<< /Type /Catalog /Pages 2 0 R >>\ngarbage garbage",
        make_pdf(["truncated document"])[:60],
    ],
)
def test_corrupt_pdf(tmp_path: Path, data: bytes) -> None:
    p = _write(tmp_path, "bad.pdf", data)
    with pytest.raises(LoadError) as ei:
        load_file(p)
    assert ei.value.path == str(p)
    assert "PDF" in ei.value.reason


# -- jsonl -------------------------------------------------------------------------------


def test_jsonl_beir_records(tmp_path: Path) -> None:
    lines = [
        {"_id": "d1", "title": "Alpha", "text": "alpha body"},
        {"id": 7, "text": "second body"},
        {"text": "third body"},
        {"_id": "d4", "title": "Title only", "text": ""},
    ]
    p = _write(tmp_path, "c.jsonl", "\n".join(json.dumps(r) for r in lines) + "\n")
    docs = load_file(p)
    assert [(d.doc_id, d.title, d.text) for d in docs] == [
        ("d1", "Alpha", "alpha body"),
        ("7", "", "second body"),
        ("3", "", "third body"),  # no id: the line number
        ("d4", "Title only", "Title only"),
    ]
    assert all(d.source == str(p) for d in docs)


def test_jsonl_bad_lines_reported_with_line_numbers(tmp_path: Path) -> None:
    content = (
        '{"_id": "a", "text": "good one"}\n'
        "{broken json\n"
        '{"_id": "b", "title": "x"}\n'
        "\n"
        '{"_id": "c", "text": "good two"}\n'
        '["not", "an", "object"]\n'
        '{"_id": "e", "text": "  ", "title": ""}\n'
    )
    p = _write(tmp_path, "mixed.jsonl", content)
    errors: list[LoadError] = []
    docs = load_file(p, errors)
    assert [d.doc_id for d in docs] == ["a", "c"]
    assert [e.path for e in errors] == [f"{p}:2", f"{p}:3", f"{p}:6", f"{p}:7"]
    assert "invalid JSON" in errors[0].reason
    assert "text" in errors[1].reason
    assert str(errors[0]).startswith(f"{p}:2: ")


def test_jsonl_with_only_bad_lines(tmp_path: Path) -> None:
    p = _write(tmp_path, "bad.jsonl", "nope\n[1]\n")
    errors: list[LoadError] = []
    assert load_file(p, errors) == []
    assert [e.path for e in errors] == [f"{p}:1", f"{p}:2"]


# -- errors ------------------------------------------------------------------------------


def test_empty_file(tmp_path: Path) -> None:
    for name in ("e.txt", "e.md", "e.html", "e.jsonl"):
        with pytest.raises(LoadError, match="empty file"):
            load_file(_write(tmp_path, name, "  \n\n "))


def test_binary_file(tmp_path: Path) -> None:
    p = _write(tmp_path, "b.txt", b"text\x00\x01\x02more")
    with pytest.raises(LoadError, match="binary") as ei:
        load_file(p)
    assert ei.value.path == str(p)


def test_non_utf8_names_byte_offset(tmp_path: Path) -> None:
    p = _write(tmp_path, "latin.md", b"caf" + b"\xe9 au lait")
    with pytest.raises(LoadError) as ei:
        load_file(p)
    assert "UTF-8" in ei.value.reason
    assert "0xe9" in ei.value.reason and "offset 3" in ei.value.reason
    assert str(ei.value).startswith(str(p))


def test_unsupported_suffix(tmp_path: Path) -> None:
    with pytest.raises(LoadError, match=r"unsupported file type '\.docx'"):
        load_file(_write(tmp_path, "x.docx", "hello"))
    with pytest.raises(LoadError, match=r"unsupported file type '\(none\)'"):
        load_file(_write(tmp_path, "Makefile", "hello"))


def test_missing_path(tmp_path: Path) -> None:
    with pytest.raises(LoadError, match="no such file"):
        load_file(tmp_path / "gone.txt")
    files, errors = discover([tmp_path / "gone.txt", tmp_path / "nodir"])
    assert files == []
    assert [e.path for e in errors] == [str(tmp_path / "gone.txt"), str(tmp_path / "nodir")]


def test_directory_with_supported_suffix(tmp_path: Path) -> None:
    d = tmp_path / "folder.txt"
    d.mkdir()
    with pytest.raises(LoadError, match="directory"):
        load_file(d)


def test_discover_skips_hidden_and_unsupported(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)
    (root / ".git").mkdir()
    (root / "a.txt").write_text("a")
    (root / "sub" / "b.md").write_text("b")
    (root / "sub" / "c.PDF").write_bytes(b"%PDF")
    (root / ".hidden.txt").write_text("h")
    (root / ".git" / "inside.txt").write_text("g")
    (root / "sub" / "image.png").write_bytes(b"\x89PNG")
    explicit = tmp_path / "single.txt"
    explicit.write_text("s")
    files, errors = discover([root, explicit, root / "a.txt"])
    assert errors == []
    assert files == [
        (root / "a.txt").resolve(),
        (root / "sub" / "b.md").resolve(),
        (root / "sub" / "c.PDF").resolve(),
        explicit.resolve(),
    ]  # sorted within a folder, explicit files kept, duplicates dropped
