"""``aiprime moe ...``: train, resume and sample the MoE/dense LMs.

torch and the model are imported inside the commands so that ``aiprime --help`` and the
other sub-apps do not pay for them.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape

moe_app = typer.Typer(
    help="MoE language models: train, resume, generate, inspect experts, compare, report, speed.",
    no_args_is_help=True,
)
console = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)


def _fail(msg: str) -> None:
    err.print(f"[red]error:[/red] {escape(msg)}")
    raise typer.Exit(1)


@moe_app.command("train")
def train_cmd(
    config: Annotated[Path, typer.Option("--config", "-c", help="TOML config file.")],
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue the run in --out from its checkpoint.")
    ] = False,
    out: Annotated[
        Path | None, typer.Option("--out", help="Run directory (default: train.out_dir).")
    ] = None,
    seed: Annotated[int | None, typer.Option("--seed", help="Override train.seed.")] = None,
    max_steps: Annotated[
        int | None,
        typer.Option(
            "--max-steps",
            help="Stop at this step; the LR schedule still follows train.max_steps, so "
            "the run can be resumed exactly.",
        ),
    ] = None,
    steps: Annotated[
        int | None,
        typer.Option(
            "--steps",
            help="Override train.max_steps: a shorter (or longer) run with the LR schedule "
            "fitted to it, unlike --max-steps.",
        ),
    ] = None,
    threads: Annotated[
        int | None, typer.Option("--threads", help="torch CPU threads (train.threads).")
    ] = None,
    device: Annotated[
        str | None,
        typer.Option("--device", help="cpu or cuda (train.device; under torchrun: NCCL)."),
    ] = None,
    expert_parallel: Annotated[
        bool,
        typer.Option(
            "--expert-parallel",
            help="Under torchrun: shard the experts over the ranks (train.expert_parallel).",
        ),
    ] = False,
) -> None:
    """Train a dense or MoE LM; metrics go to RUN_DIR/metrics.jsonl.

    Data parallel on CPU: torchrun --nproc-per-node N -m aiprime.cli moe train ...
    (add --expert-parallel to also shard the experts over the N processes).
    """
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    from aiprime.moe.lm.train import NonFiniteLossError, load_config, train

    try:
        cfg = load_config(config)
    except (OSError, ValueError, TypeError) as e:
        _fail(f"{config}: {e}")
        return
    if seed is not None:
        if resume and seed != cfg.train.seed:
            _fail("--seed cannot change the seed of a resumed run")
        cfg.train.seed = seed
    if steps is not None:
        if steps < 1:
            _fail("--steps must be at least 1")
        cfg.train.max_steps = steps
    if threads is not None:
        cfg.train.threads = threads
    if expert_parallel:
        cfg.train.expert_parallel = True
    if device is not None:
        cfg.train.device = device
    run_dir = out or Path(cfg.train.out_dir)
    lead = os.environ.get("RANK", "0") == "0"  # under torchrun only rank 0 reports

    bar = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[info]}"),
        console=console,
        disable=not lead,
    )
    task = bar.add_task(f"train {run_dir.name}", total=None, info="")

    def on_log(step: int, stop: int, rec: dict[str, Any]) -> None:
        info = f"loss {rec['train_loss']:.4f}"
        if "val_loss" in rec:
            info += f" val {rec['val_loss']:.4f}"
        info += f" lr {rec['lr']:.2e} {rec['tokens_per_s']:.0f} tok/s"
        bar.update(task, completed=step, total=stop, info=info)
        if "val_loss" in rec:
            bar.console.print(
                f"step {step}: train {rec['train_loss']:.4f} val {rec['val_loss']:.4f}"
            )

    try:
        with bar:
            res = train(cfg, run_dir, resume=resume, stop_at=max_steps, progress=on_log)
    except NonFiniteLossError as e:
        _fail(str(e))
        return
    except (FileExistsError, FileNotFoundError, ValueError, ImportError) as e:
        _fail(str(e))
        return
    if not lead:
        return
    val = "n/a" if res.val_loss is None else f"{res.val_loss:.4f}"
    console.print(
        f"step {res.step}, val loss {val}; checkpoint {escape(str(res.checkpoint))}, "
        f"metrics {escape(str(res.metrics))}"
    )


@moe_app.command("generate")
def generate_cmd(
    checkpoint: Annotated[Path, typer.Argument(help="Checkpoint or run directory.")],
    prompt: Annotated[str, typer.Option("--prompt", "-p", help="Text to continue.")] = "\n",
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", "-n")] = 200,
    temperature: Annotated[float, typer.Option("--temperature", "-t")] = 0.8,
    top_k: Annotated[
        int | None, typer.Option("--top-k", help="Sample among the k likeliest; 1 = greedy.")
    ] = 40,
    seed: Annotated[int, typer.Option("--seed")] = 0,
) -> None:
    """Continue PROMPT with a trained model and print the text."""
    import torch

    from aiprime.moe.lm.train import load_for_inference

    try:
        model, tok = load_for_inference(checkpoint)
        ids = tok.encode(prompt)
    except (FileNotFoundError, ValueError, ImportError) as e:
        _fail(str(e))
        return
    if not ids:
        _fail("the prompt encodes to no token")
    gen = torch.Generator().manual_seed(seed)
    x = torch.tensor([ids], dtype=torch.long)
    y = model.generate(x, max_new_tokens, temperature=temperature, top_k=top_k, generator=gen)
    console.print(tok.decode(y[0].tolist()), markup=False, highlight=False)


@moe_app.command("inspect")
def inspect_cmd(
    checkpoint: Annotated[Path, typer.Argument(help="Checkpoint or run directory.")],
    text: Annotated[
        Path | None,
        typer.Option("--text", help="Text to route (default: the run's validation split)."),
    ] = None,
    max_tokens: Annotated[int, typer.Option("--max-tokens")] = 50_000,
    top: Annotated[int, typer.Option("--top", help="Tokens listed per expert.")] = 6,
    json_out: Annotated[
        Path | None, typer.Option("--json", help="Also write the profiles as JSON.")
    ] = None,
) -> None:
    """Expert specialisation: which tokens (characters) each expert of each layer takes."""
    import json
    from dataclasses import asdict

    import torch
    from rich.table import Table

    from aiprime.moe.lm.checkpoint import find_checkpoint, read_state
    from aiprime.moe.lm.data import TextData
    from aiprime.moe.lm.inspect import expert_profiles, expert_token_counts
    from aiprime.moe.lm.train import load_for_inference

    try:
        model, tok = load_for_inference(checkpoint)
        state = read_state(find_checkpoint(checkpoint))
        if text is None:
            data_cfg = state["config"]["data"]
            ids = TextData(Path(data_cfg["path"]), tok, data_cfg["val_fraction"]).val
        else:
            ids = torch.tensor(tok.encode(text.read_text(encoding="utf-8")), dtype=torch.long)
        counts = expert_token_counts(model, ids[:max_tokens])
    except (FileNotFoundError, ValueError, ImportError) as e:
        _fail(str(e))
        return
    if not counts:
        _fail("this model has no MoE layer")
    profiles = expert_profiles(counts, tok.decode, model.config.moe.top_k, top)
    table = Table(title=f"expert specialisation ({min(len(ids), max_tokens)} tokens)")
    for col in ("layer", "expert", "load", "most frequent tokens: share of expert / p(chosen)"):
        table.add_column(col)
    for p in profiles:
        toks = "  ".join(f"{t!r} {s:.0%}/{pc:.0%}" for t, s, pc in p.top)
        table.add_row(str(p.layer), str(p.expert), f"{p.load:.1%}", escape(toks))
    console.print(table)
    if json_out is not None:
        json_out.write_text(json.dumps([asdict(p) for p in profiles], indent=1) + "\n")
        console.print(f"wrote {escape(str(json_out))}")


@moe_app.command("compare")
def compare_cmd(
    runs: Annotated[list[Path], typer.Argument(help="Run directories.")],
    json_out: Annotated[
        Path | None, typer.Option("--json", help="Also write runs and groups as JSON.")
    ] = None,
) -> None:
    """Final/best losses of several runs, and mean +- std of val loss over seeds."""
    import json
    from dataclasses import asdict

    from rich.table import Table

    from aiprime.moe.lm.inspect import group_summaries, summarize_run

    try:
        summaries = [summarize_run(r) for r in runs]
    except (FileNotFoundError, ValueError, KeyError) as e:
        _fail(f"not a run directory: {e}")
        return

    def f(x: float | None, fmt: str = ".4f") -> str:
        return "-" if x is None else format(x, fmt)

    t = Table(title="runs")
    for col in ("run", "model", "active/total params", "step", "train", "val", "best val", "tok/s"):
        t.add_column(col)
    for s in summaries:
        t.add_row(
            escape(s.run), s.model, f"{s.params_active or '-'}/{s.params_total or '-'}",
            str(s.step), f(s.train_loss), f(s.val_loss), f(s.best_val_loss),
            f(s.tokens_per_s, ".0f"),
        )  # fmt: skip
    console.print(t)
    groups = group_summaries(summaries)
    g = Table(title="groups (same config but the seed)")
    for col in ("model", "runs", "val loss mean", "std"):
        g.add_column(col)
    for row in groups:
        g.add_row(row["model"], str(row["runs"]), f(row["val_loss_mean"]), f(row["val_loss_std"]))
    console.print(g)
    if json_out is not None:
        runs_json = [{k: v for k, v in asdict(s).items() if k != "group"} for s in summaries]
        json_out.write_text(json.dumps({"runs": runs_json, "groups": groups}, indent=1) + "\n")
        console.print(f"wrote {escape(str(json_out))}")


@moe_app.command("report")
def report_cmd(
    runs: Annotated[list[Path], typer.Argument(help="Run directories (seeds of a config group).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Directory for the PNGs and report.md.")],
    text: Annotated[
        Path | None,
        typer.Option("--text", help="Text to route for the expert plots (default: val split)."),
    ] = None,
    max_tokens: Annotated[
        int, typer.Option("--max-tokens", help="Tokens routed per run for the expert plots.")
    ] = 50_000,
    top: Annotated[int, typer.Option("--top", help="Tokens listed per expert.")] = 5,
    prefix: Annotated[str, typer.Option("--prefix", help="Prefix of every file name.")] = "",
) -> None:
    """Loss curves (mean +- std over seeds), expert-load heatmaps and specialisation tables.

    Writes loss.png, expert_load_<run>.png, expert_load_training_<run>.png, report.md and
    report.json into --out (needs matplotlib: pip install 'aiprime[plots]').
    """
    from aiprime.moe.lm.report import write_report

    try:
        res = write_report(runs, out, text=text, max_tokens=max_tokens, top=top, prefix=prefix)
    except (FileNotFoundError, ValueError, KeyError, ImportError) as e:
        _fail(str(e))
        return
    for g in res["groups"]:
        std = "" if g["val_loss_std"] is None else f" ± {g['val_loss_std']:.4f}"
        val = "-" if g["val_loss_mean"] is None else f"{g['val_loss_mean']:.4f}"
        console.print(f"{escape(g['label'])}: n={g['n']} val loss {val}{std}")
    console.print(f"wrote {len(res['files'])} files to {escape(str(out))}: "
                  + ", ".join(res["files"]))  # fmt: skip


@moe_app.command("speed")
def speed_cmd(
    configs: Annotated[list[Path], typer.Argument(help="TOML configs to time against each other.")],
    steps: Annotated[int, typer.Option("--steps", help="Timed steps per config and round.")] = 5,
    rounds: Annotated[int, typer.Option("--rounds", help="Round-robin rounds.")] = 3,
    warmup: Annotated[int, typer.Option("--warmup", help="Untimed steps per config.")] = 2,
    threads: Annotated[int, typer.Option("--threads")] = 1,
    vocab_size: Annotated[int, typer.Option("--vocab-size", help="65 = tiny Shakespeare.")] = 65,
    json_out: Annotated[Path | None, typer.Option("--json", help="Also write JSON.")] = None,
) -> None:
    """Training tokens/s of configs measured interleaved (fair on a busy machine).

    Reports wall-clock tokens/s and tokens per process-CPU-second (the load-independent
    one at --threads 1), medians over rounds, on random tokens.
    """
    import json
    from dataclasses import asdict

    from rich.table import Table

    from aiprime.moe.lm.speed import measure_throughput
    from aiprime.moe.lm.train import load_config

    try:
        cfgs = {c.stem: load_config(c) for c in configs}
        res = measure_throughput(cfgs, vocab_size, steps, rounds, warmup, threads)
    except (OSError, ValueError, TypeError) as e:
        _fail(str(e))
        return
    t = Table(title=f"training throughput ({rounds} rounds x {steps} steps, {threads} thread(s))")
    for col in ("config", "params total/active", "tokens/s wall", "tokens/CPU-s"):
        t.add_column(col)
    for r in res:
        t.add_row(escape(r.name), f"{r.params_total:,}/{r.params_active:,}",
                  f"{r.wall_tokens_per_s:.0f}", f"{r.cpu_tokens_per_s:.0f}")  # fmt: skip
    console.print(t)
    if json_out is not None:
        json_out.write_text(json.dumps([asdict(r) for r in res], indent=1) + "\n")
        console.print(f"wrote {escape(str(json_out))}")
