"""Ingestion: incremental, replacing, removing, reporting, and surviving a SIGKILL."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from aiprime.embed import CachedEmbedder, EmbeddingCache
from aiprime.rag.ingest import IngestReport, Progress

WORKER = Path(__file__).resolve().with_name("rag_ingest_worker.py")
SMALL = {"chunk": {"size_tokens": 50, "overlap_tokens": 5}}  # the worker's chunking too


def write(p: Path, text: str | bytes) -> Path:
    p.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(text, bytes):
        p.write_bytes(text)
    else:
        p.write_text(text)
    return p


def texts_of(kb, source: Path) -> list[str]:
    t = kb.store.table
    rows = t.to_arrow().select(["source", "text"]).to_pylist()
    return [r["text"] for r in rows if r["source"] == str(source.resolve())]


def pairs(kb) -> list[tuple[str, str, int]]:
    rows = kb.store.table.to_arrow().select(["source", "doc_id", "chunk_index"]).to_pylist()
    return [(r["source"], r["doc_id"], r["chunk_index"]) for r in rows]


@pytest.fixture
def docs(tmp_path: Path) -> Path:
    d = tmp_path / "docs"
    write(d / "a.txt", "Alpha file talks about aardvarks.\n\nSecond alpha paragraph.")
    write(d / "b.md", "# Bees\n\nBees make honey.\n\n## Hives\n\nHives hold bees.")
    write(d / "sub" / "c.html", "<h1>Cats</h1><p>Cats purr loudly.</p>")
    return d


def test_ingest_then_unchanged(make_kb, docs: Path) -> None:
    kb = make_kb()
    r1 = kb.ingest([docs])
    assert (r1.files_seen, r1.files_ingested, r1.files_unchanged) == (3, 3, 0)
    assert r1.errors == [] and r1.chunks_written == kb.store.count() == 4  # b.md: 2 sections
    assert set(kb.sources()) == {str(p.resolve()) for p in docs.rglob("*.*")}
    encoded = kb.embedder.texts_encoded
    assert encoded == 4

    r2 = kb.ingest([docs])
    assert (r2.files_ingested, r2.files_unchanged, r2.chunks_written) == (0, 3, 0)
    assert r2.chunks_embedded == 0
    assert kb.embedder.texts_encoded == encoded  # nothing was embedded again
    assert kb.store.count() == 4
    d = r2.to_dict()
    assert d["files_unchanged"] == 3 and d["files_failed"] == 0 and d["errors"] == []


def test_changed_file_replaces_its_chunks(make_kb, docs: Path) -> None:
    kb = make_kb()
    kb.ingest([docs])
    assert [h.source for h in kb.search("aardvarks", mode="bm25")] == [str(docs / "a.txt")]
    write(docs / "a.txt", "Alpha file now covers zebras only.")
    r = kb.ingest([docs])
    assert (r.files_ingested, r.files_unchanged) == (1, 2)
    assert texts_of(kb, docs / "a.txt") == ["Alpha file now covers zebras only."]
    assert kb.search("aardvarks", mode="bm25") == []
    assert [h.source for h in kb.search("zebras", mode="bm25")] == [str(docs / "a.txt")]
    assert kb.store.count() == 4


def test_changed_file_reembeds_only_new_chunks(make_kb, fake_cls, docs: Path, home: Path) -> None:
    home.mkdir(parents=True, exist_ok=True)
    inner = fake_cls()
    kb = make_kb(embedder=CachedEmbedder(inner, EmbeddingCache(home / "emb.sqlite")))
    kb.ingest([docs])
    write(docs / "b.md", "# Bees\n\nBees make honey.\n\n## Hives\n\nHives are wooden boxes.")
    before = inner.texts_encoded
    r = kb.ingest([docs / "b.md"])
    assert r.chunks_written == 2 and r.chunks_embedded == 1
    assert inner.texts_encoded == before + 1


def test_remove_by_path_folder_and_missing(make_kb, docs: Path, tmp_path: Path) -> None:
    kb = make_kb()
    sibling = write(tmp_path / "docs2" / "d.txt", "Sibling folder with a shared prefix.")
    kb.ingest([docs, sibling])
    assert len(kb.sources()) == 4
    assert kb.remove([docs / "a.txt"]) == [str((docs / "a.txt").resolve())]
    assert kb.remove([docs / "a.txt"]) == []
    assert kb.remove([docs]) == sorted(
        [str((docs / "b.md").resolve()), str((docs / "sub" / "c.html").resolve())]
    )
    assert set(kb.sources()) == {str(sibling.resolve())}  # '/docs' is not a prefix of '/docs2'
    kb.ingest([docs])
    (docs / "b.md").unlink()
    assert kb.remove([], missing=True) == [str((docs / "b.md").resolve())]
    assert kb.search("honey", mode="bm25") == []
    assert len(kb.sources()) == 3


def test_bad_files_reported_and_the_rest_ingested(make_kb, docs: Path) -> None:
    write(docs / "empty.txt", "")
    write(docs / "binary.txt", b"\x00\x01\x02")
    write(docs / "latin.md", b"caf\xe9")
    write(docs / "broken.pdf", b"%PDF-1.4 nonsense")
    write(docs / "recs.jsonl", '{"_id": "r1", "text": "jsonl record one"}\nnot json\n')
    write(docs / "ignored.docx", "x")  # unsupported suffixes are not even discovered
    kb = make_kb()
    r = kb.ingest([docs, docs / "nowhere.txt"])
    lines = [str(e) for e in r.errors]
    assert len(lines) == 6, lines
    for name in (
        "empty.txt",
        "binary.txt",
        "latin.md",
        "broken.pdf",
        "recs.jsonl:2",
        "nowhere.txt",
    ):
        assert sum(name in line for line in lines) == 1, (name, lines)
    assert all("\n" not in line for line in lines)
    assert r.files_ingested == 4  # a, b, c and the jsonl's good record
    assert [h.doc_id for h in kb.search("jsonl record", mode="bm25")] == ["r1"]
    assert r.to_dict()["files_failed"] == 6


def test_file_that_becomes_corrupt_keeps_old_chunks(make_kb, docs: Path) -> None:
    kb = make_kb()
    kb.ingest([docs])
    old = texts_of(kb, docs / "a.txt")
    write(docs / "a.txt", b"\x00\xff garbage now")
    r = kb.ingest([docs])
    assert [e.path for e in r.errors] == [str((docs / "a.txt").resolve())]
    assert "binary" in r.errors[0].reason
    assert texts_of(kb, docs / "a.txt") == old
    assert kb.search("aardvarks", mode="bm25")


def test_file_emptied_reports_and_keeps_old(make_kb, docs: Path) -> None:
    kb = make_kb()
    kb.ingest([docs])
    write(docs / "a.txt", "   ")
    r = kb.ingest([docs / "a.txt"])
    assert r.files_ingested == 0 and "empty" in str(r.errors[0])
    assert texts_of(kb, docs / "a.txt") == [
        "Alpha file talks about aardvarks.\n\nSecond alpha paragraph."
    ]


def test_jsonl_documents_keep_their_ids(make_kb, tmp_path: Path) -> None:
    recs = [{"_id": f"doc{i}", "title": f"T{i}", "text": f"body {i} " * 40} for i in range(3)]
    src = write(tmp_path / "c.jsonl", "\n".join(json.dumps(r) for r in recs))
    kb = make_kb(**SMALL)
    kb.ingest([src])
    p = pairs(kb)
    assert len(p) == len(set(p)) and {d for _, d, _ in p} == {"doc0", "doc1", "doc2"}
    assert max(i for *_, i in p) >= 1  # 80 words per doc: more than one chunk each


def test_progress_hooks(make_kb, docs: Path) -> None:
    class Rec(Progress):
        def __init__(self) -> None:
            self.total = None
            self.done: list[str] = []
            self.chunks = [0, 0]

        def files_total(self, n: int) -> None:
            self.total = n

        def file_done(self, path: str) -> None:
            self.done.append(path)

        def chunks_total(self, n: int) -> None:
            self.chunks[0] += n

        def chunks_done(self, n: int) -> None:
            self.chunks[1] += n

    write(docs / "bad.txt", "")
    rec = Rec()
    make_kb().ingest([docs], rec)
    assert rec.total == 4 and len(rec.done) == 4 and len(set(rec.done)) == 4
    assert rec.chunks == [4, 4]


def test_small_batches_flush_incrementally(make_kb, tmp_path: Path, fake_cls) -> None:
    from aiprime.rag.chunking import Chunker
    from aiprime.rag.ingest import Ingestor

    for i in range(7):
        write(tmp_path / "many" / f"f{i}.txt", f"file {i} text")
    kb = make_kb()
    emb = fake_cls()
    ing = Ingestor(kb.store, emb, Chunker(emb.count_tokens, 50, 5), batch_chunks=2, embed_batch=1)
    r = ing.ingest([tmp_path / "many"])
    assert r.files_ingested == 7 and emb.calls == 7 and kb.store.count() == 7
    assert isinstance(r, IngestReport) and r.seconds >= 0


# -- crashes ---------------------------------------------------------------------------


def _corpus(root: Path, n: int, version: str) -> list[Path]:
    return [
        write(root / f"f{i:03d}.txt", f"File {i} {version} mentions term{i}x and {version}word.")
        for i in range(n)
    ]


def _check_complete(kb, files: list[Path], version: str) -> None:
    p = [(s, i) for s, _, i in pairs(kb)]
    assert len(p) == len(set(p)), [k for k, v in Counter(p).items() if v > 1][:5]
    src = kb.sources()
    assert set(src) == {str(f.resolve()) for f in files}
    assert all(info.chunks == 1 for info in src.values())
    texts = {r["text"] for r in kb.store.table.to_arrow().select(["text"]).to_pylist()}
    assert all(version in t for t in texts)
    assert len(kb.search(f"{version}word", k=1000, mode="bm25")) == len(files)


def test_sigkill_mid_ingest_then_resume(make_kb, tmp_path: Path) -> None:
    n = 30
    root = tmp_path / "corpus"
    kb = make_kb(**SMALL)
    kb.ingest(_corpus(root, n // 2, "vone"))  # half the files already stored, older version
    files = _corpus(root, n, "vtwo")
    progress = tmp_path / "progress.log"
    home = kb.settings.home
    proc = subprocess.Popen(
        [
            sys.executable,
            str(WORKER),
            str(home),
            str(root),
            "--delay",
            "0.1",
            "--batch-chunks",
            "2",
            "--progress",
            str(progress),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        while proc.poll() is None:
            if progress.exists() and len(progress.read_text().split()) >= 3:
                break
            time.sleep(0.02)
        assert proc.poll() is None, "the worker finished before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        _, stderr = proc.communicate()
    assert proc.returncode == -signal.SIGKILL, stderr.decode()[-2000:]

    kb2 = make_kb(**SMALL)
    mid = kb2.sources()
    assert 0 < sum("vtwo" in t for t in _all_texts(kb2)) < n  # really stopped mid-way
    assert len(mid) <= n
    r = kb2.ingest([root])
    assert r.errors == []
    assert r.files_ingested + r.files_unchanged == n and r.files_ingested > 0
    _check_complete(kb2, files, "vtwo")
    again = kb2.ingest([root])
    assert (again.files_ingested, again.files_unchanged) == (0, n)


def _all_texts(kb) -> list[str]:
    return [r["text"] for r in kb.store.table.to_arrow().select(["text"]).to_pylist()]


def test_sigkill_between_add_and_delete_then_resume(make_kb, tmp_path: Path) -> None:
    n = 8
    root = tmp_path / "corpus"
    kb = make_kb(**SMALL)
    kb.ingest(_corpus(root, n, "vone"))
    files = _corpus(root, n, "vtwo")
    proc = subprocess.run(
        [
            sys.executable,
            str(WORKER),
            str(kb.settings.home),
            str(root),
            "--batch-chunks",
            "3",
            "--die-after-add",
            "2",
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    kb2 = make_kb(**SMALL)
    assert kb2.store.count() == n + 3  # the second batch's new rows, old ones not deleted
    r = kb2.ingest([root])
    assert r.repaired == 3
    assert r.files_unchanged == 6  # batches 1 and 2 count as done, newest version kept
    assert r.files_ingested == 2
    _check_complete(kb2, files, "vtwo")


def test_changed_chunk_settings_rechunk_unchanged_files(make_kb, tmp_path: Path) -> None:
    text = " ".join(f"Sentence {i} mentions zebras and their stripes." for i in range(40))
    f = write(tmp_path / "z" / "zebras.txt", text)
    small = make_kb(chunk={"size_tokens": 40, "overlap_tokens": 4})
    small.ingest([f.parent])
    n_small = small.store.count()
    big = make_kb(chunk={"size_tokens": 400, "overlap_tokens": 4})
    report = big.ingest([f.parent])
    assert report.files_ingested == 1 and report.files_unchanged == 0
    assert big.store.count() < n_small
    assert len(set(pairs(big))) == big.store.count()  # the old chunking is gone
    again = big.ingest([f.parent])
    assert again.files_unchanged == 1
