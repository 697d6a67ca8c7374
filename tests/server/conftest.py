"""Fixtures for the service tests: an app over the fake embedder, in-process or on a port.
Plain helpers live in ``serverkit`` (the server worker process imports them too)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from serverkit import LiveServer, fake_factory


@pytest.fixture
def make_client(home: Path, fake_cls: type) -> Iterator[Callable[..., Any]]:
    """``make_client(keys=False, mm=None, **serve)``: a started TestClient; with ``keys``
    one API key is created first and sent by the client (``client.key``)."""
    from fastapi.testclient import TestClient

    from aiprime.config import load_settings
    from aiprime.server import ApiKeys, create_app

    opened: list[Any] = []

    def _make(keys: bool = False, mm: Any = None, **serve: Any) -> Any:
        serve.setdefault("allow_no_auth", not keys)
        s = load_settings(home, serve=serve, rerank={"stack": []})
        key = ApiKeys(s.home / "serve" / "api_keys.json").create("test") if keys else None
        app = create_app(s, fake_factory(fake_cls), multimodal=mm)
        client = TestClient(app, raise_server_exceptions=False)
        client.__enter__()
        client.key = key  # type: ignore[attr-defined]
        if key:
            client.headers["Authorization"] = f"Bearer {key}"
        opened.append(client)
        return client

    yield _make
    for c in opened:
        c.__exit__(None, None, None)


@pytest.fixture
def client(make_client: Callable[..., Any]) -> Any:
    return make_client()


@pytest.fixture
def live_server(home: Path) -> Iterator[Callable[..., LiveServer]]:
    """``live_server(*worker_args)``: the service in its own process on a loopback port."""
    started: list[LiveServer] = []

    def _start(*args: str) -> LiveServer:
        srv = LiveServer(home, *args).start()
        started.append(srv)
        return srv

    yield _start
    for s in started:
        s.stop()
