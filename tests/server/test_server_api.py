"""The API over the fake embedder: collections, ingest jobs, search, ask, probes, metrics."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from serverkit import DOCS, upload


def test_ingest_then_search_finds_the_document(client: Any) -> None:
    r = upload(client, DOCS)
    assert r.status_code == 200, r.text
    job = r.json()
    assert job["status"] == "done" and job["files_ingested"] == 3 and job["progress"] == 1.0
    r = client.post("/v1/search", json={"query": "moon gravity tides", "k": 2, "mode": "bm25"})
    assert r.status_code == 200, r.text
    hits = r.json()["hits"]
    assert hits[0]["file"] == "tides.md" and hits[0]["source"] == "tides.md"
    assert "moon" in hits[0]["text"]
    # The uploaded file behind a hit is viewable, as plain text whatever its type.
    f = client.get("/v1/collections/default/files/tides.md")
    assert f.status_code == 200 and f.text == DOCS["tides.md"]
    assert f.headers["content-type"].startswith("text/plain")
    assert f.headers["x-content-type-options"] == "nosniff"


def test_reupload_is_incremental_and_a_changed_file_replaces_its_chunks(client: Any) -> None:
    upload(client, DOCS)
    again = upload(client, DOCS).json()
    assert again["files_unchanged"] == 3 and again["files_ingested"] == 0
    changed = upload(client, {"tides.md": "# Tides\n\nNeap tides happen at quarter moons.\n"})
    assert changed.json()["files_ingested"] == 1
    src = client.get("/v1/collections/default/sources").json()["sources"]
    assert sorted(s["file"] for s in src) == ["glacier.txt", "tides.md", "volcano.md"]
    hits = client.post("/v1/search", json={"query": "neap quarter", "mode": "bm25"}).json()["hits"]
    assert all("gravity" not in h["text"] for h in hits if h["file"] == "tides.md")


def test_background_job_reports_progress(client: Any) -> None:
    r = upload(client, DOCS, wait=False)
    assert r.status_code == 202
    job_id = r.json()["id"]
    assert r.headers["location"] == f"/v1/jobs/{job_id}"
    import time

    for _ in range(200):
        job = client.get(f"/v1/jobs/{job_id}").json()
        if job["status"] in ("done", "failed"):
            break
        time.sleep(0.05)
    assert job["status"] == "done" and job["files_done"] == job["files_total"] == 3
    assert any(j["id"] == job_id for j in client.get("/v1/jobs").json()["jobs"])
    assert client.get("/v1/jobs/" + "0" * 32).status_code == 404
    assert client.post(f"/v1/jobs/{job_id}/resume").status_code == 409  # not failed


def test_collections_create_list_delete(client: Any) -> None:
    assert client.post("/v1/collections", json={"name": "notes"}).status_code == 201
    assert client.post("/v1/collections", json={"name": "notes"}).status_code == 409
    names = {c["name"]: c for c in client.get("/v1/collections").json()["collections"]}
    assert names["notes"]["chunks"] == 0
    # An empty collection answers a search with no hits, not an error.
    r = client.post("/v1/search", json={"query": "anything", "collection": "notes"})
    assert r.status_code == 200 and r.json()["hits"] == []
    upload(client, {"a.md": "# A\n\nalpha beta gamma\n"}, collection="notes")
    assert client.post(
        "/v1/search", json={"query": "alpha", "collection": "notes", "mode": "bm25"}
    ).json()["hits"]
    assert client.delete("/v1/collections/notes").status_code == 204
    assert "notes" not in {c["name"] for c in client.get("/v1/collections").json()["collections"]}
    assert client.delete("/v1/collections/notes").status_code == 404
    r = client.post("/v1/search", json={"query": "alpha", "collection": "notes"})
    assert r.status_code == 404 and "notes" in r.json()["error"]["message"]


def test_search_unknown_collection_and_bad_fields_are_4xx_naming_the_field(client: Any) -> None:
    r = client.post("/v1/search", json={"query": "x", "collection": "nope"})
    assert r.status_code == 404
    r = client.post("/v1/search", json={"query": "x", "k": 0})
    assert r.status_code == 422 and r.json()["error"]["fields"][0]["field"] == "k"
    r = client.post("/v1/search", json={"query": "   "})
    assert r.status_code == 422 and "query" in r.json()["error"]["message"]
    r = client.post("/v1/search", json={"query": "x", "collection": "../etc"})
    assert r.status_code == 422 and "collection" in r.json()["error"]["message"]
    r = client.post("/v1/search", json={"query": "x", "mode": "magic"})
    assert r.status_code == 422 and "mode" in r.json()["error"]["message"]
    r = client.post("/v1/search", json={"query": "x", "k": 101})  # over serve.max_k
    assert r.status_code == 422 and "k" in r.json()["error"]["message"]
    r = client.post(
        "/v1/search", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert r.status_code == 422
    r = client.post("/v1/search", json={"query": "x", "unexpected": 1})
    assert r.status_code == 422 and "unexpected" in r.json()["error"]["message"]


def test_modality_filter(client: Any) -> None:
    upload(client, DOCS)
    r = client.post("/v1/search", json={"query": "lava", "modality": "text", "mode": "bm25"})
    assert r.status_code == 200 and r.json()["hits"]
    assert all(h["modality"] == "text" for h in r.json()["hits"])
    # No multimodal backend on this server: image search says so.
    r = client.post("/v1/search", json={"query": "lava", "modality": "image"})
    assert r.status_code == 501 and "multimodal" in r.json()["error"]["message"]


def test_probes_and_metrics(client: Any) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    import time

    for _ in range(100):
        r = client.get("/readyz")
        if r.status_code == 200:
            break
        time.sleep(0.05)
    assert r.status_code == 200 and r.json()["checks"]["embedder"] is True
    client.post("/v1/search", json={"query": "x", "k": 0})
    m = client.get("/metrics")
    assert m.status_code == 200
    assert (
        'aiprime_http_requests_total{method="POST",route="/v1/search",status="422"} 1.0' in m.text
    )
    assert "aiprime_ingest_jobs" in m.text


def _sse(text: str) -> list[tuple[str, Any]]:
    events = []
    for block in text.strip().split("\n\n"):
        lines = dict(line.split(": ", 1) for line in block.splitlines())
        events.append((lines["event"], json.loads(lines["data"])))
    return events


def test_ask_streams_text_then_a_cited_answer(client: Any) -> None:
    pytest.importorskip("aiprime.rag.answer", reason="cited answers (aiprime.rag.answer) missing")
    upload(client, DOCS)
    q = {"question": "what causes tides?", "stream": True}
    with client.stream("POST", "/v1/ask", json=q) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        events = _sse(r.read().decode())
    names = [e for e, _ in events]
    assert names[-2:] == ["answer", "done"] and "delta" in names
    answer = events[-2][1]
    assert answer["answered"] is True and answer["citations"]
    assert answer["citations"][0]["file"] == "tides.md"
    assert "".join(d["text"] for e, d in events if e == "delta") == answer["text"]
    plain = client.post("/v1/ask", json={"question": "what causes tides?"})
    assert plain.status_code == 200 and plain.json()["text"] == answer["text"]


def test_ask_errors_are_4xx(client: Any) -> None:
    assert client.post("/v1/ask", json={"question": ""}).status_code == 422
    assert client.post("/v1/ask", json={"question": "x", "collection": "nope"}).status_code == 404


def test_web_page_is_served_with_a_strict_csp(client: Any) -> None:
    r = client.get("/")
    assert r.status_code == 200 and 'id="q"' in r.text
    csp = r.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "unsafe-inline" not in csp
    assert client.get("/static/app.js").status_code == 200
    assert client.get("/openapi.json").json()["paths"]["/v1/search"]


def test_collection_of_another_model_is_a_409_not_a_500(client: Any, home: Path) -> None:
    from aiprime.store.lance import LanceStore

    other = LanceStore(home / "store", "other", dim=8, model_id="some-other-model")
    other._ensure_table()
    listed = {c["name"]: c for c in client.get("/v1/collections").json()["collections"]}
    assert listed["other"]["chunks"] == 0
    r = client.post("/v1/search", json={"query": "x", "collection": "other"})
    assert r.status_code == 409 and "some-other-model" in r.json()["error"]["message"]
    assert client.delete("/v1/collections/other").status_code == 204


def test_readyz_reports_a_failed_warm_up(home: Path) -> None:
    import time

    from fastapi.testclient import TestClient

    from aiprime.config import load_settings
    from aiprime.server import create_app

    def broken(settings: Any, collection: str) -> Any:
        raise FileNotFoundError("embedding model 'nope': not a local directory")

    s = load_settings(home, serve={"allow_no_auth": True})
    with TestClient(create_app(s, broken, multimodal=None)) as c:
        for _ in range(100):
            r = c.get("/readyz")
            if "error" in r.json():
                break
            time.sleep(0.05)
        assert r.status_code == 503 and "nope" in r.json()["error"]
        assert c.get("/healthz").status_code == 200
        upload(c, DOCS)  # the model error reaches the client as a 503 or a failed job
        r = c.post("/v1/search", json={"query": "x"})
        assert r.status_code in (404, 503)
