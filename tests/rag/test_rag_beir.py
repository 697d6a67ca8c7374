"""BEIR evaluation: metrics by hand, loading errors, an end-to-end run, and SciFact."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from aiprime.config import load_settings
from aiprime.rag.beir import BeirError, collection_for, evaluate_beir, load_beir, metrics, to_run
from aiprime.rag.kb import list_collections
from aiprime.store import Hit

SCIFACT = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "scifact"


def test_metrics_perfect_run() -> None:
    qrels = {"q1": {"d1": 1}, "q2": {"d2": 1, "d3": 1}}
    run = {"q1": {"d1": 3.0, "x": 1.0}, "q2": {"d3": 2.0, "d2": 1.5, "y": 0.1}}
    m = metrics(run, qrels)
    assert m == pytest.approx({"ndcg@10": 1.0, "recall@100": 1.0, "mrr@10": 1.0})


def test_metrics_by_hand() -> None:
    qrels = {"q1": {"d1": 1}, "q2": {"d2": 1, "d3": 1}, "q3": {"d4": 1}}
    run = {
        "q1": {"x": 2.0, "d1": 1.0},  # relevant at rank 2
        "q2": {"d2": 3.0, "y": 2.0, "d3": 1.0},  # relevant at ranks 1 and 3
        # q3 has no results at all
    }
    ndcg_q1 = 1 / 1.5849625007211562  # 1/log2(3)
    ndcg_q2 = (1 + 1 / 2) / (1 + 1 / 1.5849625007211562)
    m = metrics(run, qrels)
    assert m["ndcg@10"] == pytest.approx((ndcg_q1 + ndcg_q2 + 0) / 3, abs=1e-6)
    assert m["mrr@10"] == pytest.approx((0.5 + 1 + 0) / 3, abs=1e-6)
    assert m["recall@100"] == pytest.approx(2 / 3, abs=1e-6)


def test_mrr_and_ndcg_are_cut_at_10() -> None:
    qrels = {"q": {"rel": 1}}
    run = {"q": {**{f"n{i}": 100.0 - i for i in range(10)}, "rel": 1.0}}  # rank 11
    m = metrics(run, qrels)
    assert m["mrr@10"] == 0.0 and m["ndcg@10"] == 0.0 and m["recall@100"] == 1.0


def test_to_run_scores_documents_by_best_chunk() -> None:
    def h(i: str, doc: str, s: float) -> Hit:
        return Hit(i, "src", doc, "", "", 0, 0, 0, -1, s)

    run = to_run({"q": [h("c1", "d1", 0.5), h("c2", "d2", 0.7), h("c3", "d1", 0.9)]}, n_docs=1)
    assert run == {"q": {"d1": 0.9}}


def test_load_beir(tmp_path: Path, make_beir) -> None:
    data = load_beir(make_beir(tmp_path / "tiny"), "test")
    assert data.qrels == {"q1": {"d1": 1}, "q2": {"d2": 1}, "q3": {"d3": 1}}
    assert set(data.queries) == {"q1", "q2", "q3"}  # only judged queries
    assert data.corpus == tmp_path / "tiny" / "corpus.jsonl"


@pytest.mark.parametrize("missing", ["corpus.jsonl", "queries.jsonl", "qrels/test.tsv"])
def test_load_beir_missing_files(tmp_path: Path, missing: str, make_beir) -> None:
    root = make_beir(tmp_path / "tiny")
    (root / missing).unlink()
    with pytest.raises(BeirError, match=rf"{missing.split('/')[-1]}: missing"):
        load_beir(root, "test")


def test_load_beir_unknown_split_and_bad_rows(tmp_path: Path, make_beir) -> None:
    root = make_beir(tmp_path / "tiny")
    with pytest.raises(BeirError, match=r"dev\.tsv: missing"):
        load_beir(root, "dev")
    (root / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\nq1\td1\n")
    with pytest.raises(BeirError, match=r"test\.tsv:2: expected query-id, corpus-id, score"):
        load_beir(root, "test")
    (root / "qrels" / "test.tsv").write_text("q9\td1\t1\n")  # no header; unknown query
    with pytest.raises(BeirError, match="1 judged queries are not in"):
        load_beir(root, "test")
    (root / "qrels" / "test.tsv").write_text("q1\td1\t1\n")
    (root / "queries.jsonl").write_text('{"_id": "q1", "text": "x"}\n{oops\n')
    with pytest.raises(BeirError, match=r"queries.jsonl:2: invalid JSON"):
        load_beir(root, "test")


def test_collection_for() -> None:
    assert collection_for(Path("/data/sci fact.v2")) == "beir-sci-fact-v2"
    a = collection_for(Path("/data/scifact"), "minilm|onnx|200|32")
    b = collection_for(Path("/data/scifact"), "minilm|onnx|100|10")
    assert a.startswith("beir-scifact-") and b.startswith("beir-scifact-") and a != b
    assert a == collection_for(Path("/data/scifact"), "minilm|onnx|200|32")


def run_eval(home: Path, root: Path, split: str, retriever: str, fake, **kw):
    return evaluate_beir(load_settings(home), root, split, retriever, embedder=fake, **kw)


def test_evaluate_beir_end_to_end(home: Path, tmp_path: Path, fake_embedder, make_beir) -> None:
    root = make_beir(tmp_path / "tiny")
    res = run_eval(home, root, "test", "bm25", fake_embedder)
    assert list_collections(load_settings(home))[0].startswith("beir-tiny-")
    assert {"ndcg@10", "recall@100", "mrr@10"} <= set(res)
    assert all(0.0 <= res[k] <= 1.0 for k in ("ndcg@10", "recall@100", "mrr@10"))
    assert res["ndcg@10"] > 0.6  # lexical overlap is enough on this toy set
    assert res["queries"] == 3 and res["chunks"] == 5 and res["tuned_on"] is None
    assert res["ingest"]["files_ingested"] == 1

    res2 = run_eval(home, root, "test", "hybrid", fake_embedder, tune_split="train")
    assert res2["ingest"]["files_unchanged"] == 1  # the corpus is not ingested twice
    assert res2["tuned_on"] == "train" and len(res2["tuning_trials"]) == 22
    assert res2["fusion"] in ("rrf", "mix")


def test_tuning_on_the_reported_split_is_refused(
    home: Path, tmp_path: Path, fake_embedder, make_beir
) -> None:
    root = make_beir(tmp_path / "tiny")
    with pytest.raises(BeirError, match="refusing to tune on the split being reported"):
        run_eval(home, root, "test", "hybrid", fake_embedder, tune_split="test")
    assert fake_embedder.calls == 0  # refused before any work


def test_unusable_corpus(home: Path, tmp_path: Path, fake_embedder, make_beir) -> None:
    root = make_beir(tmp_path / "tiny")
    (root / "corpus.jsonl").write_bytes(b"\x00\x00binary")
    with pytest.raises(BeirError, match="nothing could be ingested"):
        run_eval(home, root, "test", "bm25", fake_embedder)


@pytest.mark.data
def test_scifact_slice_bm25(home: Path, tmp_path: Path, fake_embedder) -> None:
    if not (SCIFACT / "corpus.jsonl").is_file():
        pytest.skip(f"{SCIFACT} is absent")
    n_docs = 300
    lines = []
    with (SCIFACT / "corpus.jsonl").open() as f:
        for line in f:
            lines.append(line)
            if len(lines) == n_docs:
                break
    ids = {json.loads(x)["_id"] for x in lines}
    qrels: dict[str, dict[str, int]] = {}
    with (SCIFACT / "qrels" / "test.tsv").open() as f:
        for row in list(csv.reader(f, delimiter="\t"))[1:]:
            qrels.setdefault(row[0], {})[row[1]] = int(row[2])
    keep = {q for q, docs in qrels.items() if set(docs) <= ids}
    assert len(keep) >= 10
    root = tmp_path / "scifact-slice"
    (root / "qrels").mkdir(parents=True)
    (root / "corpus.jsonl").write_text("".join(lines))
    with (SCIFACT / "queries.jsonl").open() as f, (root / "queries.jsonl").open("w") as out:
        out.writelines(x for x in f if json.loads(x)["_id"] in keep)
    with (root / "qrels" / "test.tsv").open("w") as out:
        out.write("query-id\tcorpus-id\tscore\n")
        out.writelines(f"{q}\t{d}\t{s}\n" for q in sorted(keep) for d, s in qrels[q].items())
    res = run_eval(home, root, "test", "bm25", fake_embedder)
    assert res["queries"] == len(keep)
    assert res["ndcg@10"] > 0.5, res
    assert res["recall@100"] > 0.8, res
