"""The query-routing endpoints: experts, routed search, online feedback (issue 7).

Three tiny domain collections on the fake embedder, declared as routing experts, as in
tests/routing; the router is trained in-process (there is no training endpoint) and the
service loads it, or learns one from feedback.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from routing_data import DOMAIN_DOCS, LABELLED

NAMES = list(DOMAIN_DOCS)
FED = "the referee and the goalkeeper"


def _train(home: Path, fake_cls: type) -> None:
    from aiprime.config import load_settings
    from aiprime.routing.pipeline import RoutedSearch

    rs = RoutedSearch.open(load_settings(home), embedder=fake_cls())
    rep = rs.train([q for q, _ in LABELLED], [e for _, e in LABELLED])
    assert rep["train_accuracy"] == 1.0


def _search(client: Any, query: str, **kw: Any) -> dict[str, Any]:
    r = client.post("/v1/route/search", json={"query": query, **kw})
    assert r.status_code == 200, r.text
    out: dict[str, Any] = r.json()
    return out


def _feedback(client: Any, query: str, expert: str, relevant: bool = True) -> dict[str, Any]:
    r = client.post(
        "/v1/route/feedback", json={"query": query, "expert": expert, "relevant": relevant}
    )
    assert r.status_code == 200, r.text
    out: dict[str, Any] = r.json()
    return out


def test_experts_are_listed_with_the_router_state(
    domain_home: Path, fake_cls: type, make_client: Callable[..., Any]
) -> None:
    client = make_client(keys=True)
    r = client.get("/v1/route/experts")
    assert r.status_code == 200, r.text
    body = r.json()
    assert [e["name"] for e in body["experts"]] == NAMES
    assert all(e["chunks"] == 3 and e["mode"] == "hybrid" for e in body["experts"])
    assert body["experts"][0]["collection"] == "cooking" and body["experts"][0]["rerank"] == []
    assert body["router_loaded"] is False and body["router"] is None

    _train(domain_home, fake_cls)
    body = make_client(keys=True).get("/v1/route/experts").json()  # a new app loads it
    assert body["router_loaded"] is True
    assert body["router"]["trained_on"] == len(LABELLED)
    assert body["router"]["feedback"] == 0 and body["router"]["embedder"] == "fake-hash"
    assert body["router"]["path"].endswith("router")


def test_untrained_search_goes_to_every_expert(
    domain_home: Path, make_client: Callable[..., Any]
) -> None:
    res = _search(make_client(keys=True), "star galaxy telescope", k=9)
    assert res["fallback"] is True and sorted(res["experts"]) == sorted(NAMES)
    assert {h["expert"] for h in res["hits"]} == set(NAMES)
    assert res["hits"][0]["expert"] == "astronomy"
    assert set(res["probs"]) == set(NAMES)


def test_search_routes_to_the_right_expert_after_training(
    domain_home: Path, fake_cls: type, make_client: Callable[..., Any]
) -> None:
    _train(domain_home, fake_cls)
    client = make_client(keys=True)
    for query, want in [
        ("bake the bread in an oven with yeast", "cooking"),
        ("the galaxy seen through the telescope", "astronomy"),
        ("the striker scored the goal", "football"),
    ]:
        res = _search(client, query, k=3)
        assert res["query"] == query
        assert res["experts"] == [want] and res["fallback"] is False
        assert res["hits"] and {h["expert"] for h in res["hits"]} == {want}
        assert max(res["probs"], key=res["probs"].get) == want
        assert abs(sum(res["probs"].values()) - 1.0) < 1e-4
        hit = res["hits"][0]
        assert {"score", "expert_score", "doc_id", "text", "source", "scores"} <= set(hit)
        assert set(res["ms"]) == {"route", "experts"}
    two = _search(client, "the striker scored the goal", k=6, top_k=2)
    assert len(two["experts"]) == 2 and two["experts"][0] == "football"


def test_feedback_changes_the_router_and_persists(
    domain_home: Path, make_client: Callable[..., Any]
) -> None:
    client = make_client(keys=True)
    before = _search(client, FED)["probs"]["football"]
    first = _feedback(client, FED, "football")
    assert first["expert"] == "football" and first["relevant"] is True
    assert first["prob_after"] > first["prob_before"] and first["feedback_total"] == 1
    assert (Path(first["saved"]) / "router.safetensors").is_file()
    assert _search(client, FED)["probs"]["football"] > before  # the live router changed
    assert client.get("/v1/route/experts").json()["router_loaded"] is True
    for _ in range(20):
        out = _feedback(client, FED, "football")
    assert out["feedback_total"] == 21
    res = _search(client, FED, k=2)
    assert res["experts"] == ["football"] and not res["fallback"]
    down = _feedback(client, FED, "football", relevant=False)
    assert down["prob_after"] < down["prob_before"] and down["feedback_total"] == 22

    again = make_client(keys=True)  # a restarted service loads the saved router
    body = again.get("/v1/route/experts").json()
    assert body["router_loaded"] is True and body["router"]["feedback"] == 22
    assert _search(again, FED)["probs"]["football"] == pytest.approx(down["prob_after"], abs=1e-5)
    assert _feedback(again, FED, "football")["feedback_total"] == 23


def test_feedback_is_serialised(domain_home: Path, make_client: Callable[..., Any]) -> None:
    """Concurrent verdicts: none is lost (each update starts from the previous one), and
    searches keep answering meanwhile."""
    client = make_client(keys=True)
    svc = client.app.state.service
    errors: list[BaseException] = []

    def feed(i: int) -> None:
        try:
            for _ in range(3):
                svc.route_feedback(FED, NAMES[i % 3], relevant=True)
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    def search() -> None:
        try:
            for _ in range(3):
                assert svc.routed().search(FED, 2).hits
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=feed, args=(i,)) for i in range(6)]
    threads += [threading.Thread(target=search) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    assert svc.routed().router.meta["feedback"] == 18
    saved = json.loads((svc.routed().router_dir / "router.json").read_text())
    assert saved["meta"]["feedback"] == 18


def test_bad_input_is_a_clean_4xx(domain_home: Path, make_client: Callable[..., Any]) -> None:
    client = make_client(keys=True, max_k=20)

    def err(r: Any, status: int, field: str) -> None:
        assert r.status_code == status, r.text
        assert field in r.json()["error"]["message"]

    search = "/v1/route/search"
    feedback = "/v1/route/feedback"
    err(client.post(feedback, json={"query": FED, "expert": "nope"}), 422, "expert")
    err(client.post(feedback, json={"query": FED, "expert": "../x"}), 422, "expert")
    err(client.post(feedback, json={"query": FED}), 422, "expert")
    err(client.post(feedback, json={"query": "   ", "expert": "football"}), 422, "query")
    err(client.post(feedback, json={"query": "a\x00b", "expert": "football"}), 422, "query")
    err(client.post(feedback, json={"query": FED, "expert": "football", "relevant": "x"}),
        422, "relevant")  # fmt: skip
    err(client.post(search, json={"query": ""}), 422, "query")
    err(client.post(search, json={"query": " \t "}), 422, "query")
    err(client.post(search, json={"query": "x" * 3000}), 422, "query")
    err(client.post(search, json={"query": FED, "k": 21}), 422, "k")
    err(client.post(search, json={"query": FED, "k": 0}), 422, "k")
    err(client.post(search, json={"query": FED, "top_k": 0}), 422, "top_k")
    err(client.post(search, json={"query": FED, "top_k": 4}), 422, "top_k")
    err(client.post(search, json={"query": FED, "experts": ["x"]}), 422, "experts")
    err(client.post(search, content=b"{not json", headers={"content-type": "application/json"}),
        422, "")  # fmt: skip
    assert "fields" in client.post(search, json={"query": FED, "k": 0}).json()["error"]
    # nothing was learnt from the refused feedback
    assert client.get("/v1/route/experts").json()["router_loaded"] is False

    anon_keyed = make_client(keys=True)  # API-key protected like every /v1 route
    anon_keyed.headers.pop("Authorization")
    for method, path, body in [
        ("GET", "/v1/route/experts", None),
        ("POST", search, {"query": FED}),
        ("POST", feedback, {"query": FED, "expert": "football"}),
    ]:
        assert anon_keyed.request(method, path, json=body).status_code == 401


def test_no_experts_configured(make_client: Callable[..., Any]) -> None:
    client = make_client(keys=True)
    r = client.get("/v1/route/experts")
    assert r.status_code == 200 and r.json() == {
        "experts": [],
        "router_loaded": False,
        "router": None,
    }
    for path, body in [
        ("/v1/route/search", {"query": "anything"}),
        ("/v1/route/feedback", {"query": "anything", "expert": "football"}),
    ]:
        r = client.post(path, json=body)
        assert r.status_code == 409, r.text
        assert "routing.experts" in r.json()["error"]["message"]


def test_a_router_for_other_experts_is_a_409(
    domain_home: Path, fake_cls: type, make_client: Callable[..., Any]
) -> None:
    _train(domain_home, fake_cls)
    cfg = domain_home / "config.toml"
    cfg.write_text(cfg.read_text().rsplit("[[routing.experts]]", 1)[0])  # drop 'football'
    client = make_client(keys=True)
    r = client.post("/v1/route/search", json={"query": "the striker"})
    assert r.status_code == 409 and "retrain" in r.json()["error"]["message"]
    assert client.get("/v1/route/experts").status_code == 409


def test_routes_are_counted_in_metrics(domain_home: Path, make_client: Callable[..., Any]) -> None:
    client = make_client(keys=True)
    _search(client, FED)
    _feedback(client, FED, "football")
    client.post("/v1/route/feedback", json={"query": FED, "expert": "nope"})
    text = client.get("/metrics").text
    assert 'route="/v1/route/search",status="200"' in text
    assert 'route="/v1/route/feedback",status="200"' in text
    assert 'route="/v1/route/feedback",status="422"' in text
