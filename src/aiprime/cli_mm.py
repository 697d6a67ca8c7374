"""The ``aiprime mm ...`` commands (multimodal training, indexing, evaluation, WiSE-FT).

Thin: parse, call ``aiprime.multimodal``, print. Heavy imports happen inside commands so
``aiprime --help`` stays fast.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

mm_app = typer.Typer(
    help="Multimodal: train dual encoders, index images, evaluate, WiSE-FT.",
    no_args_is_help=True,
)
console = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)


def _settings() -> Any:
    from aiprime.cli import settings

    return settings()


def _fail(msg: str, code: int = 1) -> None:
    err.print(f"[red]error:[/red] {escape(msg)}")
    raise typer.Exit(code)


def _model_dir(model: Path | None) -> Path:
    s = _settings()
    return Path(model) if model else Path(s.mm.model or s.models_dir / "mm")


def _cache_dir() -> Path:
    s = _settings()
    return Path(s.cache_dir) / "mm"


def _parse_overrides(items: list[str] | None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for kv in items or []:
        if "=" not in kv:
            _fail(f"--set {kv!r}: use key=value, e.g. optim.steps=500")
        k, v = kv.split("=", 1)
        try:
            out[k] = json.loads(v)
        except json.JSONDecodeError:
            out[k] = v
    return out


def _metrics_table(res: dict[str, Any], title: str) -> Table:
    t = Table("metric", "value", title=title)
    for k, v in res.items():
        if "_r@" in k:
            t.add_row(k, f"{v:.4f}")
    return t


@mm_app.command("train")
def train_cmd(
    data: Annotated[Path, typer.Option("--data", help="Folder with images and captions.")],
    config: Annotated[Path, typer.Option("--config", help="TOML training config.")],
    out: Annotated[
        Path | None,
        typer.Option("--out", help="Run directory (default: the data directory's models/mm)."),
    ] = None,
    seed: Annotated[int | None, typer.Option("--seed", help="Overrides the config.")] = None,
    overrides: Annotated[
        list[str] | None,
        typer.Option("--set", help="Override a config key, e.g. --set optim.steps=300."),
    ] = None,
) -> None:
    """Fine-tune a dual encoder on image-text pairs (progress bars, safetensors, log.jsonl)."""
    from aiprime.cli import progress_bar
    from aiprime.multimodal.data import DataError
    from aiprime.multimodal.train import TrainConfig, train

    ov = _parse_overrides(overrides)
    if seed is not None:
        ov["seed"] = seed
    try:
        cfg = TrainConfig.from_toml(config, **ov)
    except (OSError, ValueError) as e:
        _fail(f"{config}: {e}")
    s = _settings()
    out_dir = out or (s.models_dir / "mm-run")
    tasks: dict[str, Any] = {}
    try:
        with progress_bar() as bar:

            def prog(task: str, n: int, total: int | None) -> None:
                if task not in tasks:
                    tasks[task] = bar.add_task(task, total=total)
                if total is not None:
                    bar.update(tasks[task], total=total)
                if n:
                    bar.advance(tasks[task], n)

            summary = train(cfg, data, out_dir, _cache_dir(), prog)
    except (DataError, FileNotFoundError, ValueError) as e:
        _fail(str(e))
    if out is None:  # the default location is also where search looks
        import shutil

        dst = s.models_dir / "mm"
        shutil.rmtree(dst, ignore_errors=True)
        shutil.copytree(out_dir / "model", dst)
    console.print(_metrics_table(summary["val"], f"validation after {summary['steps']} steps"))
    console.print(
        f"model → {escape(str(out_dir / 'model'))}  log → {escape(str(out_dir / 'log.jsonl'))}"
    )


@mm_app.command("eval")
def eval_cmd(
    data: Annotated[Path, typer.Option("--data", help="Folder with images and captions.")],
    split: Annotated[str, typer.Option("--split", help="train, val or test.")] = "test",
    model: Annotated[
        Path | None, typer.Option("--model", help="Model directory (default: models/mm).")
    ] = None,
    out: Annotated[Path | None, typer.Option("--out", help="Write the metrics as JSON.")] = None,
    flip_tta: Annotated[
        bool | None,
        typer.Option(
            "--flip-tta/--no-flip-tta",
            help="Override the model's test-time augmentation (image + mirror).",
        ),
    ] = None,
) -> None:
    """Recall@1/5/10, text→image and image→text, on a gallery of up to 1,000 pairs."""
    from aiprime.multimodal.data import DataError
    from aiprime.multimodal.eval import evaluate_dir

    if split not in ("train", "val", "test"):
        _fail(f"--split {split!r}: choose train, val or test")
    try:
        res = evaluate_dir(_model_dir(model), data, _cache_dir(), split, flip_tta=flip_tta)
    except (DataError, FileNotFoundError, ValueError) as e:
        _fail(str(e))
    for msg in res["skipped_images"]:
        err.print(f"[yellow]skipped[/yellow] {escape(msg)}")
    console.print(_metrics_table(res, f"{data.name} · {split} · gallery {res['gallery']}"))
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(res, indent=2) + "\n")
        console.print(f"wrote {escape(str(out))}")


@mm_app.command("index")
def index_cmd(
    path: Annotated[Path, typer.Argument(help="Folder of images (captions.csv/.jsonl optional).")],
    model: Annotated[
        Path | None, typer.Option("--model", help="Model directory (default: models/mm).")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
    rebuild: Annotated[
        bool,
        typer.Option("--rebuild", help="Drop the collection first (after retraining the model)."),
    ] = False,
) -> None:
    """Embed images (and their captions) into the store; unchanged files are skipped."""
    from aiprime.cli import progress_bar
    from aiprime.multimodal.search import MultimodalIndex
    from aiprime.store import StoreError

    idx = MultimodalIndex(_settings(), _model_dir(model))
    try:
        if rebuild and idx.reset():
            console.print(f"dropped collection {escape(idx.settings.mm.collection)!r}")
        with progress_bar() as bar:
            task = bar.add_task("embedding images", total=None)

            def prog(n: int, total: int) -> None:
                bar.update(task, total=total)
                bar.advance(task, n)

            rep = idx.index(path, prog)
    except (StoreError, FileNotFoundError, ValueError) as e:
        _fail(str(e))
    for msg in rep.errors:
        err.print(f"[yellow]skipped[/yellow] {escape(msg)}")
    if as_json:
        sys.stdout.write(json.dumps(rep.to_dict(), indent=2) + "\n")
    else:
        console.print(
            f"indexed {rep.images_indexed} image(s) and {rep.captions_indexed} caption(s), "
            f"{rep.images_unchanged} unchanged, {len(rep.errors)} skipped, in {rep.seconds:.1f}s "
            f"→ collection {escape(idx.settings.mm.collection)!r}"
        )
    if rep.errors and not rep.images_indexed and not rep.images_unchanged:
        raise typer.Exit(1)


@mm_app.command("wise")
def wise_cmd(
    zero_shot: Annotated[Path, typer.Argument(help="Model before fine-tuning.")],
    fine_tuned: Annotated[Path, typer.Argument(help="Model after fine-tuning.")],
    alpha: Annotated[
        float, typer.Option("--alpha", min=0.0, max=1.0, help="0 = before, 1 = after.")
    ] = 0.5,
    out: Annotated[Path, typer.Option("--out", help="Where the interpolated model goes.")] = Path(
        "wise-model"
    ),
) -> None:
    """WiSE-FT: write (1 - alpha) * before + alpha * after as a new model."""
    from aiprime.multimodal.wise import wise_ft

    try:
        wise_ft(zero_shot, fine_tuned, alpha, out)
    except (FileNotFoundError, ValueError) as e:
        _fail(str(e))
    console.print(f"wrote {escape(str(out))} (alpha={alpha})")


@mm_app.command("synth")
def synth_cmd(
    out: Annotated[Path, typer.Argument(help="Folder to create (images/ and captions.csv).")],
    n: Annotated[int, typer.Option("-n", min=10, help="Images to draw.")] = 800,
    seed: Annotated[int, typer.Option("--seed")] = 0,
) -> None:
    """Draw a synthetic shapes dataset with captions (for demos and tests)."""
    from aiprime.multimodal.synthetic import make_dataset

    make_dataset(out, n, seed)
    console.print(f"wrote {n} images and captions.csv to {escape(str(out))}")


def mm_search(query: str, image: Path | None, modality: str, k: int, as_json: bool) -> None:
    """``aiprime search --image FILE`` / ``aiprime search TEXT --modality image``."""
    from aiprime.multimodal.images import ImageLoadError
    from aiprime.multimodal.search import MultimodalIndex
    from aiprime.store import StoreError

    if modality not in ("image", "text"):
        _fail(f"--modality {modality!r}: choose image or text")
    if image is None and not query.strip():
        _fail("query is empty")
    if image is not None and query.strip():
        _fail("give a text query or --image, not both")
    idx = MultimodalIndex(_settings())
    try:
        if idx.store.count() == 0:
            _fail(f"collection {idx.settings.mm.collection!r} is empty: run aiprime mm index DIR")
        if image is not None:
            hits = idx.search_image(image, k, modality)
        else:
            hits = idx.search_text(query, k, modality)
    except (ImageLoadError, StoreError, FileNotFoundError, ValueError) as e:
        _fail(str(e))
    if as_json:
        sys.stdout.write(json.dumps([h.to_dict() for h in hits], indent=2) + "\n")
        return
    if not hits:
        console.print("no results")
        return
    for rank, h in enumerate(hits, 1):
        label = h.text or h.doc_id
        console.print(
            f"[bold cyan]{rank}.[/bold cyan] [dim]score {h.score:.3f}[/dim] "
            f"[bold]{escape(label)}[/bold] [dim]({h.modality})[/dim]"
        )
        console.print(f"   [green]{escape(h.source)}[/green]")


def main() -> None:  # pragma: no cover
    mm_app(sys.argv[1:])
