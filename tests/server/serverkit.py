"""Helpers shared by the service tests and the server worker process (not fixtures)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

WORKER = Path(__file__).with_name("server_worker.py")

DOCS = {
    "tides.md": "# Tides\n\nThe moon's gravity pulls the oceans, causing tides twice a day.\n",
    "volcano.md": "# Volcanoes\n\nMagma rises through the crust and erupts as lava.\n",
    "glacier.txt": "Glaciers carve valleys as compacted snow slowly flows downhill.\n",
}


def fake_factory(fake_cls: type, delay_s: float = 0.0) -> Callable[[Any, str], Any]:
    """Knowledge bases over one shared fake embedder, without re-ranking."""
    from aiprime.rag.kb import KnowledgeBase

    emb = fake_cls(delay_s=delay_s)

    def make(settings: Any, collection: str) -> KnowledgeBase:
        return KnowledgeBase(settings, collection=collection, embedder=emb, reranker=None)

    return make


class FakeMultimodal:
    """A multimodal backend that remembers indexed images and returns them all, by name
    order, to any query: enough to test the service's wiring without a trained model."""

    def __init__(self) -> None:
        self.images: dict[str, str] = {}  # resolved path -> sha256
        self.queries: list[Any] = []

    def index_images(self, collection: str, paths: list[Path]) -> Any:
        import hashlib

        from aiprime.rag.ingest import IngestReport

        rep = IngestReport(files_seen=len(paths))
        for p in paths:
            digest = hashlib.sha256(p.read_bytes()).hexdigest()
            key = str(p.resolve())
            if self.images.get(key) == digest:
                rep.files_unchanged += 1
            else:
                self.images[key] = digest
                rep.files_ingested += 1
                rep.chunks_written += 1
        return rep

    def _hits(self, k: int) -> list[Any]:
        from aiprime.store import Hit

        return [
            Hit(
                id=d[:8],
                source=s,
                doc_id=Path(s).stem,
                title=Path(s).name,
                text="",
                chunk_index=0,
                start=0,
                end=0,
                page=0,
                score=1.0 - i / 100,
                modality="image",
            )
            for i, (s, d) in enumerate(sorted(self.images.items())[:k])
        ]

    def search_text(self, query: str, k: int) -> list[Any]:
        self.queries.append(query)
        return self._hits(k)

    def search_image(self, data: bytes, suffix: str, k: int) -> list[Any]:
        self.queries.append((len(data), suffix))
        return self._hits(k)


def upload(
    client: Any,
    docs: dict[str, str | bytes],
    collection: str = "default",
    wait: bool = True,
    **kw: Any,
) -> Any:
    files = [
        ("files", (n, d.encode() if isinstance(d, str) else d, "text/plain"))
        for n, d in docs.items()
    ]
    return client.post(
        "/v1/ingest",
        params={"wait": str(wait).lower()},
        data={"collection": collection},
        files=files,
        **kw,
    )


def png(w: int = 16, h: int = 16, color: str = "red") -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (w, h), color).save(buf, "PNG")
    return buf.getvalue()


# -- a real server on a loopback port, in its own process -----------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class LiveServer:
    def __init__(self, home: Path, *args: str) -> None:
        self.home = home
        self.args = args
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = home.parent / f"server-{self.port}.log"

    def start(self, timeout: float = 60.0) -> LiveServer:
        env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, str(WORKER), str(self.home), str(self.port), *self.args],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {self.log.read_text()[-3000:]}")
            try:
                if httpx.get(self.url + "/readyz", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"server not ready: {self.log.read_text()[-3000:]}")

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()
