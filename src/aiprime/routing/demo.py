"""Demo of query routing over the project's own docs, split into two domain experts.

``run_demo(run, console, data)`` is called by ``make demo`` (``aiprime.demo``): ``run(*args)``
runs one ``aiprime`` command in-process. It needs nothing outside the repository: the
experts are the MoE docs and the RAG docs, the labelled queries are written below.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[3]

EXPERTS = {
    "moe": ["docs/moe.md", "docs/moe_lm.md"],
    "rag": ["docs/rag.md", "docs/architecture.md"],
}

LABELS = {
    "moe": [
        "how are tokens routed to experts",
        "load balancing loss for the router",
        "expert capacity and dropped tokens",
        "top-k gating with softmax",
        "train the mixture of experts language model",
        "expert parallelism with all-to-all",
        "router z-loss",
        "shared experts and fine-grained experts",
    ],
    "rag": [
        "how are documents chunked before embedding",
        "hybrid search with bm25 and dense vectors",
        "re-ranking with a cross-encoder",
        "ingest files into the knowledge base",
        "evaluate retrieval on a BEIR dataset",
        "reciprocal rank fusion",
        "which embedding model is used offline",
        "store crash safety during ingestion",
    ],
}

QUESTIONS = [
    "why does the gate need an auxiliary balancing loss?",
    "how is a PDF split into chunks?",
]


def run_demo(
    run: Callable[..., Any], console: Any, data: Path | None = None, home: Path | None = None
) -> Path:
    """Ingest two doc collections, declare them as experts, train the router on 16
    labelled queries, route two questions and learn from one piece of feedback.

    ``home`` defaults to ``.aiprime-home/route-demo`` (its own data directory, so the
    expert declarations never touch the main demo's configuration)."""
    home = home or ROOT / ".aiprime-home" / "route-demo"
    home.mkdir(parents=True, exist_ok=True)
    console.print(f"[dim]routing demo data directory: {home}[/dim]")
    config = "".join(
        f'[[routing.experts]]\nname = "{n}"\ncollection = "{n}-docs"\nrerank = []\n\n'
        for n in EXPERTS
    )
    (home / "config.toml").write_text(config)
    labels = home / "labels.jsonl"
    labels.write_text(
        "".join(
            json.dumps({"query": q, "expert": e}) + "\n" for e, qs in LABELS.items() for q in qs
        )
    )
    h = ["--home", str(home)]
    for name, files in EXPERTS.items():
        paths = [str(ROOT / f) for f in files if (ROOT / f).exists()]
        run(*h, "-c", f"{name}-docs", "ingest", *paths)
    run(*h, "route", "experts")
    run(*h, "route", "train", str(labels))
    for q in QUESTIONS:
        run(*h, "route", "query", q, "-k", "2")
    run(*h, "route", "feedback", QUESTIONS[0], "--expert", "moe")
    if data is not None and (Path(data) / "scifact").is_dir():
        console.print(
            "The routing experiments (docs/routing.md) rebuild four domain experts from "
            f"{data}: aiprime --home out/routehome route eval build-domains {data}"
        )
    return home
