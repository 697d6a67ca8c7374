"""Re-ranking: features, the LR re-ranker and its JSON model, the cross-encoder (a tiny
model built here), MMR, stage composition, KnowledgeBase and CLI wiring."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from aiprime.config import load_settings
from aiprime.rag.rerank.base import apply_scores
from aiprime.rag.rerank.features import FEATURES, featurize, stem, terms
from aiprime.rag.rerank.lr import (
    LRModel,
    LRReranker,
    RerankModelError,
    build_training_set,
    train_lr,
)
from aiprime.rag.rerank.stack import RerankStack, build_stack, default_stages, parse_stack
from aiprime.store import Hit


def hit(
    i: str,
    doc: str,
    score: float,
    text: str = "",
    title: str = "",
    chunk: int = 0,
    **scores: float,
) -> Hit:
    return Hit(i, "src", doc, title, text, chunk, 0, len(text), -1, score, dict(scores))


# -- features ----------------------------------------------------------------------------


def test_stemming_and_terms() -> None:
    assert stem("cells") == "cell" and stem("regulated") == stem("regulates") == "regulat"
    assert stem("regulate") == "regulat" and stem("gene") == stem("genes") == "gen"
    assert stem("boxes") == stem("box") and stem("studies") == stem("study")
    assert stem("class") == "class" and stem("virus") == "virus" and stem("is") == "is"
    assert terms("The cells are regulating THE genes") == ["cell", "regulat", "gen"]


def test_featurize_fills_missing_retrievers() -> None:
    hits = [
        hit("a", "d1", 0.9, "insulin regulates glucose", "Insulin", dense=0.8, dense_rank=1),
        hit("b", "d2", 0.5, "unrelated text", chunk=3, bm25=7.0, bm25_rank=1),
    ]
    x = featurize("does insulin regulate glucose", hits, depth=100)
    f = {n: x[:, i] for i, n in enumerate(FEATURES)}
    assert x.shape == (2, len(FEATURES))
    assert f["has_dense"].tolist() == [1, 0] and f["has_bm25"].tolist() == [0, 1]
    assert f["dense_log_rank"][1] == pytest.approx(np.log(101))  # missing: depth + 1
    assert f["dense"][1] == 0.0 and f["bm25"][0] == 0.0
    assert f["query_overlap"][0] == 1.0 and f["query_overlap"][1] == 0.0
    assert f["title_overlap"][0] == pytest.approx(1 / 3)
    assert f["first_chunk"].tolist() == [1, 0]


# -- logistic regression -----------------------------------------------------------------


def synthetic(n_queries: int, seed: int = 0):
    """Relevant chunks share the query's words and score well in BM25, but the fused
    score (what the list arrives sorted by) is noise: the re-ranker must learn that."""
    rng = np.random.default_rng(seed)
    queries, cands, qrels = {}, {}, {}
    for qi in range(n_queries):
        q = f"q{qi}"
        topic = f"topic{qi} marker{qi}"
        queries[q] = f"what about {topic}"
        hits = []
        for j in range(10):
            rel = j == 7
            text = f"{topic} details" if rel else f"filler{j} words{qi}"
            hits.append(
                hit(
                    f"{q}-c{j}",
                    f"{q}-d{j}",
                    float(1.0 - j / 10),
                    text,
                    bm25=float(5.0 + rng.normal() if rel else 1.0 + rng.normal()),
                    bm25_rank=float(1 if rel else j + 2),
                    dense=float(rng.uniform(0.2, 0.4)),
                    dense_rank=float(j + 1),
                )
            )
        cands[q] = hits
        qrels[q] = {f"{q}-d7": 1}
    return queries, cands, qrels


@pytest.fixture(scope="module")
def trained() -> LRModel:
    queries, cands, qrels = synthetic(12)
    ts = build_training_set(queries, cands, qrels, depth=10)
    return train_lr(ts, qrels, cs=(0.1, 1.0), class_weights=(None,), folds=3)


def test_trained_lr_ranks_the_relevant_candidate_first(trained: LRModel) -> None:
    queries, cands, _ = synthetic(3, seed=1)
    for q in queries:
        ranked = LRReranker(trained, 10).rerank(queries[q], cands[q])
        assert ranked[0].doc_id == f"{q}-d7"
        assert ranked[0].scores["lr_rank"] == 1.0 and "lr" in ranked[0].scores
        assert [h.score for h in ranked] == sorted((h.score for h in ranked), reverse=True)
    assert trained.meta["cv_ndcg@10"] > 0.9 and len(trained.meta["cv_trials"]) == 2


def test_lr_model_json_round_trip(trained: LRModel, tmp_path: Path) -> None:
    path = trained.save(tmp_path / "m" / "lr.json")
    doc = json.loads(path.read_text())  # plain JSON: numbers a person can read
    assert doc["format"] == "aiprime-lr-reranker/1" and doc["features"] == list(FEATURES)
    loaded = LRModel.load(path)
    x = np.random.default_rng(0).normal(size=(5, len(FEATURES)))
    assert np.allclose(loaded.decision(x), trained.decision(x))
    doc["features"] = doc["features"][:-1]
    path.write_text(json.dumps(doc))
    with pytest.raises(RerankModelError, match="other features"):
        LRModel.load(path)
    path.write_text("{oops")
    with pytest.raises(RerankModelError, match="invalid JSON"):
        LRModel.load(path)
    with pytest.raises(RerankModelError, match="aiprime rerank train"):
        LRModel.load(tmp_path / "absent.json")


# -- cross-encoder -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_ce(tmp_path_factory: pytest.TempPathFactory, minilm_dir: Path) -> Path:
    """A tiny BERT cross-encoder (random weights) saved like any HF checkpoint."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(str(minilm_dir))
    cfg = BertConfig(
        vocab_size=tok.vocab_size,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=128,
    )
    cfg.num_labels = 1
    out = tmp_path_factory.mktemp("tiny-ce")
    BertForSequenceClassification(cfg).save_pretrained(str(out), safe_serialization=True)
    tok.save_pretrained(str(out))
    return out


def test_cross_encoder_loads_and_scores(tiny_ce: Path) -> None:
    from aiprime.rag.rerank.cross_encoder import CrossEncoderModel, CrossEncoderReranker

    assert (tiny_ce / "model.safetensors").is_file()
    model = CrossEncoderModel(tiny_ce, max_length=64, batch_size=2, device="cpu")
    s = model.score("what is insulin", ["insulin is a hormone", "tides", "x y z"])
    assert s.shape == (3,) and np.isfinite(s).all()
    assert np.allclose(
        s, model.score("what is insulin", ["insulin is a hormone", "tides", "x y z"])
    )
    hits = [hit(f"c{i}", f"d{i}", 1.0 - i / 10, t) for i, t in enumerate(["a", "b", "c"])]
    ranked = CrossEncoderReranker(model, top_k=3, blend=1.0).rerank("q", hits)
    by_text = dict(zip(["a", "b", "c"], model.score("q", ["a", "b", "c"]), strict=True))
    assert [h.text for h in ranked] == sorted(by_text, key=lambda t: -by_text[t])
    assert all("cross-encoder_logit" in h.scores for h in ranked)


def test_cross_encoder_from_hf_cache(tiny_ce: Path, tmp_path: Path, monkeypatch) -> None:
    import huggingface_hub.constants as hc

    from aiprime.rag.rerank.cross_encoder import resolve_cross_encoder

    repo = tmp_path / "hub" / "models--cross-encoder--tiny-test"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("abc123")
    shutil.copytree(tiny_ce, repo / "snapshots" / "abc123")
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path / "hub"))
    assert resolve_cross_encoder("tiny-test") == repo / "snapshots" / "abc123"
    with pytest.raises(FileNotFoundError, match="not in the Hugging Face cache"):
        resolve_cross_encoder("no-such-model")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"no config\.json"):
        resolve_cross_encoder(tmp_path / "empty")


def test_cross_encoder_fine_tuning_saves_a_checkpoint(tiny_ce: Path, tmp_path: Path) -> None:
    from aiprime.rag.rerank.cross_encoder import (
        META_FILE,
        CrossEncoderModel,
        load_groups,
        make_groups,
        save_groups,
        train_cross_encoder,
    )

    queries, cands, qrels = synthetic(4)
    groups = make_groups(queries, cands, qrels, max_negatives=5)
    assert len(groups) == 4 and all(g["pos"].startswith("topic") for g in groups)
    path = save_groups(tmp_path / "g.jsonl.gz", groups)
    assert load_groups(path) == groups
    steps: list[int] = []
    report = train_cross_encoder(
        groups,
        tiny_ce,
        tmp_path / "ce",
        epochs=2,
        negatives=3,
        groups_per_batch=2,
        max_length=32,
        device="cpu",
        on_step=lambda s, total, loss: steps.append(s),
    )
    assert steps == [1, 2, 3, 4] and report["steps"] == 4
    assert (tmp_path / "ce" / "model.safetensors").is_file()
    assert not list((tmp_path / "ce").glob("*.bin")) and not list((tmp_path / "ce").glob("*.pkl"))
    meta = json.loads((tmp_path / "ce" / META_FILE).read_text())
    assert meta["blend"] == 1.0 and meta["training"]["groups"] == 4
    assert CrossEncoderModel(tmp_path / "ce", 32).score("q", ["a"]).shape == (1,)


# -- MMR and composition -----------------------------------------------------------------


def test_mmr_reduces_duplicates(fake_embedder) -> None:
    from aiprime.rag.rerank.mmr import MMRReranker

    texts = ["glaciers carve valleys"] * 3 + ["tides follow the moon", "volcanoes erupt lava"]
    hits = [hit(f"c{i}", f"d{i}", 1.0 - i / 10, t) for i, t in enumerate(texts)]
    plain = [h.text for h in hits[:3]]
    ranked = MMRReranker(fake_embedder, lam=0.5, top_k=3).rerank("glaciers", hits)
    assert len(set(plain)) == 1 and len({h.text for h in ranked[:3]}) == 3
    assert ranked[0].id == "c0" and len(ranked) == 5
    hits = [hit(f"c{i}", f"d{i}", 1.0 - i / 10, t) for i, t in enumerate(texts)]
    same = MMRReranker(fake_embedder, lam=1.0, top_k=5).rerank("glaciers", hits)
    assert [h.id for h in same] == ["c0", "c1", "c2", "c3", "c4"]  # lambda 1: relevance only
    with pytest.raises(ValueError, match="lambda"):
        MMRReranker(fake_embedder, lam=1.5)


class Recorder:
    """A stage that reverses what it is given and remembers what that was."""

    def __init__(self, name: str, depth: int | None = None) -> None:
        self.name = name
        self.depth = depth
        self.seen: list[list[str]] = []

    def rerank(self, query: str, hits: list[Hit], k: int | None = None) -> list[Hit]:
        self.seen.append([h.id for h in hits])
        return apply_scores(hits, [float(i) for i in range(len(hits))], self.name, k)


def test_stack_composition_order_and_depths() -> None:
    first, second = Recorder("first"), Recorder("second", depth=2)
    stack = RerankStack([first, second], depth=4)
    hits = [hit(f"c{i}", f"d{i}", 10.0 - i) for i in range(6)]
    out = stack.rerank("q", hits)
    assert first.seen == [["c0", "c1", "c2", "c3"]]  # fused top-depth only
    assert second.seen == [["c3", "c2"]]  # the head of the first stage's order
    assert [h.id for h in out] == ["c2", "c3", "c1", "c0", "c4", "c5"]
    assert [h.score for h in out] == sorted((h.score for h in out), reverse=True)
    assert [h.id for h in stack.rerank("q", [hit(f"c{i}", "d", 1.0) for i in range(6)], k=2)]
    assert set(stack.latency_ms()) == {"first", "second"} and stack.calls == 2


def test_parse_stack() -> None:
    assert parse_stack("none") == [] and parse_stack("") == []
    assert parse_stack("lr+cross-encoder") == ["lr", "cross-encoder"]
    assert parse_stack("LR+ce+mmr") == ["lr", "cross-encoder", "mmr"]
    with pytest.raises(ValueError, match="'bm42'"):
        parse_stack("lr+bm42")


def test_trained_stages_are_used_by_default(
    home: Path, make_kb, trained: LRModel, tmp_path: Path
) -> None:
    kb = make_kb()
    assert default_stages(kb.settings) == [] and kb.reranker is None
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "a.md").write_text("# Tides\n\nThe moon's gravity pulls the oceans.\n")
    (docs / "b.md").write_text("# Glaciers\n\nGlaciers carve valleys.\n")
    trained.save(kb.settings.models_dir / "rerank" / "lr.json")
    kb2 = make_kb()
    assert default_stages(kb2.settings) == ["lr"]
    kb2.ingest([docs])
    hits = kb2.search("moon gravity", k=2)
    assert hits and all("lr" in h.scores for h in hits)
    assert all("lr" not in h.scores for h in kb2.search("moon gravity", k=2, rerank=False))
    off = load_settings(home, rerank={"stack": []})
    assert build_stack(off) is None


# -- CLI ---------------------------------------------------------------------------------


def test_cli_rerank_train_then_eval(cli_run, home: Path, tmp_path: Path, make_beir) -> None:
    root = make_beir(tmp_path / "tiny")
    r = cli_run("rerank", "train", root, "--split", "train", "--skip-cross-encoder")
    assert r.exit_code == 0, r.output
    model = home / "models" / "rerank" / "lr.json"
    assert model.is_file() and json.loads(model.read_text())["meta"]["train_queries"] == 2
    report = json.loads((home / "models" / "rerank" / "train-report.json").read_text())
    assert report["split"] == "train" and "cross_encoder" not in report
    out = tmp_path / "res.json"
    r = cli_run("eval", "beir", root, "--split", "test", "--rerank", "lr", "--out", out)
    assert r.exit_code == 0, r.output
    res = json.loads(out.read_text())
    assert res["rerank"] == ["lr"] and set(res["rerank_ms_per_query"]) == {"lr"}
    assert 0.0 <= res["ndcg@10"] <= 1.0
    r = cli_run("eval", "beir", root, "--rerank", "lr+bogus")
    assert r.exit_code == 1 and "bogus" in r.output
    other = tmp_path / "elsewhere"
    r = cli_run("rerank", "train", root, "--skip-cross-encoder", "--out-dir", other)
    assert r.exit_code == 0 and (other / "rerank" / "lr.json").is_file()


def test_train_ce_stage_fits_then_tunes_the_blend(
    tiny_ce: Path, home: Path, tmp_path: Path, trained: LRModel
) -> None:
    from aiprime.rag.rerank.cross_encoder import META_FILE, load_groups
    from aiprime.rag.rerank.train import held_out, train_ce_stage

    s = load_settings(home, rerank={"ce_max_length": 32, "ce_top_k": 5})
    queries, cands, qrels = synthetic(12)
    lr_path = trained.save(tmp_path / "lr.json")
    out = tmp_path / "ce"
    rep = train_ce_stage(
        s, queries, qrels, cands, out, str(tiny_ce), 1, None, lr_path,
        on_step=lambda *a: None, groups_file=tmp_path / "g.jsonl.gz", negatives=3,
    )  # fmt: skip
    tune_q = [q for q in queries if held_out(q)]
    assert rep["tune_queries"] == len(tune_q) >= 1 and rep["fit_queries"] == 12 - len(tune_q)
    assert {g["qid"] for g in load_groups(tmp_path / "g.jsonl.gz")}.isdisjoint(tune_q)
    meta = json.loads((out / META_FILE).read_text())
    assert meta["blend"] == rep["blend"] and len(meta["blend_trials"]) == 11
    # epochs 0: install an existing checkpoint elsewhere and only tune the blend
    rep0 = train_ce_stage(s, queries, qrels, cands, tmp_path / "ce2", str(out), 0, None, None)
    assert "training" not in rep0 and (tmp_path / "ce2" / "model.safetensors").is_file()


def test_cross_encoder_onnx_backends_match_torch(tiny_ce: Path, tmp_path: Path) -> None:
    from aiprime.rag.rerank.cross_encoder import CrossEncoderModel

    passages = ["insulin is a hormone", "tides follow the moon", "x y z", "a b"]
    ref = CrossEncoderModel(tiny_ce, max_length=64, batch_size=3, device="cpu").score(
        "what is insulin", passages
    )
    fp32 = CrossEncoderModel(
        tiny_ce, max_length=64, batch_size=3, backend="onnx", export_dir=tmp_path
    )
    assert np.allclose(fp32.score("what is insulin", passages), ref, atol=1e-4)
    int8 = CrossEncoderModel(
        tiny_ce, max_length=64, batch_size=3, backend="onnx-int8", export_dir=tmp_path
    )
    s8 = int8.score("what is insulin", passages)
    assert s8.shape == ref.shape and np.isfinite(s8).all()
    assert len(list(tmp_path.glob("ce-*.onnx"))) == 2  # one cached export per variant
    for model in (fp32, int8):  # no passages, an empty one, a huge one
        assert model.score("q", []).shape == (0,)
        assert np.isfinite(model.score("q", ["", "word " * 5000])).all()
    with pytest.raises(ValueError, match="backend 'tf'"):
        CrossEncoderModel(tiny_ce, backend="tf")
