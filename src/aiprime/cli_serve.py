"""``aiprime serve``: run the HTTP service, and manage its API keys.

FastAPI, uvicorn and the models are imported inside the commands so that ``aiprime --help``
stays fast.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape

serve_app = typer.Typer(
    help="The HTTP service: `aiprime serve` runs it; sub-commands manage API keys.",
    invoke_without_command=True,
)
console = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)


def _settings(api_key_file: Path | None = None, **serve: Any) -> Any:
    from aiprime.cli import settings

    s = settings()
    updates = {k: v for k, v in serve.items() if v is not None}
    if api_key_file is not None:
        updates["api_keys_file"] = api_key_file
    return s.model_copy(update={"serve": s.serve.model_copy(update=updates)})


def _keys(api_key_file: Path | None) -> Any:
    from aiprime.server.security import ApiKeys

    s = _settings(api_key_file)
    return ApiKeys(s.serve.api_keys_file or s.home / "serve" / "api_keys.json")


KeyFile = Annotated[
    Path | None,
    typer.Option("--api-key-file", help="Hashed API keys (default: HOME/serve/api_keys.json)."),
]


@serve_app.callback()
def serve(
    ctx: typer.Context,
    host: Annotated[
        str | None, typer.Option("--host", help="Address to bind (default 127.0.0.1).")
    ] = None,
    port: Annotated[int | None, typer.Option("--port", help="Port (default 8000).")] = None,
    api_key_file: KeyFile = None,
    allow_no_auth: Annotated[
        bool,
        typer.Option(
            "--allow-no-auth",
            help="Serve without API keys; refused unless bound to a loopback address.",
        ),
    ] = False,
    cors_origin: Annotated[
        list[str] | None,
        typer.Option(
            "--cors-origin", help="Allow this browser origin (repeatable; none by default)."
        ),
    ] = None,
    log_level: Annotated[str, typer.Option("--log-level")] = "info",
) -> None:
    """Start the service over the data directory's store (web page at /, API docs at /docs)."""
    if ctx.invoked_subcommand is not None:
        return
    from aiprime.server import SecurityError, create_app

    s = _settings(
        api_key_file,
        host=host,
        port=port,
        allow_no_auth=allow_no_auth or None,
        cors_origins=cors_origin or None,
    )
    try:
        app = create_app(s)
    except SecurityError as e:
        err.print(f"[red]error:[/red] {escape(str(e))}")
        raise typer.Exit(2) from None
    import uvicorn

    shown = f"[{s.serve.host}]" if ":" in s.serve.host else s.serve.host
    err.print(
        f"aiprime serving {escape(str(s.home))} on http://{shown}:{s.serve.port}/ "
        "(web page at /, API docs at /docs)"
    )
    # One process: the ingest job worker and the job files assume a single server.
    uvicorn.run(app, host=s.serve.host, port=s.serve.port, log_level=log_level, workers=1)


@serve_app.command("add-key")
def add_key(
    name: Annotated[str, typer.Argument(help="Who or what the key is for.")],
    api_key_file: KeyFile = None,
) -> None:
    """Create an API key; it is printed once and only its scrypt hash is stored."""
    keys = _keys(api_key_file)
    key = keys.create(name)
    err.print(f"key for {escape(name)!s} stored (hashed) in {escape(str(keys.path))}")
    console.print(key)


@serve_app.command("list-keys")
def list_keys(api_key_file: KeyFile = None) -> None:
    """Key ids and names (the keys themselves are not stored)."""
    for k in _keys(api_key_file).list():
        console.print(f"{k.id}  {escape(k.name)}")


@serve_app.command("revoke-key")
def revoke_key(
    key_id: Annotated[str, typer.Argument(help="The id shown by list-keys.")],
    api_key_file: KeyFile = None,
) -> None:
    """Revoke a key; a running server notices at the next request."""
    if not _keys(api_key_file).revoke(key_id):
        err.print(f"[red]error:[/red] no key {escape(key_id)}")
        raise typer.Exit(1)
    console.print(f"revoked {escape(key_id)}")
