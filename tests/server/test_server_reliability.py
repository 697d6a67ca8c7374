"""Reliability on a real server process over loopback: 50 concurrent clients, and a SIGKILL
in the middle of an ingest job. Bounded: small documents, the fake embedder."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
from serverkit import DOCS

CLIENTS = 50


def _doc(i: int) -> str:
    return f"# Note {i}\n\nThis note holds the marker zq{i:03d}marker and little else.\n"


def _wait_job(c: httpx.Client, job_id: str, timeout: float = 120) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = c.get(f"/v1/jobs/{job_id}").json()
        if job["status"] in ("done", "failed"):
            return dict(job)
        time.sleep(0.1)
    raise AssertionError(f"job {job_id} still {job['status']}")


def test_fifty_concurrent_clients_mixing_search_ask_ingest(live_server: Any) -> None:
    srv = live_server()
    with httpx.Client(base_url=srv.url, timeout=120) as c:
        files = [("files", (n, d.encode(), "text/markdown")) for n, d in DOCS.items()]
        assert c.post("/v1/ingest", params={"wait": "true"}, files=files).status_code == 200

    def client(i: int) -> list[str]:
        errors: list[str] = []

        def check(r: httpx.Response, what: str) -> httpx.Response:
            if r.status_code >= 300:
                errors.append(f"client {i} {what}: {r.status_code} {r.text[:200]}")
            return r

        with httpx.Client(base_url=srv.url, timeout=120) as c:
            r = check(
                c.post(
                    "/v1/ingest",
                    files=[("files", (f"note{i:03d}.md", _doc(i).encode(), "text/markdown"))],
                ),
                "ingest",
            )
            job_id = r.json().get("id")
            modes = ["bm25", "dense", "hybrid"]
            for j in range(3):
                check(
                    c.post(
                        "/v1/search",
                        json={"query": "moon tides lava", "k": 5, "mode": modes[(i + j) % 3]},
                    ),
                    "search",
                )
            if i % 2:
                r = check(
                    c.post("/v1/ask", json={"question": "what causes tides?", "stream": True}),
                    "ask",
                )
                if "event: done" not in r.text or "event: error" in r.text:
                    errors.append(f"client {i} ask stream: {r.text[-200:]}")
            else:
                check(c.post("/v1/ask", json={"question": "why does lava erupt?"}), "ask")
            if job_id:
                job = _wait_job(c, job_id)
                if job["status"] != "done" or job["errors"]:
                    errors.append(f"client {i} job: {job}")
        return errors

    with ThreadPoolExecutor(CLIENTS) as pool:
        errors = [e for errs in pool.map(client, range(CLIENTS)) for e in errs]
    assert errors == []
    with httpx.Client(base_url=srv.url, timeout=60) as c:
        sources = c.get("/v1/collections/default/sources").json()["sources"]
        names = sorted(s["file"] for s in sources)
        assert names == sorted([*DOCS, *(f"note{i:03d}.md" for i in range(CLIENTS))])
        for i in range(0, CLIENTS, 7):  # each document is found by its own marker
            hits = c.post(
                "/v1/search", json={"query": f"zq{i:03d}marker", "mode": "bm25", "k": 1}
            ).json()["hits"]
            assert hits and hits[0]["file"] == f"note{i:03d}.md"


def _store_state(home: Path) -> tuple[dict[str, int], int, int]:
    """(versions per source, rows, distinct chunk ids) read straight from the store."""
    from aiprime.store.lance import LanceStore

    store = LanceStore(home / "store", "default")
    if store.table is None:
        return {}, 0, 0
    versions = {s: len(v) for s, v in store._versions().items()}
    ids = store._scan(store.table, ["id"]).column("id").to_pylist()
    return versions, len(ids), len(set(ids))


def test_sigkill_mid_ingest_then_restart_resumes_without_duplicates(
    live_server: Any, home: Path, tmp_path: Path, fake_cls: type
) -> None:
    docs = {f"part{i:02d}.md": _doc(i) + f"\nSection {i} continues here.\n" for i in range(12)}
    srv = live_server("--delay", "0.25", "--group", "2")
    with httpx.Client(base_url=srv.url, timeout=60) as c:
        files = [("files", (n, d.encode(), "text/markdown")) for n, d in docs.items()]
        job_id = c.post("/v1/ingest", files=files).json()["id"]
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            job = c.get(f"/v1/jobs/{job_id}").json()
            if job["files_done"] >= 2:
                break
            time.sleep(0.02)
    assert job["status"] == "running" and 2 <= job["files_done"] < 12, job
    srv.kill()  # SIGKILL: no shutdown hook runs

    versions, rows, distinct = _store_state(home)
    assert 0 < len(versions) < 12  # part of the job was committed, not all of it
    assert rows == distinct  # no chunk stored twice, even mid-write

    srv2 = live_server("--group", "2")  # same data directory: the job resumes by itself
    with httpx.Client(base_url=srv2.url, timeout=60) as c:
        job = _wait_job(c, job_id)
        assert job["status"] == "done" and job["attempts"] == 2 and not job["errors"], job
        assert job["files_unchanged"] >= len(versions) - 1  # committed files were skipped
        # Uploading the same files again changes nothing.
        again = c.post("/v1/ingest", params={"wait": "true"}, files=files).json()
        assert again["files_unchanged"] == 12 and again["files_ingested"] == 0

    versions, rows, distinct = _store_state(home)
    assert len(versions) == 12 and set(versions.values()) == {1}
    assert rows == distinct
    # Exactly the chunks a clean, uninterrupted ingest of the same files produces.
    ref_dir = tmp_path / "ref"
    ref_dir.mkdir()
    for n, d in docs.items():
        (ref_dir / n).write_text(d)
    from aiprime.config import load_settings
    from aiprime.rag.kb import KnowledgeBase

    ref = KnowledgeBase(load_settings(tmp_path / "refhome"), embedder=fake_cls(), reranker=None)
    assert ref.ingest([ref_dir]).files_ingested == 12
    assert rows == ref.store.count()
