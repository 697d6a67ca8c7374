"""Image ingest and image search through the service's multimodal interface (a fake
backend here: the wiring, validation and URLs, not the model), and the 501 without one."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from serverkit import FakeMultimodal, png


def test_image_upload_and_searches_through_the_backend(make_client: Any) -> None:
    mm = FakeMultimodal()
    c = make_client(mm=mm)
    files = [
        ("files", ("red.png", png(color="red"), "image/png")),
        ("files", ("notes.md", b"# Notes\n\nred squares\n", "text/markdown")),
    ]
    job = c.post("/v1/ingest", params={"wait": "true"}, files=files).json()
    assert job["status"] == "done" and job["files_ingested"] == 2, job
    assert [Path(p).name for p in mm.images] == ["red.png"]  # the text went to the KB
    r = c.post("/v1/search", json={"query": "a red square", "modality": "image"})
    assert r.status_code == 200, r.text
    (hit,) = r.json()["hits"]
    assert hit["modality"] == "image" and hit["file"] == "red.png"
    assert hit["url"] == "/v1/collections/default/files/red.png"
    img = c.get(hit["url"])
    assert img.status_code == 200 and img.headers["content-type"] == "image/png"
    assert img.content == png(color="red")
    r = c.post("/v1/search/image", files={"image": ("q.png", png(color="blue"), "image/png")})
    assert r.status_code == 200 and r.json()["hits"][0]["file"] == "red.png"
    assert mm.queries[-1] == (len(png(color="blue")), ".png")
    # Same image again: unchanged.
    again = c.post("/v1/ingest", params={"wait": "true"}, files=files[:1]).json()
    assert again["files_unchanged"] == 1


def test_without_a_model_the_service_says_why(home: Path, fake_cls: type) -> None:
    from fastapi.testclient import TestClient
    from serverkit import fake_factory

    from aiprime.config import load_settings
    from aiprime.server import create_app
    from aiprime.server.multimodal import unavailable_reason

    s = load_settings(home, serve={"allow_no_auth": True}, rerank={"stack": []})
    reason = unavailable_reason(s)
    assert reason is not None  # nothing trained in a fresh data directory
    with TestClient(create_app(s, fake_factory(fake_cls))) as c:
        assert c.get("/v1/info").json()["multimodal"] is False
        r = c.post("/v1/search", json={"query": "red", "modality": "image"})
        assert r.status_code == 501 and reason in r.json()["error"]["message"]
        r = c.post("/v1/ingest", files=[("files", ("red.png", png(), "image/png"))])
        assert r.status_code == 501 and "red.png" in r.json()["error"]["message"]


@pytest.mark.slow
def test_real_multimodal_index_behind_the_api(home: Path, fake_cls: type) -> None:
    """An (untrained, tiny) dual encoder saved where ``aiprime mm train`` puts one: the
    service finds it, indexes uploaded images and searches them by text and by image."""
    pytest.importorskip("aiprime.multimodal.search", reason="aiprime.multimodal missing")
    from fastapi.testclient import TestClient
    from serverkit import fake_factory

    from aiprime.config import load_settings
    from aiprime.multimodal.model import DualEncoder, ModelConfig, save_model
    from aiprime.server import create_app

    s = load_settings(home, serve={"allow_no_auth": True}, rerank={"stack": []})
    s.ensure_dirs()
    save_model(
        DualEncoder(ModelConfig(image_size=32, embed_dim=16, cnn_width=8)), s.models_dir / "mm"
    )
    with TestClient(create_app(s, fake_factory(fake_cls))) as c:
        assert c.get("/v1/info").json()["multimodal"] is True
        files = [("files", (f"{col}.png", png(color=col), "image/png")) for col in ("red", "blue")]
        job = c.post("/v1/ingest", params={"wait": "true"}, files=files).json()
        assert job["status"] == "done" and job["files_ingested"] == 2, job
        listed = {x["name"]: x for x in c.get("/v1/collections").json()["collections"]}
        assert (
            listed[s.mm.collection]["kind"] == "images" and listed[s.mm.collection]["chunks"] == 2
        )
        r = c.post("/v1/search", json={"query": "a red square", "modality": "image", "k": 5})
        assert r.status_code == 200, r.text
        assert sorted(h["file"] for h in r.json()["hits"]) == ["blue.png", "red.png"]
        r = c.post("/v1/search/image", files={"image": ("q.png", png(color="red"), "image/png")})
        top = r.json()["hits"][0]
        assert top["file"] == "red.png" and top["url"] == "/v1/collections/default/files/red.png"
        assert c.get(top["url"]).content == png(color="red")
