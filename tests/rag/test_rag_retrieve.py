"""Retrieval: BM25, dense (real MiniLM) and hybrid; fusion functions on hand-made input."""

from __future__ import annotations

from pathlib import Path

import pytest

from aiprime.config import RetrieveSettings
from aiprime.rag.fusion import best_per_doc, minmax, rrf, score_mix
from aiprime.store import Hit


def hit(id_: str, score: float, doc: str | None = None) -> Hit:
    return Hit(
        id=id_,
        source="s",
        doc_id=doc or id_,
        title="",
        text=id_,
        chunk_index=0,
        start=0,
        end=1,
        page=-1,
        score=score,
    )


# -- fusion, by hand ---------------------------------------------------------------------


def test_rrf_by_hand() -> None:
    dense = [hit("a", 0.9), hit("b", 0.8), hit("c", 0.7)]
    bm25 = [hit("c", 12.0), hit("d", 5.0)]
    out = rrf({"dense": dense, "bm25": bm25}, k=10)
    got = {h.id: h.score for h in out}
    assert got == pytest.approx({"a": 1 / 11, "b": 1 / 12, "c": 1 / 13 + 1 / 11, "d": 1 / 12})
    assert out[0].id == "c" and out[1].id == "a"
    c = out[0]
    assert c.scores == {"dense": 0.7, "dense_rank": 3.0, "bm25": 12.0, "bm25_rank": 1.0}
    a = next(h for h in out if h.id == "a")
    assert a.scores == {"dense": 0.9, "dense_rank": 1.0}
    assert dense[2].score == 0.7 and dense[2].scores == {}  # inputs are not modified


def test_minmax() -> None:
    assert minmax([]) == []
    assert minmax([2.0, 4.0, 3.0]) == [0.0, 1.0, 0.5]
    assert minmax([5.0, 5.0]) == [1.0, 1.0]


def test_score_mix_by_hand() -> None:
    dense = [hit("a", 0.9), hit("b", 0.7), hit("c", 0.5)]  # normalised: 1, .5, 0
    bm25 = [hit("c", 10.0), hit("d", 6.0), hit("a", 2.0)]  # normalised: 1, .5, 0
    out = score_mix({"dense": dense, "bm25": bm25}, {"dense": 0.75, "bm25": 0.25})
    got = {h.id: h.score for h in out}
    assert got == pytest.approx({"a": 0.75, "b": 0.375, "c": 0.25, "d": 0.125})
    assert [h.id for h in out] == ["a", "b", "c", "d"]
    assert out[0].scores["bm25_rank"] == 3.0 and out[0].scores["dense"] == 0.9
    only_bm25 = score_mix({"dense": dense, "bm25": bm25}, {"bm25": 1.0})
    assert [h.id for h in only_bm25][:2] == ["c", "d"]


def test_score_mix_with_an_empty_list() -> None:
    out = score_mix(
        {"dense": [hit("a", 0.3), hit("b", 0.1)], "bm25": []}, {"dense": 0.5, "bm25": 0.5}
    )
    assert [(h.id, h.score) for h in out] == [("a", 0.5), ("b", 0.0)]


def test_best_per_doc() -> None:
    hits = [hit("1", 0.2, "d1"), hit("2", 0.9, "d1"), hit("3", 0.5, "d2"), hit("4", -1.0, "d3")]
    assert best_per_doc(hits) == {"d1": 0.9, "d2": 0.5, "d3": -1.0}
    assert best_per_doc([]) == {}


# -- retrieval over a store ---------------------------------------------------------------

CORPUS = {
    "feline.txt": "The feline rested upon the rug.",
    "stocks.txt": "Equity markets fell sharply after the central bank raised interest rates.",
    "bread.txt": "Knead sourdough, let it prove overnight, then bake in a hot oven.",
    "rocket.txt": "The booster launched the satellite into low earth orbit.",
    "serial.txt": "Replacement part number XK-4471Q ships with the gearbox kit.",
    "garden.txt": "Water tomato plants early in the morning during summer heat waves.",
}


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    d = tmp_path / "corpus"
    d.mkdir()
    for name, text in CORPUS.items():
        (d / name).write_text(text)
    return d


def test_bm25_finds_a_rare_exact_term(make_kb, corpus: Path) -> None:
    kb = make_kb()
    kb.ingest([corpus])
    hits = kb.search("XK-4471Q", k=3, mode="bm25")
    assert hits[0].source.endswith("serial.txt")
    assert set(hits[0].scores) == {"bm25", "bm25_rank"} and hits[0].scores["bm25_rank"] == 1.0
    assert hits[0].score == hits[0].scores["bm25"] > 0
    assert kb.search("gearbox", k=3, mode="bm25")[0].source.endswith("serial.txt")
    assert kb.search("nonexistentterm", mode="bm25") == []
    with pytest.raises(ValueError, match="empty"):
        kb.search("   ")


def test_dense_finds_a_paraphrase_with_no_shared_words(make_kb, minilm_onnx, corpus: Path) -> None:
    query = "kitty lying on carpet"
    target = CORPUS["feline.txt"].lower()
    assert not set(query.split()) & set(target.replace(".", "").split())
    kb = make_kb(embedder=minilm_onnx)
    kb.ingest([corpus])
    dense = kb.search(query, k=3, mode="dense")
    assert dense[0].source.endswith("feline.txt")
    assert set(dense[0].scores) == {"dense", "dense_rank"}
    assert dense[0].score > dense[1].score
    assert not any(h.source.endswith("feline.txt") for h in kb.search(query, mode="bm25"))

    # hybrid: the union of both lists, each hit carrying every retriever's score and rank
    hq = "kitty XK-4471Q"
    for fusion in ("rrf", "mix"):
        kb.retriever.settings = RetrieveSettings(fusion=fusion, candidates=10)
        d = {h.id for h in kb.search(hq, k=10, mode="dense")}
        b = {h.id for h in kb.search(hq, k=10, mode="bm25")}
        hy = kb.search(hq, k=10, mode="hybrid")
        assert {h.id for h in hy} == d | b
        serial = next(h for h in hy if h.source.endswith("serial.txt"))
        assert {"dense", "dense_rank", "bm25", "bm25_rank"} <= set(serial.scores)
        assert serial.scores["bm25_rank"] == 1.0
        assert [h.score for h in hy] == sorted((h.score for h in hy), reverse=True)
        top2 = {h.source.rsplit("/", 1)[1] for h in hy[:2]}
        assert top2 == {"serial.txt", "feline.txt"}, (fusion, [(h.source, h.scores) for h in hy])


def test_hybrid_respects_k_and_where(make_kb, corpus: Path) -> None:
    kb = make_kb()
    kb.ingest([corpus])
    assert len(kb.search("the", k=2, mode="hybrid")) == 2
    src = str((corpus / "bread.txt").resolve())
    hits = kb.retriever.search("the oven", k=5, mode="hybrid", where=f"source = '{src}'")
    assert hits and {h.source for h in hits} == {src}


def test_default_mode_comes_from_settings(make_kb, corpus: Path) -> None:
    kb = make_kb(retrieve={"mode": "bm25"})
    kb.ingest([corpus])
    calls = kb.embedder.calls
    hits = kb.search("sourdough")
    assert hits[0].source.endswith("bread.txt") and "bm25" in hits[0].scores
    assert kb.embedder.calls == calls  # bm25 never embeds the query


def test_search_batch_matches_single(make_kb, corpus: Path) -> None:
    kb = make_kb()
    kb.ingest([corpus])
    qs = ["tomato summer", "satellite orbit", "interest rates"]
    calls = kb.embedder.calls
    batch = kb.retriever.search_batch(qs, k=3, mode="hybrid")
    assert kb.embedder.calls == calls + 1  # one embedding call for all queries
    for q, hits in zip(qs, batch, strict=True):
        assert [h.id for h in hits] == [h.id for h in kb.search(q, k=3, mode="hybrid")]
