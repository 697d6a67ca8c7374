"""A LangChain VectorStore as the backend: the same ingest/search contract as LanceDB."""

from __future__ import annotations

from pathlib import Path

import pytest
from langchain_core.vectorstores import InMemoryVectorStore

from aiprime.embed.langchain import AiprimeEmbeddings
from aiprime.store import StoreError
from aiprime.store.langchain import LangChainStore


@pytest.fixture
def lc_kb(make_kb, fake_embedder, tmp_path: Path):
    vs = InMemoryVectorStore(embedding=AiprimeEmbeddings(fake_embedder))
    store = LangChainStore(vs, fake_embedder, tmp_path / "manifest.json")
    kb = make_kb(embedder=fake_embedder)
    kb._store = store
    return kb, vs


def test_ingest_search_replace_remove(lc_kb, tmp_path: Path) -> None:
    kb, vs = lc_kb
    d = tmp_path / "docs"
    d.mkdir()
    (d / "a.txt").write_text("Walruses haul out on ice floes.")
    (d / "b.txt").write_text("Penguins huddle against the antarctic wind.")
    r = kb.ingest([d])
    assert r.files_ingested == 2 and kb.store.count() == 2 == len(vs.store)
    hits = kb.search("walruses ice floes", k=2, mode="dense")
    assert hits[0].source.endswith("a.txt") and hits[0].text == "Walruses haul out on ice floes."
    assert hits[0].score > hits[1].score
    assert kb.search("walruses", k=2, mode="bm25") == []  # no lexical index on this backend
    assert kb.search("walruses ice floes", k=1)[0].source.endswith("a.txt")  # hybrid = dense
    assert kb.ingest([d]).files_unchanged == 2
    (d / "a.txt").write_text("Walruses now live in a zoo.")
    kb.ingest([d])
    assert len(vs.store) == 2
    assert {doc["text"] for doc in (v["metadata"] for v in vs.store.values())} == {
        "Walruses now live in a zoo.",
        "Penguins huddle against the antarctic wind.",
    }
    assert kb.remove([str(d / "b.txt")]) == [str((d / "b.txt").resolve())]
    assert len(vs.store) == 1 and kb.store.count() == 1


def test_repair_finishes_an_interrupted_delete(lc_kb, tmp_path: Path, monkeypatch) -> None:
    kb, vs = lc_kb
    f = tmp_path / "a.txt"
    f.write_text("Version one of the walrus notes.")
    kb.ingest([f])
    f.write_text("Version two of the walrus notes.")

    def crash(**kwargs: object) -> None:
        raise KeyboardInterrupt("killed before the delete")

    monkeypatch.setattr(vs, "delete", crash)
    with pytest.raises(KeyboardInterrupt):
        kb.ingest([f])
    assert len(vs.store) == 2  # both versions present after the "crash"
    monkeypatch.undo()
    assert kb.store.repair() == 1
    assert [v["metadata"]["text"] for v in vs.store.values()] == [
        "Version two of the walrus notes."
    ]


def test_filters_and_model_mismatch_are_refused(lc_kb, fake_cls, tmp_path: Path) -> None:
    kb, _ = lc_kb
    f = tmp_path / "a.txt"
    f.write_text("Some text.")
    kb.ingest([f])
    with pytest.raises(StoreError, match="filters"):
        kb.store.dense_search(kb.embedder.encode(["x"])[0], 3, where="page = 1")
    other = fake_cls(model_id="another-model")
    vs = InMemoryVectorStore(embedding=AiprimeEmbeddings(other))
    with pytest.raises(StoreError, match="embedded with"):
        LangChainStore(vs, other, kb.store.manifest_path).sources()
