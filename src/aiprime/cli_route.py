"""``aiprime route ...``: train the query router, route and search, feed back, evaluate.

Experts are declared in ``[[routing.experts]]`` of ``config.toml`` (docs/routing.md). torch
and the models are imported inside the commands so that ``aiprime --help`` stays fast.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

route_app = typer.Typer(
    help="Query routing over expert pipelines: train, query, feedback, evaluate.",
    no_args_is_help=True,
)
route_eval_app = typer.Typer(
    help="The routing experiments (docs/routing.md).", no_args_is_help=True
)
route_app.add_typer(route_eval_app, name="eval")
console = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)


def _fail(msg: str) -> None:
    err.print(f"[red]error:[/red] {escape(msg)}")
    raise typer.Exit(1)


def _open() -> Any:
    """The routed search of the current data directory (``--home``), saved router included."""
    from aiprime.cli import settings
    from aiprime.routing.experts import RoutingError
    from aiprime.routing.pipeline import RoutedSearch
    from aiprime.store import StoreError

    try:
        return RoutedSearch.open(settings())
    except (RoutingError, StoreError, FileNotFoundError, ValueError) as e:
        _fail(str(e))


@route_app.command("experts")
def experts_cmd(
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """List the declared experts and whether a router is trained."""
    rs = _open()
    rows = [
        {
            "name": e.name,
            "collection": e.spec.collection,
            "mode": e.spec.mode or e.settings.retrieve.mode,
            "rerank": e.spec.rerank,
            "chunks": e.kb.store.count(),
            "description": e.spec.description,
        }
        for e in rs.experts
    ]
    trained = rs.router is not None
    if as_json:
        console.print_json(
            json.dumps({"experts": rows, "router": str(rs.router_dir) if trained else None})
        )
        return
    t = Table("expert", "collection", "mode", "rerank", "chunks", "description")
    for r in rows:
        rr = "default" if r["rerank"] is None else "+".join(r["rerank"]) or "none"
        t.add_row(r["name"], r["collection"], r["mode"], rr, str(r["chunks"]), r["description"])
    console.print(t)
    console.print(
        f"router: {rs.router_dir if trained else 'not trained (every query goes to all experts)'}"
    )


@route_app.command("train")
def train_cmd(
    labels: Annotated[Path, typer.Argument(help="JSONL: {'query': ..., 'expert': ...} per line.")],
    split: Annotated[
        str | None, typer.Option("--split", help="Only rows whose 'split' field matches.")
    ] = None,
    epochs: Annotated[
        int | None, typer.Option("--epochs", help="Default: [routing].epochs.")
    ] = None,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Train the router on labelled queries and save it (safetensors + JSON)."""
    from aiprime.routing.pipeline import read_labels

    try:
        queries, names = read_labels(labels, split)
    except (OSError, ValueError) as e:
        _fail(str(e))
    if not queries:
        _fail(f"{labels}: no labelled queries" + (f" in split {split!r}" if split else ""))
    rs = _open()
    try:
        report = rs.train(queries, names, epochs=epochs, seed=seed)
    except ValueError as e:
        _fail(str(e))
    report.pop("history", None)
    if as_json:
        console.print_json(json.dumps(report))
    else:
        console.print(
            f"trained on {report['examples']} queries for {report['epochs']} epochs; "
            f"train accuracy {report['train_accuracy']:.3f}; saved to {report['saved']}"
        )


@route_app.command("query")
def query_cmd(
    query: Annotated[str, typer.Argument(help="The question.")],
    k: Annotated[int, typer.Option("-k", help="Hits to return.")] = 5,
    top_k: Annotated[int | None, typer.Option("--top-k", help="Experts per query.")] = None,
    expert: Annotated[
        list[str] | None, typer.Option("--expert", "-e", help="Skip the router: these experts.")
    ] = None,
    all_experts: Annotated[bool, typer.Option("--all", help="Search every expert, fuse.")] = False,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Route a query to its expert(s), search them, and show the fused hits."""
    from aiprime.routing.experts import RoutingError

    rs = _open()
    try:
        res = rs.search_all(query, k) if all_experts else rs.search(query, k, top_k, expert)
    except (RoutingError, ValueError) as e:
        _fail(str(e))
    if as_json:
        console.print_json(json.dumps(res.to_dict(), default=str))
        return
    probs = ", ".join(f"{n} {p:.2f}" for n, p in res.probs.items() if p == p)
    how = "fallback to all (router unsure)" if res.fallback else "routed"
    console.print(
        f"[bold]{how}[/bold] -> {', '.join(res.experts)}" + (f"  ({probs})" if probs else "")
    )
    for i, h in enumerate(res.hits, 1):
        text = " ".join(h.hit.text.split())[:160]
        console.print(
            f"{i}. [cyan]{h.expert}[/cyan] {h.score:.3f} {escape(h.hit.source)}\n   {escape(text)}"
        )


@route_app.command("ask")
def ask_cmd(
    question: Annotated[str, typer.Argument(help="The question.")],
    expert: Annotated[
        str | None, typer.Option("--expert", "-e", help="Skip the router: this expert.")
    ] = None,
    llm: Annotated[
        str | None, typer.Option("--llm", help="Override the expert's answer model.")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Route a question to its expert and answer there, with citations (or say there is
    no good answer in that expert's collection)."""
    from aiprime.routing.experts import RoutingError

    rs = _open()
    try:
        name, answer = rs.ask(question, expert=expert, llm=llm)
    except (RoutingError, ValueError, FileNotFoundError) as e:
        _fail(str(e))
    if as_json:
        console.print_json(json.dumps({"expert": name, **answer.to_dict()}, default=str))
        return
    console.print(f"[bold]expert[/bold] {escape(name)} · {escape(answer.model)}")
    console.print(escape(answer.text))
    for c in answer.used_citations():
        console.print(f"  [bold cyan][{c.n}][/bold cyan] [green]{escape(c.location())}[/green]")


@route_app.command("feedback")
def feedback_cmd(
    query: Annotated[str, typer.Argument(help="The query the verdict is about.")],
    expert: Annotated[str, typer.Option("--expert", "-e", help="Expert whose results are judged.")],
    not_relevant: Annotated[
        bool, typer.Option("--not-relevant", help="The expert's results were not relevant.")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Learn online from one verdict on an expert's results; the router is saved."""
    from aiprime.routing.experts import RoutingError

    rs = _open()
    try:
        out = rs.feedback(query, expert, relevant=not not_relevant)
    except (RoutingError, ValueError) as e:
        _fail(str(e))
    if as_json:
        console.print_json(json.dumps(out))
    else:
        console.print(
            f"p({expert}) {out['prob_before']:.3f} -> {out['prob_after']:.3f} "
            f"({out['feedback_total']} feedback updates so far)"
        )


# -- experiments -----------------------------------------------------------------------------


@route_eval_app.command("build-domains")
def build_domains_cmd(
    shared: Annotated[Path, typer.Argument(help="The shared data folder (../shared/data).")],
    docs_dir: Annotated[Path, typer.Option("--docs", help="The project's docs.")] = Path("docs"),
) -> None:
    """Write the domain corpora and labelled queries under the data directory, then ingest
    each corpus into its own collection and all of them into 'merged'."""
    from aiprime.cli import settings
    from aiprime.rag.kb import KnowledgeBase
    from aiprime.routing.domains import build_domain_data

    s = settings()
    s.ensure_dirs()
    info = build_domain_data(shared, docs_dir, s.home)
    corpora: dict[str, str] = info["corpora"]  # type: ignore[assignment]
    console.print_json(json.dumps(info))
    for name, path in [*corpora.items(), ("merged", None)]:
        kb = KnowledgeBase(s, collection=name, reranker=None)
        rep = kb.ingest(list(corpora.values()) if path is None else [path])
        console.print(f"{name}: {kb.store.count()} chunks ({rep.chunks_embedded} newly embedded)")


@route_eval_app.command("domains")
def eval_domains_cmd(
    out: Annotated[Path, typer.Option("--out", help="Output folder.")] = Path("out/routing"),
    queries: Annotated[Path | None, typer.Option("--queries")] = None,
    limit: Annotated[int | None, typer.Option("--limit", help="Test queries per domain.")] = None,
    plot: Annotated[Path | None, typer.Option("--plot", help="PNG to write.")] = None,
) -> None:
    """Domain experts: routing accuracy, nDCG@10 and latency vs merged index and search-all."""
    from aiprime.cli import settings
    from aiprime.routing.eval import domain_experiment, plot_domains

    s = settings()
    res = domain_experiment(s.home, queries or s.home / "queries.jsonl", out, limit)
    if plot:
        plot_domains(res, plot)
    console.print_json(json.dumps({k: res[k] for k in ("router", "systems")}))


@route_eval_app.command("cost")
def eval_cost_cmd(
    rows: Annotated[Path, typer.Argument(help="JSONL from benchmarks/routing_cost_collect.py.")],
    out: Annotated[Path, typer.Option("--out", help="Output folder.")] = Path("out/routing"),
    plot: Annotated[Path | None, typer.Option("--plot", help="PNG to write.")] = None,
) -> None:
    """Cost/quality experts on SciFact: nDCG@10 vs fraction sent to the expensive expert."""
    from aiprime.cli import settings
    from aiprime.routing.eval import cost_experiment, plot_cost

    res = cost_experiment(rows, settings().home, out)
    if plot:
        plot_cost(res, plot)
    console.print_json(json.dumps({k: v for k, v in res.items() if k not in ("curves",)}))


@route_eval_app.command("drift")
def eval_drift_cmd(
    out: Annotated[Path, typer.Option("--out", help="Output folder.")] = Path("out/routing"),
    queries: Annotated[Path | None, typer.Option("--queries")] = None,
    n_per_phase: Annotated[int, typer.Option("--n-per-phase")] = 600,
    window: Annotated[int, typer.Option("--window")] = 50,
    plot: Annotated[Path | None, typer.Option("--plot", help="PNG to write.")] = None,
) -> None:
    """Drift: routing accuracy and expert load over a stream, online learning on vs off."""
    from aiprime.cli import settings
    from aiprime.routing.eval import drift_experiment, plot_drift

    s = settings()
    res = drift_experiment(s.home, queries or s.home / "queries.jsonl", out, n_per_phase, window)
    if plot:
        plot_drift(res, plot)
    summary = {
        m: {k: v for k, v in r.items() if k.startswith("accuracy_")} for m, r in res["runs"].items()
    }
    console.print_json(json.dumps(summary))
