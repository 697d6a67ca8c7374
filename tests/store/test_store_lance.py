"""LanceStore: per-source replacement, repair after a crash, guards, concurrent readers."""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from aiprime.store import ChunkRecord, Hit, StoreError
from aiprime.store.base import check_collection_name
from aiprime.store.lance import LanceStore, sql_str

DIM = 8
WORKER = Path(__file__).resolve().parents[1] / "rag" / "rag_ingest_worker.py"
_tick = iter(range(1, 10**9))


def vec(seed: int) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal(DIM).astype(np.float32)
    return v / np.linalg.norm(v)


def records(source: str, digest: str, texts: list[str], seed: int = 0) -> list[ChunkRecord]:
    now = next(_tick)  # strictly increasing "ingestion time" per batch
    return [
        ChunkRecord(
            id=f"{source}|{digest}|{i}",
            source=source,
            source_hash=digest,
            doc_id=source,
            title=f"title of {source}",
            text=t,
            chunk_index=i,
            start=0,
            end=len(t),
            page=-1,
            ingested_at=now,
            vector=vec(seed + i),
        )
        for i, t in enumerate(texts)
    ]


def rows(store: LanceStore) -> list[dict]:
    return (
        store.table.to_arrow().select(["source", "source_hash", "chunk_index", "text"]).to_pylist()
    )


@pytest.fixture
def store(tmp_path: Path) -> LanceStore:
    return LanceStore(tmp_path / "db", "docs", dim=DIM, model_id="m1|onnx")


def test_new_collection_needs_dim(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="does not exist yet"):
        LanceStore(tmp_path / "db", "nothing")


def test_empty_store_reads(store: LanceStore) -> None:
    assert store.count() == 0 and store.sources() == {}
    assert store.dense_search(vec(1), 5) == [] and store.text_search("x", 5) == []
    assert store.remove_sources(["a"]) == 0 and store.repair() == 0
    store.finalize()  # nothing to index, no error


def test_replace_sources_makes_new_chunks_the_only_ones(store: LanceStore) -> None:
    store.replace_sources(
        records("a", "h1", ["a old one", "a old two", "a old three"]), {"a": "h1"}
    )
    store.replace_sources(records("b", "h1", ["b text"]), {"b": "h1"})
    store.replace_sources(records("a", "h2", ["a new one"], seed=9), {"a": "h2"})
    got = sorted((r["source"], r["source_hash"], r["text"]) for r in rows(store))
    assert got == [("a", "h2", "a new one"), ("b", "h1", "b text")]
    src = store.sources()
    assert {s: (i.source_hash, i.chunks) for s, i in src.items()} == {
        "a": ("h2", 1),
        "b": ("h1", 1),
    }
    # a source whose new version has no chunks loses its old ones
    store.replace_sources([], {"b": "h9"})
    assert set(store.sources()) == {"a"}
    store.replace_sources([], {})  # no-op
    assert store.count() == 1


def test_sources_with_quotes_are_safe(store: LanceStore) -> None:
    weird = '/tmp/it\'s a "file" OR 1=1 --.txt'
    store.replace_sources(records(weird, "h1", ["q1"]), {weird: "h1"})
    store.replace_sources(records("other", "h1", ["q2"]), {"other": "h1"})
    store.replace_sources(records(weird, "h2", ["q3"]), {weird: "h2"})
    assert sorted(r["text"] for r in rows(store)) == ["q2", "q3"]
    assert store.remove_sources([weird]) == 1
    assert set(store.sources()) == {"other"}
    assert sql_str("it's") == "'it''s'"


def test_remove_sources(store: LanceStore) -> None:
    for s in ("x", "y", "z"):
        store.replace_sources(records(s, "h", [f"{s}1", f"{s}2"]), {s: "h"})
    assert store.remove_sources(["x", "z", "missing"]) == 4
    assert set(store.sources()) == {"y"} and store.count() == 2
    assert store.remove_sources([]) == 0


def test_search_after_finalize(store: LanceStore) -> None:
    store.replace_sources(records("a", "h", ["the zebra crossing", "plain words"]), {"a": "h"})
    store.replace_sources(records("b", "h", ["nothing special"], seed=5), {"b": "h"})
    store.finalize()
    assert "content_idx" in {ix.name for ix in store.table.list_indices()}
    hits = store.text_search("zebra", 5)
    assert [h.text for h in hits] == ["the zebra crossing"]
    assert isinstance(hits[0], Hit) and hits[0].score > 0
    dense = store.dense_search(vec(5), 3)
    assert dense[0].text == "nothing special"
    assert dense[0].score == pytest.approx(1.0, abs=1e-5)  # cosine similarity, not distance
    assert [h.score for h in dense] == sorted((h.score for h in dense), reverse=True)
    only_a = store.dense_search(vec(5), 3, where="source = 'a'")
    assert {h.source for h in only_a} == {"a"}
    # new rows are searchable after the next finalize, deleted ones disappear
    store.replace_sources(records("a", "h2", ["a zebra again"]), {"a": "h2"})
    store.finalize()
    assert [h.text for h in store.text_search("zebra", 5)] == ["a zebra again"]


def test_crash_between_add_and_delete_then_repair(
    store: LanceStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store.replace_sources(records("a", "v1", ["a1 old", "a2 old"]), {"a": "v1"})
    store.replace_sources(records("b", "v1", ["b1"]), {"b": "v1"})
    table = store.table

    def crash(*args, **kwargs):
        raise RuntimeError("simulated crash after add, before delete")

    monkeypatch.setattr(table, "delete", crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        store.replace_sources(records("a", "v2", ["a1 new", "a2 new", "a3 new"]), {"a": "v2"})
    monkeypatch.undo()
    assert store.count() == 6  # both versions of 'a' are on disk

    reopened = LanceStore(tmp_path / "db", "docs", dim=DIM, model_id="m1")
    assert reopened.repair() == 2
    got = sorted((r["source"], r["source_hash"], r["chunk_index"]) for r in rows(reopened))
    assert got == [("a", "v2", 0), ("a", "v2", 1), ("a", "v2", 2), ("b", "v1", 0)]
    assert reopened.sources()["a"].chunks == 3
    assert reopened.repair() == 0  # idempotent


def test_repair_keeps_newest_even_if_older_hash_sorts_later(store: LanceStore) -> None:
    # two versions without the delete step: 'zzz' written first, 'aaa' later
    table = store._ensure_table()
    table.add(store._to_arrow(records("s", "zzz", ["older"])))
    table.add(store._to_arrow(records("s", "aaa", ["newer", "newer 2"])))
    assert store.repair() == 1
    assert sorted(r["text"] for r in rows(store)) == ["newer", "newer 2"]


def test_dimension_mismatch(store: LanceStore, tmp_path: Path) -> None:
    store.replace_sources(records("a", "h", ["x"]), {"a": "h"})
    with pytest.raises(StoreError) as ei:
        LanceStore(tmp_path / "db", "docs", dim=DIM * 2, model_id="m1|onnx")
    msg = str(ei.value)
    assert f"{DIM}-d" in msg and f"{DIM * 2}-d" in msg and "'m1|onnx'" in msg
    bad = records("c", "h", ["y"])
    bad[0].vector = np.ones(DIM + 1, dtype=np.float32)
    with pytest.raises(StoreError, match=f"collection expects {DIM}-d"):
        store.replace_sources(bad, {"c": "h"})


def test_model_mismatch(store: LanceStore, tmp_path: Path) -> None:
    store.replace_sources(records("a", "h", ["x"]), {"a": "h"})
    with pytest.raises(StoreError, match=r"embedded with 'm1\|onnx', not 'other-model'"):
        LanceStore(tmp_path / "db", "docs", dim=DIM, model_id="other-model")
    # the same model through another backend is compatible
    same = LanceStore(tmp_path / "db", "docs", dim=DIM, model_id="m1|onnx-int8")
    assert same.model_id == "m1|onnx" and same.count() == 1
    # opening without dim/model_id reads them from the metadata
    ro = LanceStore(tmp_path / "db", "docs")
    assert (ro.dim, ro.model_id) == (DIM, "m1|onnx")


@pytest.mark.parametrize(
    "name", ["", "-lead", "_lead", "a b", "../up", "x/y", "é", "a" * 65, "a.b"]
)
def test_bad_collection_name(tmp_path: Path, name: str) -> None:
    with pytest.raises(StoreError, match="collection name"):
        LanceStore(tmp_path / "db", name, dim=DIM)


@pytest.mark.parametrize("name", ["a", "A-1_b", "beir-scifact", "9" * 64])
def test_good_collection_name(name: str) -> None:
    assert check_collection_name(name) == name


def test_collections_are_separate(tmp_path: Path) -> None:
    one = LanceStore(tmp_path / "db", "one", dim=DIM, model_id="m")
    two = LanceStore(tmp_path / "db", "two", dim=4, model_id="n")
    one.replace_sources(records("a", "h", ["x"]), {"a": "h"})
    assert two.count() == 0 and one.count() == 1


def test_write_lock_excludes_other_writers(store: LanceStore) -> None:
    order: list[str] = []
    inside = threading.Event()
    release = threading.Event()

    def first() -> None:
        with store.write_lock():
            order.append("first in")
            inside.set()
            release.wait()
            order.append("first out")

    def second() -> None:
        inside.wait()
        with store.write_lock():  # a separate open file description: flock blocks
            order.append("second in")

    t1, t2 = threading.Thread(target=first), threading.Thread(target=second)
    t1.start()
    t2.start()
    inside.wait()
    t2.join(timeout=0.5)
    assert t2.is_alive(), "second writer got the lock while the first held it"
    release.set()
    t1.join()
    t2.join()
    assert order == ["first in", "first out", "second in"]


def test_readers_while_another_process_ingests(tmp_path: Path, fake_cls) -> None:
    """A reader thread searches while a writer process ingests: no errors, only valid states."""
    home = tmp_path / "home"
    docs = tmp_path / "docs"
    docs.mkdir()
    n_seed, n_new = 3, 24
    texts = {}
    for i in range(n_seed + n_new):
        p = docs / f"f{i:02d}.txt"
        p.write_text(f"document {i} mentions token{i} and the common word lantern.")
        texts[str(p.resolve())] = p.read_text()
    seed_paths = [str(docs / f"f{i:02d}.txt") for i in range(n_seed)]
    new_paths = [str(docs / f"f{i:02d}.txt") for i in range(n_seed, n_seed + n_new)]
    subprocess.run([sys.executable, str(WORKER), str(home), *seed_paths], check=True)

    emb = fake_cls()
    reader = LanceStore(home / "store", "default", emb.dim, emb.model_id, read_consistency_s=0)
    qv = emb.encode(["lantern"])[0]
    observed: list[int] = []
    problems: list[str] = []
    done = threading.Event()

    def read_loop() -> None:
        while not done.is_set():
            try:
                n = reader.count()
                observed.append(n)
                for h in reader.dense_search(qv, 50) + reader.text_search("lantern", 50):
                    if texts.get(h.source) != h.text:
                        problems.append(f"unexpected hit {h.source}: {h.text!r}")
                hits = reader.dense_search(qv, 50)
                if len({h.source for h in hits}) != len(hits):
                    problems.append("duplicate source in results")
            except Exception as e:  # any exception is a failure
                problems.append(repr(e))
                return

    t = threading.Thread(target=read_loop)
    t.start()
    try:
        writer = subprocess.run(
            [sys.executable, str(WORKER), str(home), *new_paths, "--batch-chunks", "2"],
            capture_output=True,
            text=True,
        )
        observed_before_stop = len(observed)
    finally:
        done.set()
        t.join()
    assert writer.returncode == 0, writer.stderr
    assert f"ingested={n_new}" in writer.stdout
    assert not problems, problems[:5]
    assert observed_before_stop > 0
    assert all(n_seed <= n <= n_seed + n_new for n in observed), observed
    assert observed == sorted(observed), "a reader saw rows disappear during pure additions"
    final = LanceStore(home / "store", "default", emb.dim, emb.model_id)
    assert final.count() == n_seed + n_new
    assert {h.source for h in final.text_search("lantern", 100)} == set(texts)
