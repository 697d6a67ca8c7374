"""The ``aiprime`` command line: a thin layer over the Python API."""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("LANCE_LOG", "error")  # lance's Rust logger

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.progress import Progress as RichProgress
from rich.table import Table

if TYPE_CHECKING:
    from aiprime.rag.answer import Answer

from aiprime.config import Settings, load_settings
from aiprime.rag.ingest import Progress

app = typer.Typer(
    help="aiprime: Mixture-of-Experts, retrieval-augmented generation and multimodal search.",
    no_args_is_help=True,
    rich_markup_mode="rich",
    pretty_exceptions_enable=False,
    add_completion=False,
)
eval_app = typer.Typer(help="Reproducible evaluations.", no_args_is_help=True)
app.add_typer(eval_app, name="eval")
rerank_app = typer.Typer(help="Train the re-rankers.", no_args_is_help=True)
app.add_typer(rerank_app, name="rerank")
from aiprime.cli_moe import moe_app  # noqa: E402  (MoE LM commands, see docs/moe_lm.md)

app.add_typer(moe_app, name="moe")
from aiprime.cli_mm import mm_app  # noqa: E402  (multimodal commands, see docs/multimodal.md)

app.add_typer(mm_app, name="mm")
from aiprime.cli_route import route_app  # noqa: E402  (query routing, see docs/routing.md)

app.add_typer(route_app, name="route")
from aiprime.cli_serve import serve_app  # noqa: E402  (HTTP service, see docs/service.md)

app.add_typer(serve_app, name="serve")

# soft_wrap: one message stays one line (paths are not broken) when output is piped.
console = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)


class _State:
    home: Path | None = None
    collection: str | None = None


state = _State()

BeirDir = Annotated[Path, typer.Argument(help="BEIR folder: corpus.jsonl, queries.jsonl, qrels/.")]


def settings() -> Settings:
    s = load_settings(state.home)
    if state.collection:
        s = s.model_copy(update={"collection": state.collection})
    return s


def _quiet_libraries() -> None:
    warnings.filterwarnings("ignore")
    for name in (
        "transformers",
        "sentence_transformers",
        "onnxruntime",
        "lancedb",
        "torch",
        "pypdf",
    ):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:  # pragma: no cover
        pass


@app.callback()
def _main(
    home: Annotated[
        Path | None,
        typer.Option("--home", help="Data directory (store, caches, models). Env: AIPRIME_HOME."),
    ] = None,
    collection: Annotated[
        str | None, typer.Option("--collection", "-c", help="Collection to use.")
    ] = None,
) -> None:
    state.home = home
    state.collection = collection
    _quiet_libraries()


class RichIngestProgress(Progress):
    def __init__(self, bar: RichProgress) -> None:
        self.bar = bar
        self.files: TaskID = bar.add_task("files", total=None)
        self.chunks: TaskID = bar.add_task("embedding chunks", total=0)

    def files_total(self, n: int) -> None:
        self.bar.update(self.files, total=n)

    def file_done(self, path: str) -> None:
        self.bar.advance(self.files)

    def chunks_total(self, n: int) -> None:
        task = self.bar.tasks[self.chunks]
        self.bar.update(self.chunks, total=(task.total or 0) + n)

    def chunks_done(self, n: int) -> None:
        self.bar.advance(self.chunks, n)

    def task(self, name: str, total: int) -> None:
        self.current = self.bar.add_task(name, total=total)

    def advance(self, n: int = 1) -> None:
        self.bar.advance(self.current, n)


def progress_bar() -> RichProgress:
    return RichProgress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=err,
        transient=False,
        disable=not err.is_terminal and os.environ.get("AIPRIME_PROGRESS") != "1",
    )


def _fail(msg: str, code: int = 1) -> None:
    err.print(f"[red]error:[/red] {escape(msg)}")
    raise typer.Exit(code)


def _kb() -> Any:
    from aiprime.rag.kb import KnowledgeBase
    from aiprime.store import StoreError

    try:
        kb = KnowledgeBase(settings())
        kb.store  # noqa: B018  (opens the collection; raises on model mismatch)
    except (StoreError, FileNotFoundError, ValueError) as e:
        _fail(str(e))
    return kb


@app.command()
def ingest(
    paths: Annotated[
        list[Path], typer.Argument(help="Files or folders (.txt .md .html .pdf .jsonl).")
    ],
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
) -> None:
    """Add files to the knowledge base; unchanged files are skipped, changed ones replaced."""
    kb = _kb()
    with progress_bar() as bar:
        report = kb.ingest(paths, RichIngestProgress(bar))
    for e in report.errors:
        err.print(f"[yellow]skipped[/yellow] {escape(str(e))}")
    d = report.to_dict()
    if as_json:
        console.print_json(json.dumps(d))
    else:
        console.print(
            f"ingested {d['files_ingested']} file(s), {d['files_unchanged']} unchanged, "
            f"{d['files_failed']} failed; {d['chunks_written']} chunks written "
            f"({d['chunks_embedded']} newly embedded) in {d['seconds']:.1f}s"
        )
    if report.errors and not report.files_ingested and not report.files_unchanged:
        raise typer.Exit(1)


@app.command("remove")
def remove_cmd(
    paths: Annotated[list[Path] | None, typer.Argument(help="Files or folders to forget.")] = None,
    missing: Annotated[
        bool, typer.Option("--missing", help="Also forget sources whose file no longer exists.")
    ] = False,
) -> None:
    """Remove sources (and their chunks) from the knowledge base."""
    if not paths and not missing:
        _fail("give paths to remove, or --missing")
    removed = _kb().remove([str(p) for p in paths or []], missing)
    for s in removed:
        console.print(f"removed {escape(s)}")
    if not removed:
        console.print("nothing matched")


@app.command()
def search(
    query: Annotated[str, typer.Argument(help="What to look for.")] = "",
    k: Annotated[int, typer.Option("-k", "--top-k", min=1, max=1000, help="Results.")] = 5,
    mode: Annotated[str, typer.Option("--mode", help="bm25, dense or hybrid.")] = "",
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
    rerank: Annotated[
        bool,
        typer.Option("--rerank/--no-rerank", help="Apply the trained re-rankers, if any."),
    ] = True,
    image: Annotated[
        Path | None, typer.Option("--image", help="Query by image (multimodal collection).")
    ] = None,
    modality: Annotated[
        str, typer.Option("--modality", help="Return 'image' or 'text' rows (multimodal).")
    ] = "",
) -> None:
    """Search the knowledge base (hybrid BM25 + dense by default, then any re-rankers)."""
    if image is not None or modality == "image":  # cross-modal: see docs/multimodal.md
        from aiprime.cli_mm import mm_search

        mm_search(query, image, modality or "image", k, as_json)
        return
    if modality not in ("", "text"):
        _fail(f"--modality {modality!r}: choose image or text")
    if mode and mode not in ("bm25", "dense", "hybrid"):
        _fail(f"--mode {mode!r}: choose bm25, dense or hybrid")
    if not query.strip():
        _fail("query is empty")
    kb = _kb()
    try:
        hits = kb.search(query, k=k, mode=mode or None, rerank=rerank)
    except (FileNotFoundError, ValueError) as e:
        _fail(str(e))
    if as_json:
        sys.stdout.write(json.dumps([h.to_dict() for h in hits], indent=2) + "\n")
        return
    if not hits:
        console.print("no results (is anything ingested? try [bold]aiprime ingest PATH[/bold])")
        return
    for rank, h in enumerate(hits, 1):
        where = f"{h.source}" + (f" p.{h.page}" if h.page > 0 else "")
        detail = " ".join(
            f"{n}={h.scores[n]:.3f}(#{int(h.scores[n + '_rank'])})"
            for n in ("dense", "bm25")
            if n in h.scores
        )
        console.print(
            f"[bold cyan]{rank}.[/bold cyan] [bold]{escape(h.title or h.doc_id)}[/bold] "
            f"[dim]score {h.score:.3f}  {detail}[/dim]"
        )
        console.print(
            f"   [green]{escape(where)}[/green] [dim]chunk {h.chunk_index}, "
            f"chars {h.start}-{h.end}[/dim]"
        )
        snippet = " ".join(h.text.split())
        console.print("   " + escape(snippet[:300] + ("…" if len(snippet) > 300 else "")))


def _confidence_line(answer: Answer) -> str | None:
    """The answerability signal against its threshold; an empty retrieval has no score."""
    if answer.confidence is None or answer.threshold is None:
        return None
    conf = (
        f"{answer.confidence:.3f}"
        if math.isfinite(answer.confidence)
        else "n/a (nothing retrieved)"
    )
    return f"{answer.model} · {answer.signal} {conf} (threshold {answer.threshold:.3f})"


@app.command()
def ask(
    question: Annotated[str, typer.Argument(help="A question about the knowledge base.")],
    llm: Annotated[
        str | None,
        typer.Option(
            "--llm",
            help="LangChain chat model, e.g. openai:gpt-4o-mini or ollama:llama3 "
            "(default: settings answer.llm, else the offline extractive answer).",
        ),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
    rerank: Annotated[
        bool,
        typer.Option("--rerank/--no-rerank", help="Apply the trained re-rankers, if any."),
    ] = True,
) -> None:
    """Answer from the knowledge base with numbered citations, or say it holds no answer."""
    if not question.strip():
        _fail("question is empty")
    kb = _kb()
    from aiprime.rag.answer import Answer

    answer: Answer | None = None
    streamed = False
    try:
        for item in kb.ask_stream(question, llm=llm, rerank=rerank):
            if isinstance(item, Answer):
                answer = item
            elif not as_json and item:
                console.print(escape(item), end="")
                streamed = True
    except (FileNotFoundError, ValueError) as e:
        _fail(str(e))
    assert answer is not None
    if as_json:
        sys.stdout.write(json.dumps(answer.to_dict(), indent=2) + "\n")
        return
    if streamed:
        console.print()
    for w in answer.warnings:
        err.print(f"[yellow]note:[/yellow] {escape(w)}")
    line = _confidence_line(answer)
    if line:
        console.print(f"[dim]{escape(line)}[/dim]")
    used = answer.used_citations()
    if used:
        console.print("[bold]Sources[/bold]")
    for c in used:
        console.print(
            f"  [bold cyan][{c.n}][/bold cyan] [bold]{escape(c.title or c.doc_id)}[/bold] "
            f"[green]{escape(c.location())}[/green]"
        )


@app.command()
def sources(as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """List ingested sources with their chunk counts."""
    items = sorted(_kb().sources().values(), key=lambda s: s.source)
    if as_json:
        sys.stdout.write(json.dumps([s.__dict__ for s in items], indent=2) + "\n")
        return
    if not console.is_terminal:  # piped: tab-separated lines, paths never truncated
        for s in items:
            sys.stdout.write(f"{s.source}\t{s.chunks}\t{s.source_hash[:12]}\n")
        return
    t = Table("source", "chunks", "sha256")
    for s in items:
        t.add_row(escape(s.source), str(s.chunks), s.source_hash[:12])
    console.print(t)


@app.command()
def info() -> None:
    """Show the data directory, collections and the active configuration."""
    from aiprime.rag.kb import list_collections

    s = settings()
    s.ensure_dirs()
    console.print_json(
        json.dumps(
            {"settings": json.loads(s.model_dump_json()), "collections": list_collections(s)}
        )
    )


@eval_app.command("beir")
def eval_beir(
    dataset: BeirDir,
    split: Annotated[str, typer.Option("--split", help="qrels split to report on.")] = "test",
    retriever: Annotated[
        str, typer.Option("--retriever", help="bm25, dense or hybrid.")
    ] = "hybrid",
    tune_on: Annotated[
        str | None,
        typer.Option("--tune-on", help="Tune the hybrid fusion on this split first (e.g. train)."),
    ] = None,
    out: Annotated[Path | None, typer.Option("--out", help="Write the metrics as JSON.")] = None,
    rerank: Annotated[
        str,
        typer.Option(
            "--rerank",
            help="Re-ranking stack: none, lr, cross-encoder, lr+cross-encoder (mmr too).",
        ),
    ] = "none",
) -> None:
    """nDCG@10, Recall@100 and MRR@10 on a BEIR dataset (documents scored by best chunk)."""
    from aiprime.rag.beir import BeirError, evaluate_beir
    from aiprime.rag.rerank.lr import RerankModelError
    from aiprime.rag.rerank.stack import parse_stack

    if retriever not in ("bm25", "dense", "hybrid"):
        _fail(f"--retriever {retriever!r}: choose bm25, dense or hybrid")
    try:
        stages = parse_stack(rerank)
    except ValueError as e:
        _fail(f"--rerank: {e}")
    base = settings()
    try:
        with progress_bar() as bar:
            result = evaluate_beir(
                base,
                dataset,
                split,
                retriever,  # type: ignore[arg-type]
                tune_split=tune_on,
                progress=RichIngestProgress(bar),
                rerank=stages,
            )
    except (BeirError, RerankModelError, FileNotFoundError) as e:
        _fail(str(e))
    summary = {k: result[k] for k in ("ndcg@10", "recall@100", "mrr@10")}
    title = f"{dataset.name} · {split} · {retriever}" + (f" → {'+'.join(stages)}" if stages else "")
    t = Table("metric", "value", title=title)
    for k_, v in summary.items():
        t.add_row(k_, f"{v:.4f}")
    for stage, ms in result.get("rerank_ms_per_query", {}).items():
        t.add_row(f"{stage} ms/query", f"{ms:.1f}")
    console.print(t)
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
        console.print(f"wrote {escape(str(out))}")


@rerank_app.command("train")
def rerank_train(
    dataset: BeirDir,
    split: Annotated[str, typer.Option("--split", help="qrels split to train on.")] = "train",
    out_dir: Annotated[
        Path | None,
        typer.Option("--out-dir", help="Where models go (default: the data directory's models/)."),
    ] = None,
    skip_cross_encoder: Annotated[
        bool, typer.Option("--skip-cross-encoder", help="Train the LR re-ranker only.")
    ] = False,
    ce_epochs: Annotated[
        int,
        typer.Option("--ce-epochs", min=0, help="Fine-tuning epochs; 0 only tunes the blend."),
    ] = 1,
    ce_max_queries: Annotated[
        int | None,
        typer.Option("--ce-max-queries", min=1, help="Cap training queries (quick runs)."),
    ] = None,
    ce_base: Annotated[
        str,
        typer.Option("--ce-base", help="Starting weights: a local dir or HF-cache id."),
    ] = "all-MiniLM-L6-v2",
    ce_lr: Annotated[float, typer.Option("--ce-lr", min=0.0, help="Learning rate.")] = 3e-5,
    ce_negatives: Annotated[
        int, typer.Option("--ce-negatives", min=1, help="Hard negatives per positive.")
    ] = 7,
    ce_batch_groups: Annotated[
        int, typer.Option("--ce-batch-groups", min=1, help="Queries per optimiser step.")
    ] = 4,
) -> None:
    """Train the LR feature re-ranker and fine-tune the cross-encoder on SPLIT's judgements."""
    from aiprime.embed import resolve_model_path
    from aiprime.rag.beir import BeirError
    from aiprime.rag.rerank.stack import cross_encoder_path, lr_path
    from aiprime.rag.rerank.train import candidates_for, train_ce_stage, train_lr_stage

    if split == "test":
        err.print("[yellow]warning:[/yellow] training on 'test'; do not report on it")
    s = settings()
    s.ensure_dirs()
    lr_out = out_dir / "rerank" / "lr.json" if out_dir else lr_path(s)
    ce_out = out_dir / "cross-encoder" if out_dir else Path(cross_encoder_path(s))
    report: dict[str, Any] = {"dataset": str(dataset.resolve()), "split": split}
    try:
        with progress_bar() as bar:
            prog = RichIngestProgress(bar)
            queries, qrels, cands = candidates_for(s, dataset, split, prog)
            report["lr"] = train_lr_stage(queries, qrels, cands, lr_out, s.rerank.depth)
            console.print(
                f"LR re-ranker: C={report['lr']['C']} class_weight={report['lr']['class_weight']}"
                f" cv nDCG@10={report['lr']['cv_ndcg@10']:.4f} → {escape(str(lr_out))}"
            )
            if not skip_cross_encoder:
                base = ce_base
                if ce_epochs > 0 and ce_base.lower().endswith("all-minilm-l6-v2"):
                    base = str(resolve_model_path(ce_base))
                task = bar.add_task("fine-tuning cross-encoder", total=None)

                def on_step(step: int, total: int, loss: float) -> None:
                    bar.update(task, completed=step, total=total)

                report["cross_encoder"] = train_ce_stage(
                    s,
                    queries,
                    qrels,
                    cands,
                    ce_out,
                    base,
                    ce_epochs,
                    ce_max_queries,
                    lr_out,
                    on_step,
                    groups_file=lr_out.parent / f"ce-groups-{split}.jsonl.gz",
                    lr=ce_lr,
                    negatives=ce_negatives,
                    groups_per_batch=ce_batch_groups,
                )
                ce = report["cross_encoder"]
                console.print(
                    f"cross-encoder: blend={ce['blend']} held-out nDCG@10="
                    f"{ce['tune_ndcg@10']:.4f} → {escape(str(ce_out))}"
                )
    except (BeirError, FileNotFoundError, ValueError) as e:
        _fail(str(e))
    rep = lr_out.parent / "train-report.json"
    rep.write_text(json.dumps(report, indent=2) + "\n")
    console.print(f"wrote {escape(str(rep))}")


@rerank_app.command("calibrate")
def rerank_calibrate(
    dataset: BeirDir,
    split: Annotated[str, typer.Option("--split", help="qrels split to calibrate on.")] = "train",
    stack: Annotated[
        str,
        typer.Option(
            "--stack",
            help="Stages whose score is gated: none (dense cosine), lr, "
            "lr+cross-encoder, ... (default: what `ask` uses now).",
        ),
    ] = "",
    max_queries: Annotated[
        int | None,
        typer.Option("--max-queries", min=1, help="Sample queries (bounds cross-encoder time)."),
    ] = None,
    report_split: Annotated[
        str | None,
        typer.Option("--report-split", help="Also measure the chosen threshold on this split."),
    ] = None,
    keep: Annotated[
        float,
        typer.Option(
            "--keep",
            min=0.0,
            max=1.0,
            help="Share of answerable questions still answered; 0 maximises balanced accuracy.",
        ),
    ] = 0.95,
    out: Annotated[
        Path | None,
        typer.Option("--out", help="Calibration file (default: models/answer/calibration.json)."),
    ] = None,
) -> None:
    """Calibrate the no-answer threshold of `aiprime ask` on SPLIT's judgements."""
    from aiprime.rag.answer import CALIBRATION_FILE, Calibration
    from aiprime.rag.beir import BeirError
    from aiprime.rag.rerank.stack import default_stages, parse_stack
    from aiprime.rag.rerank.train import calibrate_answers

    if split == "test":
        err.print("[yellow]warning:[/yellow] calibrating on 'test'; do not report on it")
    s = settings()
    s.ensure_dirs()
    path = out or s.models_dir / "answer" / CALIBRATION_FILE
    try:
        # read the existing file first: a corrupt one stops here, before the long run,
        # and is never overwritten
        cal = Calibration.load(path) if path.is_file() else Calibration()
        stages = parse_stack(stack) if stack else default_stages(s)
        with progress_bar() as bar:
            prog = RichIngestProgress(bar)
            result = calibrate_answers(
                s, dataset, split, stages, max_queries, report_split, prog, keep=keep or None
            )
    except (BeirError, FileNotFoundError, ValueError) as e:
        _fail(str(e))
    cal.thresholds[result["signal"]] = result
    cal.save(path)
    console.print(
        f"{escape(result['signal'])}: threshold {result['threshold']:.4f}, balanced accuracy "
        f"{result['balanced_accuracy']:.3f} on {split} "
        f"({result['n_answerable']} answerable / {result['n_unanswerable']} unanswerable)"
    )
    if "report" in result:
        r = result["report"]
        console.print(
            f"on {r['split']}: balanced accuracy {r['balanced_accuracy']:.3f} (answerable kept "
            f"{r['answerable_kept']:.3f}, unanswerable refused {r['unanswerable_refused']:.3f})"
        )
    console.print(f"wrote {escape(str(path))}")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
