"""``make demo``: build a knowledge base from the project's own docs and search it.

Runs the real CLI in-process, so what it shows is exactly what a user would type. Needs
nothing outside the repository; with ``../shared/data`` present it says what more to try.
"""

from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("LANCE_LOG", "error")

from rich.console import Console
from rich.rule import Rule

ROOT = Path(__file__).resolve().parents[2]
console = Console()

QUESTIONS = [
    "how does ingestion survive a crash in the middle of a batch?",
    "which embedding model runs offline and how is it made faster on CPU?",
    "reciprocal rank fusion versus normalized score mix",
    "What nDCG@10 does hybrid retrieval reach on SciFact?",
]


# Answered from the docs with citations; the last one is not in them and must be refused.
ASK = [
    "How does ingestion survive a crash in the middle of a batch?",
    "Which embedding model runs offline, and how is it made faster on a CPU?",
    "How is the load-balancing loss of the MoE router computed?",
    "What is the boiling point of tungsten?",
]


def run(*args: str) -> None:
    from aiprime.cli import app

    console.print(f"[bold magenta]$ aiprime {shlex.join(args)}[/bold magenta]")
    try:
        app(list(args), standalone_mode=False)
    except SystemExit as e:  # typer.Exit inside standalone_mode=False
        if e.code:
            raise
    console.print()


def main() -> None:
    home = Path(os.environ.get("AIPRIME_HOME", ROOT / ".aiprime-home" / "demo"))
    os.environ["AIPRIME_HOME"] = str(home)
    os.environ.setdefault("AIPRIME_PROGRESS", "1")
    kb_paths = [p for p in (ROOT / "README.md", ROOT / "docs") if p.exists()]
    if not kb_paths:
        console.print("[red]no README.md or docs/ found: run the demo from a clone[/red]")
        sys.exit(1)
    console.print(Rule("aiprime demo · retrieval over the project's own documentation"))
    console.print(f"data directory: {home}\n")
    rel = [
        str(p.relative_to(Path.cwd())) if p.is_relative_to(Path.cwd()) else str(p) for p in kb_paths
    ]
    run("ingest", *rel)
    console.print("[dim]Ingesting again is incremental: unchanged files are skipped.[/dim]")
    run("ingest", *rel)
    run("sources")
    for q in QUESTIONS:
        run("search", q, "-k", "3")
    run("search", "bm25 stemming", "-k", "2", "--mode", "bm25")
    console.print(Rule("cited answers (offline, extractive)"))
    for q in ASK:
        run("ask", q)
    from aiprime.multimodal.demo import run_demo as mm_demo

    fashion = ROOT.parent / "shared" / "data" / "fashion"
    mm_demo(run, console, fashion if (fashion / "captions.csv").is_file() else None)
    from aiprime.routing.demo import run_demo as routing_demo

    console.print(Rule("query routing · a learned router over two expert collections"))
    routing_demo(run, console, ROOT.parent / "shared" / "data")
    scifact = ROOT.parent / "shared" / "data" / "scifact"
    console.print(Rule("next steps"))
    if scifact.is_dir():
        console.print(
            "SciFact is available. Reproduce the retrieval figures of docs/results.md with:\n"
            f"  aiprime eval beir {scifact} --split test --retriever hybrid --tune-on train"
        )
    else:
        console.print("Evaluate on any BEIR folder: aiprime eval beir DATASET_DIR --split test")
    console.print("Search your own files: aiprime ingest ~/notes && aiprime search 'question'")
    console.print(
        f"Serve it over HTTP: AIPRIME_HOME={home} aiprime serve --allow-no-auth\n"
        "  then open http://127.0.0.1:8000/ in a browser (search, cited answers, uploads; "
        "API docs at /docs)"
    )


if __name__ == "__main__":
    main()
