"""The domain data set construction and the experiment helpers."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from aiprime.routing import domains
from aiprime.routing.eval import _curve, cheap_signals, cost_experiment, ndcg_per_query

SHARED = Path(__file__).resolve().parents[3] / "shared" / "data"


def _fake_shared(root: Path) -> Path:
    (root / "fashion").mkdir(parents=True)
    rows = [
        "id,productDisplayName,gender,masterCategory,subCategory,articleType,baseColour,"
        "season,usage"
    ]
    for i in range(40):
        colour = ["Blue", "Red", "White", "Black"][i % 4]
        art = ["Shirts", "Skirts", "Shoes"][i % 3]
        rows.append(
            f"{i},Brand {i} {colour} {art},Women,Apparel,Topwear,{art},{colour},Summer,Casual"
        )
    (root / "fashion" / "captions.csv").write_text("\n".join(rows) + "\n")
    (root / "tinyshakespeare").mkdir()
    speeches = []
    for i in range(60):
        speeches.append(
            f"Speaker{i % 3}:\nThis is the {i}th line that the speaker says aloud now,\n"
            + "and more words follow here to make the speech long enough. " * 3
        )
    (root / "tinyshakespeare" / "input.txt").write_text("\n\n".join(speeches) + "\n")
    return root


def _docs(root: Path) -> Path:
    d = root / "docs"
    d.mkdir()
    body = "\n\n".join(
        f"## Section {i}\n\nThe component number {i} keeps the store consistent while a "
        f"writer commits its batch. " + "It has several more words to reach the size. " * 8
        for i in range(12)
    )
    (d / "guide.md").write_text("# Guide\n\n" + body)
    (d / "routing.md").write_text("# Routing\n\nNot part of the data set at all, never.")
    return d


def test_split_is_stable_and_roughly_the_fraction() -> None:
    keys = [f"k{i}" for i in range(2000)]
    splits = [domains.split_of(k) for k in keys]
    assert splits == [domains.split_of(k) for k in keys]
    assert 0.35 < splits.count("test") / len(keys) < 0.45


def test_build_never_shares_a_source_between_splits(tmp_path: Path) -> None:
    shared = _fake_shared(tmp_path / "shared")
    fdocs, fq = domains.fashion(shared / "fashion" / "captions.csv")
    sdocs, sq = domains.shakespeare(shared / "tinyshakespeare" / "input.txt")
    ddocs, dq = domains.project_docs(_docs(tmp_path))
    assert len(fdocs) == 40 and sdocs and ddocs
    assert not any("routing" in d["_id"] for d in ddocs)
    for docs, qs in ((fdocs, fq), (sdocs, sq), (ddocs, dq)):
        ids = {d["_id"] for d in docs}
        assert qs and all(set(q.qrels) <= ids for q in qs)
        train_src = {s for q in qs if q.split == "train" for s in q.qrels}
        test_src = {s for q in qs if q.split == "test" for s in q.qrels}
        if qs[0].domain != "fashion":  # fashion splits groups, checked below
            assert not train_src & test_src
        texts = {q.split: {x.query for x in qs if x.split == q.split} for q in qs}
        assert not texts.get("train", set()) & texts.get("test", set())
    # a fashion query judges every product of its (gender, type, colour) group
    q = fq[0]
    members = [d for d in fdocs if d["_id"] in q.qrels]
    assert all(q.query.split()[0] in d["text"].lower() for d in members)


def test_shakespeare_query_is_a_line_of_its_passage(tmp_path: Path) -> None:
    shared = _fake_shared(tmp_path / "shared")
    docs, qs = domains.shakespeare(shared / "tinyshakespeare" / "input.txt")
    by_id = {d["_id"]: d["text"] for d in docs}
    for q in qs:
        (did,) = q.qrels
        assert q.query in by_id[did] and not q.query.endswith(":")


@pytest.mark.data
def test_real_domain_queries_do_not_leak(tmp_path: Path) -> None:
    if not (SHARED / "fashion" / "captions.csv").is_file():
        pytest.skip("../shared/data is absent")
    info = domains.build_domain_data(SHARED, Path(__file__).resolve().parents[2] / "docs", tmp_path)
    qs = domains.load_queries(tmp_path / "queries.jsonl")
    counts = info["queries"]
    assert isinstance(counts, dict) and set(counts) == set(domains.DOMAINS)
    for d in domains.DOMAINS:
        tr = {q.query for q in qs if q.domain == d and q.split == "train"}
        te = {q.query for q in qs if q.domain == d and q.split == "test"}
        assert tr and te
        if d != "scifact":  # BEIR's own split is taken as is
            assert not tr & te


def test_ndcg_keys_documents_by_domain() -> None:
    qrels = {"q": {"a:1": 1}}
    assert ndcg_per_query({"q": [("a", "1")]}, qrels)["q"] == pytest.approx(1.0)
    assert ndcg_per_query({"q": [("b", "1")]}, qrels)["q"] == 0.0  # same id, other domain
    assert ndcg_per_query({"q": [("b", "1"), ("a", "1")]}, qrels)["q"] == pytest.approx(
        1 / np.log2(3)
    )


def test_curve_endpoints_are_always_cheap_and_always_expensive() -> None:
    cheap = np.array([0.5, 0.2, 0.9, 0.1])
    exp = np.array([0.6, 0.8, 0.9, 0.1])
    fr = np.array([0.0, 0.25, 1.0])
    ys = _curve(np.argsort(-(exp - cheap)), cheap, exp, fr)
    assert ys[0] == pytest.approx(cheap.mean()) and ys[-1] == pytest.approx(exp.mean())
    assert ys[1] == pytest.approx((0.5 + 0.8 + 0.9 + 0.1) / 4)  # the best single switch


def _row(i: int, hard: bool, split: str) -> dict:
    word = "obscure rare" if hard else "simple common"
    return {
        "split": split,
        "qid": str(i),
        "query": f"{word} question {i}",
        "cheap_ndcg": 0.2 if hard else 0.8,
        "expensive_ndcg": 0.9 if hard else 0.8,
        "cheap_ms": 10.0,
        "dense_ms": 10.0,
        "expensive_ms": 1000.0,
        "cheap_top": [5.0 - 0.1 * j for j in range(10)],
        "dense_top": [0.5] * 10,
        "cheap_run": {f"d{j}": 1.0 for j in range(10)},
        "dense_run": {f"d{j + (5 if hard else 0)}": 1.0 for j in range(10)},
    }


def test_cost_router_learns_when_the_expensive_expert_pays(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fake_cls
) -> None:
    import aiprime.embed

    monkeypatch.setattr(aiprime.embed, "load_embedder", lambda s, cached=True: fake_cls(dim=64))
    rows = [_row(i, i % 3 == 0, "train" if i < 60 else "test") for i in range(90)]
    f = tmp_path / "rows.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert cheap_signals(rows[0])[-1] == pytest.approx(0.5)  # half the top-10 shared
    res = cost_experiment(f, tmp_path / "home", tmp_path / "out", epochs=150)
    assert res["always_cheap"]["ndcg@10"] < res["always_expensive"]["ndcg@10"]
    for name in ("embedding", "embedding+signals"):
        assert res["auc"][name] > res["auc"]["random"] + 0.05
        pt = res["router_points"][name]
        assert pt["fraction_expensive"] == pytest.approx(1 / 3, abs=0.05)
    assert (tmp_path / "out" / "cost.json").is_file()


def test_build_domains_command_ingests_every_collection(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fake_cls, home: Path, make_beir
) -> None:
    from typer.testing import CliRunner

    import aiprime.embed
    import aiprime.embed.base
    import aiprime.rag.kb
    from aiprime import cli

    for mod in (aiprime.embed.base, aiprime.embed, aiprime.rag.kb):
        monkeypatch.setattr(mod, "load_embedder", lambda s, cached=True: fake_cls())
    shared = _fake_shared(tmp_path / "shared")
    make_beir(shared / "scifact")
    docs = _docs(tmp_path)
    r = CliRunner().invoke(
        cli.app,
        ["--home", str(home), "route", "eval", "build-domains", str(shared), "--docs", str(docs)],
        catch_exceptions=False,
    )
    assert r.exit_code == 0, r.output
    counts = {}
    for line in r.stdout.splitlines():
        if " chunks (" in line:
            name, rest = line.split(":", 1)
            counts[name] = int(rest.split()[0])
    assert set(counts) == {"scifact", "fashion", "shakespeare", "docs", "merged"}
    assert counts["merged"] == sum(v for k, v in counts.items() if k != "merged")
    qs = domains.load_queries(home / "queries.jsonl")
    assert {q.domain for q in qs} == set(domains.DOMAINS)
