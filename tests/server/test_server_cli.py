"""``aiprime serve``: key management and the refusal to serve openly, without a server."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from aiprime import cli


@pytest.fixture
def run(home: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    """``run(*args)``; ``run.served`` records what uvicorn.run would have served."""
    import uvicorn

    served: list[dict[str, Any]] = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: served.append({"app": app, **kw}))
    runner = CliRunner()

    def _run(*args: str) -> Any:
        return runner.invoke(cli.app, list(args), catch_exceptions=False)

    _run.served = served  # type: ignore[attr-defined]
    return _run


def test_serve_refuses_without_keys_and_off_loopback(run: Any) -> None:
    r = run("serve")
    assert r.exit_code == 2 and "no API keys" in r.output
    r = run("serve", "--allow-no-auth", "--host", "0.0.0.0")
    assert r.exit_code == 2 and "loopback" in r.output
    assert run.served == []
    r = run("serve", "--allow-no-auth", "--port", "8123")
    assert r.exit_code == 0, r.output
    (call,) = run.served
    assert call["host"] == "127.0.0.1" and call["port"] == 8123 and call["workers"] == 1


def test_add_list_revoke_keys(run: Any, home: Path) -> None:
    r = run("serve", "add-key", "ci")
    assert r.exit_code == 0, r.output
    key = r.stdout.strip().splitlines()[-1]
    assert key.startswith("aip_")
    stored = (home / "serve" / "api_keys.json").read_text()
    assert key not in stored
    key_id = next(iter(json.loads(stored)["keys"]))
    assert key_id in run("serve", "list-keys").stdout
    # With a key, the service starts on any address (all requests need the key).
    assert run("serve", "--host", "0.0.0.0").exit_code == 0
    assert run("serve", "revoke-key", key_id).exit_code == 0
    assert run("serve", "revoke-key", key_id).exit_code == 1
    assert run("serve").exit_code == 2  # no key left


def test_api_key_file_option(run: Any, tmp_path: Path) -> None:
    f = tmp_path / "keys" / "k.json"
    assert run("serve", "add-key", "x", "--api-key-file", str(f)).exit_code == 0
    assert f.is_file()
    assert run("serve", "--api-key-file", str(f)).exit_code == 0
