"""``RoutedSearch`` over three tiny collections: routing, fusion, feedback, persistence."""

from __future__ import annotations

from pathlib import Path

import pytest
from routing_data import LABELLED

from aiprime.config import ExpertSettings, load_settings
from aiprime.routing.experts import RoutingError, build_experts, expert_settings
from aiprime.routing.pipeline import RoutedSearch, fuse_experts, read_labels
from aiprime.store import Hit


def _rs(home: Path, fake_cls) -> RoutedSearch:
    return RoutedSearch.open(load_settings(home), embedder=fake_cls())


def test_experts_come_from_the_config(domain_home: Path, fake_cls) -> None:
    rs = _rs(domain_home, fake_cls)
    assert rs.names == ["cooking", "astronomy", "football"]
    assert all(e.kb.store.count() == 3 for e in rs.experts)
    assert rs.router is None


def test_expert_settings_override_only_what_is_declared(domain_home: Path) -> None:
    base = load_settings(domain_home)
    s = expert_settings(
        base,
        ExpertSettings(
            name="x",
            collection="c",
            mode="bm25",
            rerank=["lr"],
            dense_weight=0.2,
            answer_model="openai:gpt-4o-mini",
        ),
    )
    assert (s.collection, s.retrieve.mode, s.retrieve.dense_weight) == ("c", "bm25", 0.2)
    assert s.rerank.stack == ["lr"] and s.answer.llm == "openai:gpt-4o-mini"
    assert s.retrieve.candidates == base.retrieve.candidates
    plain = expert_settings(base, ExpertSettings(name="y", collection="d"))
    assert plain.retrieve == base.retrieve and plain.rerank == base.rerank


def test_no_or_duplicate_experts_are_refused(home: Path) -> None:
    with pytest.raises(RoutingError, match="no experts"):
        build_experts(load_settings(home))
    dup = [ExpertSettings(name="a", collection="x"), ExpertSettings(name="a", collection="y")]
    with pytest.raises(RoutingError, match="unique"):
        build_experts(load_settings(home), specs=dup)


def test_untrained_search_goes_to_every_expert_and_fuses(domain_home: Path, fake_cls) -> None:
    rs = _rs(domain_home, fake_cls)
    res = rs.search("star galaxy telescope", k=9)
    assert res.fallback and sorted(res.experts) == sorted(rs.names)
    assert {h.expert for h in res.hits} == set(rs.names)
    assert res.hits[0].expert == "astronomy"


def test_trained_router_sends_queries_to_their_domain(domain_home: Path, fake_cls) -> None:
    rs = _rs(domain_home, fake_cls)
    rep = rs.train([q for q, _ in LABELLED], [e for _, e in LABELLED])
    assert rep["train_accuracy"] == 1.0
    assert (Path(rep["saved"]) / "router.safetensors").is_file()
    for query, want in [
        ("bake the bread in an oven with yeast", "cooking"),
        ("the galaxy seen through the telescope", "astronomy"),
        ("the striker scored the goal", "football"),
    ]:
        res = rs.search(query, k=3)
        assert res.experts == [want] and not res.fallback
        assert {h.expert for h in res.hits} == {want}
        assert res.probs[want] == max(res.probs.values())


def test_saved_router_is_reloaded_and_checked(domain_home: Path, fake_cls) -> None:
    rs = _rs(domain_home, fake_cls)
    rs.train([q for q, _ in LABELLED], [e for _, e in LABELLED])
    again = _rs(domain_home, fake_cls)
    assert again.router is not None
    assert again.search("the striker scored the goal", k=2).experts == ["football"]
    s = load_settings(domain_home)
    s.routing.experts = s.routing.experts[:2]
    with pytest.raises(RoutingError, match="retrain"):
        RoutedSearch.open(s, embedder=fake_cls())
    with pytest.raises(RoutingError, match="retrain"):
        RoutedSearch.open(load_settings(domain_home), embedder=fake_cls(model_id="other"))


def test_forced_experts_and_errors(domain_home: Path, fake_cls) -> None:
    rs = _rs(domain_home, fake_cls)
    res = rs.search("anything at all", k=5, experts=["football"])
    assert res.experts == ["football"] and {h.expert for h in res.hits} == {"football"}
    with pytest.raises(RoutingError, match="unknown expert"):
        rs.search("x", experts=["nope"])
    with pytest.raises(ValueError, match="empty"):
        rs.search("  ")
    with pytest.raises(RoutingError, match="unknown experts"):
        rs.train(["q"], ["nope"])


def test_feedback_learns_online_and_persists(domain_home: Path, fake_cls) -> None:
    rs = _rs(domain_home, fake_cls)
    q = "the referee and the goalkeeper"
    first = rs.feedback(q, "football", relevant=True)
    assert first["prob_after"] > first["prob_before"]
    for _ in range(20):
        out = rs.feedback(q, "football", relevant=True)
    assert out["feedback_total"] == 21
    assert rs.search(q, k=2).experts == ["football"]
    down = rs.feedback(q, "football", relevant=False)
    assert down["prob_after"] < down["prob_before"]
    assert _rs(domain_home, fake_cls).router.meta["feedback"] == 22  # type: ignore[union-attr]


def test_fuse_experts_interleaves_by_rank() -> None:
    def hit(i: str, s: float) -> Hit:
        return Hit(i, "src", i, "", i, 0, 0, 1, 0, score=s)

    fused = fuse_experts({"a": [hit("a1", 100.0), hit("a2", 50.0)], "b": [hit("b1", 0.1)]}, 3)
    assert [h.hit.id for h in fused] in (["a1", "b1", "a2"], ["b1", "a1", "a2"])
    assert [h.expert for h in fuse_experts({"a": [hit("x", 1.0)]}, 5)] == ["a"]


def test_read_labels_accepts_expert_or_domain(tmp_path: Path) -> None:
    f = tmp_path / "l.jsonl"
    f.write_text(
        '{"query": "q1", "expert": "a"}\n\n{"query": "q2", "domain": "b", "split": "test"}\n'
    )
    assert read_labels(f) == (["q1", "q2"], ["a", "b"])
    assert read_labels(f, "test") == (["q2"], ["b"])
    f.write_text('{"query": "q1"}\n')
    with pytest.raises(ValueError, match="'expert'"):
        read_labels(f)


def test_a_routed_query_is_embedded_once(domain_home: Path, fake_cls) -> None:
    """Queries bypass the embedding cache, so the gate's vector must be reused by the
    expert's dense search instead of embedding the query a second time."""
    fake = fake_cls()
    rs = RoutedSearch.open(load_settings(domain_home), embedder=fake)
    rs.train([q for q, _ in LABELLED], [e for _, e in LABELLED], save=False)
    query = "the striker scored the goal tonight"
    res = rs.search(query, k=2)
    assert res.experts == ["football"] and res.hits
    assert fake.seen.count(query) == 1
    rs.embedder.forget()
    rs.search_all(query, k=2)
    assert fake.seen.count(query) == 2  # forgotten: embedded again, once for all experts
