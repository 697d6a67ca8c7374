"""API keys, refusal to run open, upload limits, content checks, traversal, CORS."""

from __future__ import annotations

import io
import json
import zlib
from pathlib import Path
from typing import Any

import pytest
from serverkit import DOCS, upload

from aiprime.config import load_settings
from aiprime.server import ApiKeys, SecurityError, create_app
from aiprime.server.security import check_content, safe_filename


def test_keys_are_hashed_at_rest_and_verified(tmp_path: Path) -> None:
    keys = ApiKeys(tmp_path / "keys.json")
    key = keys.create("ci")
    stored = (tmp_path / "keys.json").read_text()
    secret = key[len("aip_") + 13 :]
    assert len(secret) >= 40 and key not in stored and secret not in stored
    assert (tmp_path / "keys.json").stat().st_mode & 0o077 == 0  # owner-only file
    key_id = keys.verify(key)
    assert key_id is not None and key_id in stored
    assert keys.verify(key[:-1] + ("A" if key[-1] != "A" else "B")) is None
    assert keys.verify("aip_" + "0" * 12 + "_" + "x" * 43) is None
    assert keys.verify(None) is None and keys.verify("") is None
    assert keys.revoke(key_id) and keys.verify(key) is None


def test_requests_need_a_valid_key(make_client: Any) -> None:
    c = make_client(keys=True)
    assert c.post("/v1/search", json={"query": "x"}).status_code == 404  # authorised
    bare = {"Authorization": ""}
    r = c.post("/v1/search", json={"query": "x"}, headers=bare)
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    r = c.post("/v1/search", json={"query": "x"}, headers={"Authorization": "Bearer aip_nope"})
    assert r.status_code == 401
    r = c.post("/v1/search", json={"query": "x"}, headers={"Authorization": "", "X-API-Key": c.key})
    assert r.status_code == 404
    assert c.get("/metrics", headers=bare).status_code == 401
    assert c.get("/healthz", headers=bare).status_code == 200  # probes stay open
    assert upload(c, DOCS, headers=bare).status_code == 401


def test_no_auth_only_when_allowed_and_on_loopback(home: Path) -> None:
    with pytest.raises(SecurityError, match="no API keys"):
        create_app(load_settings(home), multimodal=None)
    with pytest.raises(SecurityError, match="loopback"):
        create_app(
            load_settings(home, serve={"allow_no_auth": True, "host": "0.0.0.0"}), multimodal=None
        )
    create_app(load_settings(home, serve={"allow_no_auth": True, "host": "::1"}), multimodal=None)


@pytest.mark.parametrize(
    "name",
    [
        "../../etc/passwd.md",
        "/etc/x.md",
        "..\\..\\win.md",
        "a/../../b.md",
        ".hidden.md",
        "\x00evil.md",
        "..md",
        "CON/../x.md",
    ],
)
def test_file_names_cannot_escape(make_client: Any, home: Path, name: str) -> None:
    c = make_client()
    r = upload(c, {name: "# T\n\nsome text here\n"})
    assert r.status_code in (200, 400), r.text
    uploads = (home / "serve" / "uploads").resolve()
    for p in home.rglob("*"):
        if p.is_file() and p.suffix == ".md":
            assert p.resolve().parent == uploads / "default", p
    if r.status_code == 200:
        (stored,) = r.json()["files"]
        assert "/" not in stored and "\\" not in stored and not stored.startswith(".")


def test_safe_filename() -> None:
    assert safe_filename("../../a b.md") == "a b.md"
    assert safe_filename("C:\\Users\\x\\notes.txt") == "notes.txt"
    assert safe_filename("ré$umé.md") == "r_um_.md" or safe_filename("ré$umé.md").endswith(".md")
    with pytest.raises(ValueError):
        safe_filename("..")
    with pytest.raises(ValueError):
        safe_filename("noext")


def test_view_file_rejects_traversal(client: Any) -> None:
    upload(client, DOCS)
    for bad in ["..%2F..%2Fapi_keys.json", "%2E%2E", "..", "x.md"]:
        r = client.get(f"/v1/collections/default/files/{bad}")
        assert 400 <= r.status_code < 500, (bad, r.status_code)  # ".." is normalised away


def test_upload_size_limits(make_client: Any) -> None:
    c = make_client(max_upload_bytes=1000, max_request_bytes=64 * 1024, max_files=2)
    r = upload(c, {"big.md": "x " * 600})
    assert r.status_code == 413 and "big.md" in r.json()["error"]["message"]
    r = upload(c, {"a.md": "a", "b.md": "b", "c.md": "c"})
    assert r.status_code == 413 and "files" in r.json()["error"]["message"]
    r = c.post(
        "/v1/search",
        content=b"{" + b" " * 70_000 + b"}",
        headers={"content-type": "application/json"},
    )
    assert r.status_code == 413

    # Without Content-Length (chunked), the limit holds while the body streams in.
    def chunks() -> Any:
        for _ in range(100):
            yield b" " * 1024

    r = c.post("/v1/search", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413


def _png(w: int, h: int) -> bytes:
    """A valid PNG header for a w x h grey image whose pixel data is tiny (zlib of zeros)."""
    import struct

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data))
            + kind
            + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
        )

    raw = zlib.compress(b"\x00" * (w + 1) * min(h, 4))
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", raw) + chunk(b"IEND", b"")


def test_content_checks() -> None:
    from aiprime.server.security import ContentError

    assert check_content("a.md", b"# hi", "text/markdown", 100) == "text"
    with pytest.raises(ContentError, match="NUL"):
        check_content("a.md", b"\x00\x01", None, 100)
    with pytest.raises(ContentError, match="UTF-8"):
        check_content("a.txt", b"\xff\xfe\xfa", None, 100)
    with pytest.raises(ContentError, match="PDF"):
        check_content("a.pdf", b"<html>", "application/pdf", 100)
    with pytest.raises(ContentError, match="image"):
        check_content("a.png", b"#!/bin/sh\n", "image/png", 100)
    with pytest.raises(ContentError, match="declared content type"):
        check_content("a.md", b"# hi", "image/png", 100)
    # A 100k x 100k PNG is a few hundred bytes: refused from its header, never decoded.
    bomb = _png(100_000, 100_000)
    assert len(bomb) < 1000
    with pytest.raises(ContentError, match="pixels") as e:
        check_content("bomb.png", bomb, "image/png", 40_000_000)
    assert e.value.status == 413


def test_content_checks_through_the_api(client: Any) -> None:
    files = [("files", ("evil.pdf", b"MZ\x90\x00 not a pdf", "application/pdf"))]
    r = client.post("/v1/ingest", files=files)
    assert r.status_code == 415 and "evil.pdf" in r.json()["error"]["message"]
    files = [("files", ("run.exe", b"MZ", "application/octet-stream"))]
    r = client.post("/v1/ingest", files=files)
    assert r.status_code == 415 and "unsupported file type" in r.json()["error"]["message"]
    files = [("files", ("bomb.png", _png(50_000, 50_000), "image/png"))]
    r = client.post("/v1/ingest", files=files)
    assert r.status_code == 413 and "pixels" in r.json()["error"]["message"]
    # A valid small image is accepted by the checks but this server has no multimodal.
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8, 8), "red").save(buf, "PNG")
    r = client.post("/v1/ingest", files=[("files", ("red.png", buf.getvalue(), "image/png"))])
    assert r.status_code == 501 and "multimodal" in r.json()["error"]["message"]
    r = client.post("/v1/search/image", files={"image": ("q.png", buf.getvalue(), "image/png")})
    assert r.status_code == 501
    r = client.post("/v1/search/image", files={"image": ("q.png", b"not an image", "image/png")})
    assert r.status_code == 415
    assert client.post("/v1/ingest", data={"collection": "default"}).status_code == 422


def test_cors_is_off_by_default_and_on_for_listed_origins(make_client: Any) -> None:
    pre = {"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"}
    c = make_client()
    r = c.options("/v1/search", headers=pre)
    assert "access-control-allow-origin" not in r.headers
    r = c.get("/healthz", headers={"Origin": "https://evil.example"})
    assert "access-control-allow-origin" not in r.headers
    c2 = make_client(cors_origins=["https://app.example"])
    ok = {**pre, "Origin": "https://app.example"}
    r = c2.options("/v1/search", headers=ok)
    assert r.headers["access-control-allow-origin"] == "https://app.example"
    r = c2.options("/v1/search", headers=pre)
    assert "access-control-allow-origin" not in r.headers


def test_no_pickle_or_unsafe_torch_load_in_the_service() -> None:
    root = Path(__file__).resolve().parents[2] / "src" / "aiprime"
    for p in [*(root / "server").rglob("*.py"), root / "cli_serve.py"]:
        text = p.read_text()
        assert "pickle" not in text and "torch.load" not in text, p
    assert json  # the persisted job and key files are JSON
