"""The multimodal part of ``make demo``: train, evaluate, index and search across modalities.

Without data it draws its own shapes (``aiprime mm synth``) and trains for about a minute
on a CPU; with a data folder (e.g. ../shared/data/fashion) it trains a short run on that.
Every step is a real ``aiprime`` command, run in-process by ``run``.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Callable
from pathlib import Path

from rich.console import Console
from rich.rule import Rule

ROOT = Path(__file__).resolve().parents[3]


def _config(name: str, home: Path) -> Path:
    p = ROOT / "configs" / "mm" / name
    if p.is_file():
        return p
    # installed without the repository: the synthetic config's essentials
    out = home / name
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        "seed = 0\n[model]\nimage_size = 32\ncnn_width = 16\nembed_dim = 128\n"
        '[data]\ncaption_column = "caption"\nimage_pattern = "images/{}.png"\n'
        'meta_columns = ["shape", "colour", "size", "background"]\ntest_fraction = 0.2\n'
        '[text_aug]\ntemplates = ["{size} {colour} {shape}", "{colour} {shape} on {background}"]\n'
        "variants = 4\n[optim]\nsteps = 150\nbatch_size = 64\nlr = 3e-3\nwarmup_steps = 15\n"
    )
    return out


def _first_test_image(data: Path, column: str, pattern: str) -> Path | None:
    """An image from the test split, to query with a picture the model never trained on."""
    from aiprime.multimodal.data import DataConfig, load_pairs, split_pairs

    cfg = DataConfig(caption_column=column, image_pattern=pattern)
    try:
        test = split_pairs(load_pairs(data, cfg), cfg)["test"]
    except Exception:
        return None
    return test[0].image if test else None


def run_demo(run: Callable[..., None], console: Console, data: Path | None) -> None:
    """Show cross-modal search; ``run(*args)`` executes one ``aiprime`` command."""
    home = Path(os.environ.get("AIPRIME_HOME", ROOT / ".aiprime-home" / "demo"))
    if data is None:
        console.print(Rule("multimodal · text ↔ image search on synthetic shapes"))
        data = home / "mm-shapes"
        if not (data / "captions.csv").is_file():
            run("mm", "synth", str(data), "-n", "800")
        cfg = _config("synthetic.toml", home)
        console.print(
            "[dim]A locked all-MiniLM-L6-v2 text tower and a small CNN trained from scratch; "
            "the test split holds shape/colour/size/background combinations never seen in "
            "training.[/dim]"
        )
        run("mm", "train", "--data", str(data), "--config", str(cfg))
        run("mm", "eval", "--data", str(data), "--split", "test")
        run("mm", "index", str(data), "--rebuild")  # the model was just retrained
        run("search", "a large red circle", "--modality", "image", "-k", "3")
        run("search", "small blue star on a black background", "--modality", "image", "-k", "3")
        img = _first_test_image(data, "caption", "images/{}.png")
        if img is not None:
            with (data / "captions.csv").open() as f:
                cap = {r["id"]: r["caption"] for r in csv.DictReader(f)}.get(img.stem, "?")
            console.print(f"[dim]query image {img.name}: {cap}[/dim]")
            run("search", "--image", str(img), "--modality", "text", "-k", "3")
            run("search", "--image", str(img), "-k", "3")
        return
    console.print(Rule(f"multimodal · text ↔ image search on {data.name}"))
    console.print(
        "[dim]A short run: 150 steps without augmentation (which only pays off in longer "
        "runs, docs/results.md) and so only the captions are embedded; "
        "configs/mm/fashion.toml trains the full model, see docs/multimodal.md.[/dim]"
    )
    cfg = _config("fashion.toml", home)
    run(
        "mm", "train", "--data", str(data), "--config", str(cfg),
        "--set", "optim.steps=150", "--set", "optim.batch_size=128",
        "--set", "text_aug.enabled=false", "--set", "image_aug.enabled=false",
        "--set", "eval_every=0",
    )  # fmt: skip
    run("mm", "eval", "--data", str(data), "--split", "test")
    run("mm", "index", str(data), "--rebuild")  # the model was just retrained
    for q in ("navy blue shirt for men", "black leather handbag for women", "white sports shoes"):
        run("search", q, "--modality", "image", "-k", "3")
    img = _first_test_image(data, "productDisplayName", "images/{}.jpg")
    if img is not None:
        run("search", "--image", str(img), "--modality", "text", "-k", "3")
        run("search", "--image", str(img), "-k", "3")
