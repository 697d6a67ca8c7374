"""``aiprime moe report``: plots and tables that compare trained LM runs.

What it writes (all from files the trainer already produces, so a report can be made at
any time, also of runs still in progress):

* ``loss.png`` -- train and validation loss against tokens seen. Runs that share a config
  except the seed (the grouping of :func:`~aiprime.moe.lm.inspect.summarize_run`) are one
  line, the mean over seeds, with a band of +- one sample std; tokens, not steps, are on the
  x axis because "equal tokens seen" is what the comparison promises.
* ``expert_load_<run>.png`` for every MoE run -- a layer x expert heatmap of each expert's
  share of the routed (token, expert) pairs, measured with the run's checkpoint over the
  validation text (:func:`~aiprime.moe.lm.inspect.expert_token_counts`): the balance the
  trained model actually reaches.
* ``expert_load_training_<run>.png`` -- per MoE layer, expert share (rows) against step
  (columns) from ``metrics.jsonl``: how the balance developed (collapse shows as one row
  lighting up).
* ``report.md`` -- the groups table (val loss mean +- std, tokens/s, params total/active),
  the runs table, links to the plots and, per MoE run, the specialisation table: the
  characters/tokens each expert takes most often with ``p(chosen | token)``.
* ``report.json`` -- the same numbers, machine-readable.

matplotlib is an optional dependency (``pip install 'aiprime[plots]'``) and is imported
inside the plotting functions with the Agg backend, so the rest of the package and headless
machines do not need a display.
"""

from __future__ import annotations

import json
import re
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from aiprime.plots import pyplot, save

from .inspect import ExpertProfile, RunSummary, summarize_run
from .train import read_metrics


@dataclass
class Curve:
    """Mean and sample std (0 for a single run) of a metric at the x values all runs of a
    group share (so a run that stopped early shortens the curve instead of skewing it)."""

    x: list[float]
    mean: list[float]
    std: list[float]


@dataclass
class RunGroup:
    """Runs that differ only in the seed. ``label`` is the model description, made unique
    when two groups describe alike (e.g. the same model with another dropout)."""

    label: str
    runs: list[Path]
    summaries: list[RunSummary]
    metrics: list[list[dict[str, Any]]] = field(repr=False)

    @property
    def is_moe(self) -> bool:
        return any(r.get("expert_load") for m in self.metrics for r in m)


def load_groups(run_dirs: list[Path]) -> list[RunGroup]:
    """Read the runs and group them by config without the seed, in first-seen order."""
    by_key: dict[str, RunGroup] = {}
    for d in run_dirs:
        d = Path(d)
        s = summarize_run(d)
        g = by_key.get(s.group)
        if g is None:
            g = by_key[s.group] = RunGroup(s.model, [], [], [])
        g.runs.append(d)
        g.summaries.append(s)
        g.metrics.append(read_metrics(d))
    groups = list(by_key.values())
    seen: dict[str, int] = {}
    for g in groups:
        n = seen[g.label] = seen.get(g.label, 0) + 1
        if n > 1:
            g.label = f"{g.label} (#{n})"
    return groups


def mean_std_curve(metrics: list[list[dict[str, Any]]], key: str, x_key: str = "tokens") -> Curve:
    """``key`` (e.g. ``val_loss``) averaged over runs at the ``x_key`` values present in
    every run's records that carry ``key``."""
    per_run = [{r[x_key]: float(r[key]) for r in recs if key in r} for recs in metrics]
    if not per_run:
        return Curve([], [], [])
    common = sorted(set.intersection(*(set(p) for p in per_run)))
    mean, std = [], []
    for x in common:
        vals = [p[x] for p in per_run]
        mean.append(statistics.fmean(vals))
        std.append(statistics.stdev(vals) if len(vals) > 1 else 0.0)
    return Curve([float(x) for x in common], mean, std)


def plot_losses(groups: list[RunGroup], path: Path) -> Path:
    """Train (left) and validation (right) loss vs tokens seen, mean +- std per group."""
    plt = pyplot("aiprime moe report")
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, key, title in ((axes[0], "train_loss", "train"), (axes[1], "val_loss", "validation")):
        for i, g in enumerate(groups):
            c = mean_std_curve(g.metrics, key)
            if not c.x:
                continue
            color = f"C{i}"
            xs = [x / 1e6 for x in c.x]
            n = len(g.runs)
            ax.plot(xs, c.mean, color=color, marker="o" if key == "val_loss" else None,
                    ms=3, lw=1.3, label=f"{g.label} (n={n})")  # fmt: skip
            if n > 1:
                lo = [m - s for m, s in zip(c.mean, c.std, strict=True)]
                hi = [m + s for m, s in zip(c.mean, c.std, strict=True)]
                ax.fill_between(xs, lo, hi, color=color, alpha=0.25, lw=0)
        ax.set_title(f"{title} loss (mean ± std over seeds)")
        ax.set_xlabel("tokens seen (millions)")
        ax.set_ylabel("cross-entropy (nats/token)")
        ax.grid(alpha=0.3)
    # the interesting part of the train curve is the end; its first steps (loss ~ ln V)
    # would flatten it. Validation points are few and start later: show them all.
    tails = [float(v) for g in groups for m in g.metrics for r in m[len(m) // 5 :]
             if (v := r.get("train_loss")) is not None]  # fmt: skip
    if tails:
        y0, y1 = min(tails), max(tails)
        pad = 0.05 * (y1 - y0 or 1.0)
        axes[0].set_ylim(y0 - pad, y1 + pad)
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    return save(fig, path, dpi=110)


def load_matrix(counts: list[Tensor]) -> Tensor:
    """``[n_moe_layers, n_experts]`` share of each layer's routed (token, expert) pairs
    from :func:`~aiprime.moe.lm.inspect.expert_token_counts` (rows sum to 1)."""
    rows = [c.sum(dim=0) / c.sum().clamp_min(1) for c in counts]
    return torch.stack(rows) if rows else torch.zeros(0, 0)


def plot_expert_load(load: Tensor, path: Path, title: str) -> Path:
    """Heatmap of :func:`load_matrix` with the shares written in the cells; the colour
    scale is centred on the perfectly balanced share ``1/E`` so imbalance stands out."""
    plt = pyplot("aiprime moe report")
    from matplotlib.colors import TwoSlopeNorm

    n_layers, n_exp = load.shape
    fair = 1.0 / n_exp
    vmax = max(float(load.max()), fair * 1.5)
    fig, ax = plt.subplots(figsize=(1.0 + 0.7 * n_exp, 1.2 + 0.55 * n_layers))
    im = ax.imshow(load.numpy(), cmap="RdBu_r", aspect="auto",
                   norm=TwoSlopeNorm(vcenter=fair, vmin=0.0, vmax=vmax))  # fmt: skip
    for i in range(n_layers):
        for j in range(n_exp):
            ax.text(j, i, f"{100 * float(load[i, j]):.1f}", ha="center", va="center", fontsize=7)
    ax.set_xticks(range(n_exp))
    ax.set_yticks(range(n_layers))
    ax.set_xlabel("expert")
    ax.set_ylabel("MoE layer")
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, label=f"token share, % in cells (balanced = {fair:.1%})")
    fig.tight_layout()
    return save(fig, path, dpi=110)


def training_load(records: list[dict[str, Any]]) -> tuple[list[int], Tensor]:
    """Steps and a ``[n_moe_layers, n_experts, n_records]`` tensor of the expert loads
    logged in ``metrics.jsonl`` (each record: the load since the previous one)."""
    recs = [r for r in records if r.get("expert_load")]
    if not recs:
        return [], torch.zeros(0, 0, 0)
    loads = torch.tensor([r["expert_load"] for r in recs], dtype=torch.float32)
    return [int(r["step"]) for r in recs], loads.permute(1, 2, 0)


def plot_training_load(records: list[dict[str, Any]], path: Path, title: str) -> Path | None:
    """One heatmap per MoE layer: expert (rows) x step (columns); None for a dense run."""
    steps, loads = training_load(records)
    if not steps:
        return None
    plt = pyplot("aiprime moe report")
    from matplotlib.colors import TwoSlopeNorm

    n_layers, n_exp, _ = loads.shape
    fair = 1.0 / n_exp
    vmax = max(float(loads.max()), fair * 1.5)
    norm = TwoSlopeNorm(vcenter=fair, vmin=0.0, vmax=vmax)
    x_edges = [steps[0] - (steps[1] - steps[0] if len(steps) > 1 else 1), *steps]
    y_edges = [e - 0.5 for e in range(n_exp + 1)]
    fig, axes = plt.subplots(n_layers, 1, figsize=(10, 0.4 + 0.28 * n_exp * n_layers + 0.6),
                             sharex=True, squeeze=False)  # fmt: skip
    im = None
    for li in range(n_layers):
        ax = axes[li, 0]
        # each record holds the load since the previous one: cells span (prev, step]
        im = ax.pcolormesh(x_edges, y_edges, loads[li].numpy(), cmap="RdBu_r", norm=norm)
        ax.set_ylim(n_exp - 0.5, -0.5)
        ax.set_ylabel(f"layer {li}\nexpert", fontsize=8)
        ax.set_yticks(range(n_exp))
        ax.tick_params(labelsize=7)
    axes[-1, 0].set_xlabel("step")
    axes[0, 0].set_title(title, fontsize=9)
    fig.colorbar(im, ax=axes[:, 0].tolist(), label=f"load (balanced = {fair:.1%})")
    return save(fig, path, dpi=110, bbox_inches="tight")


def _md_token(t: str) -> str:
    """A token as readable, table-safe Markdown: escapes (``\\n``, spaces shown as ``␣``)
    inside a code span, with ``|`` escaped so it does not split the table cell."""
    shown = repr(t)[1:-1].replace(" ", "␣").replace("`", "'")
    return "`" + shown.replace("|", "\\|") + "`"


def specialisation_table(profiles: list[ExpertProfile]) -> str:
    """Markdown table: per layer and expert, its load and its most frequent tokens, each
    with its share of the expert's tokens and ``p(chosen | token)`` (how often the router
    sends that token to this expert; ~100 % means the expert owns the token)."""
    lines = [
        "| layer | expert | load "
        "| top tokens: share of the expert's tokens / p(chosen \\| token) |",
        "|---:|---:|---:|---|",
    ]
    for p in profiles:
        toks = ", ".join(f"{_md_token(t)} {s:.0%}/{pc:.0%}" for t, s, pc in p.top)
        lines.append(f"| {p.layer} | {p.expert} | {p.load:.1%} | {toks} |")
    return "\n".join(lines)


def owned_tokens(
    counts: list[Tensor], decode: Any, top_k: int, min_p: float = 0.9, min_count: int = 20
) -> list[list[list[str]]]:
    """Per layer and expert, the tokens it takes at least ``min_p`` of the time (seen at
    least ``min_count`` times): a compact reading of what an expert specialises in."""
    out = []
    for c in counts:
        occ = c.sum(dim=1) / top_k
        p = c / occ.clamp_min(1).unsqueeze(1)
        layer = []
        for e in range(c.shape[1]):
            ids = ((p[:, e] >= min_p) & (occ >= min_count)).nonzero().flatten().tolist()
            layer.append([decode([i]) for i in ids])
        out.append(layer)
    return out


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name) or "run"


def _fmt(x: float | None, f: str = ".4f") -> str:
    return "-" if x is None else format(x, f)


def write_report(
    run_dirs: list[Path],
    out: Path,
    text: Path | None = None,
    max_tokens: int = 50_000,
    top: int = 5,
    prefix: str = "",
) -> dict[str, Any]:
    """Write the plots, ``report.md`` and ``report.json`` for ``run_dirs`` into ``out``
    and return the JSON content. ``text``: route this file instead of each run's
    validation split for the expert heatmaps and tables; ``prefix`` is prepended to every
    file name (``moe_lm_`` for docs/img)."""
    from .checkpoint import find_checkpoint, read_state
    from .data import TextData
    from .inspect import expert_profiles, expert_token_counts
    from .train import load_for_inference

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    groups = load_groups(run_dirs)
    files: list[str] = []
    loss_png = plot_losses(groups, out / f"{prefix}loss.png")
    files.append(loss_png.name)

    group_rows = []
    for g in groups:
        vals = [s.val_loss for s in g.summaries if s.val_loss is not None]
        speeds = [s.tokens_per_s for s in g.summaries if s.tokens_per_s is not None]
        trains = [s.train_loss for s in g.summaries if s.train_loss is not None]
        s0 = g.summaries[0]
        tokens = g.metrics[0][-1].get("tokens") if g.metrics[0] else None
        group_rows.append({
            "label": g.label,
            "runs": [str(r) for r in g.runs],
            "n": len(g.runs),
            "step": s0.step,
            "tokens": tokens,
            "val_loss_mean": statistics.fmean(vals) if vals else None,
            "val_loss_std": statistics.stdev(vals) if len(vals) > 1 else None,
            "val_losses": vals,
            "train_loss_mean": statistics.fmean(trains) if trains else None,
            "tokens_per_s_mean": statistics.fmean(speeds) if speeds else None,
            "params_total": s0.params_total,
            "params_active": s0.params_active,
        })  # fmt: skip

    moe_runs: list[dict[str, Any]] = []
    for g in groups:
        if not g.is_moe:
            continue
        for run, recs in zip(g.runs, g.metrics, strict=True):
            name = _safe(run.name)
            entry: dict[str, Any] = {"run": str(run), "group": g.label}
            p = plot_training_load(recs, out / f"{prefix}expert_load_training_{name}.png",
                                   f"{run.name}: expert load during training")  # fmt: skip
            if p is not None:
                files.append(p.name)
                entry["training_load_png"] = p.name
            try:
                model, tok = load_for_inference(run)
            except FileNotFoundError:
                moe_runs.append(entry)  # no checkpoint yet: only the training heatmap
                continue
            if text is None:
                d = read_state(find_checkpoint(run))["config"]["data"]
                ids = TextData(Path(d["path"]), tok, d["val_fraction"]).val
                source = "validation split"
            else:
                ids = torch.tensor(tok.encode(text.read_text(encoding="utf-8")))
                source = str(text)
            ids = ids[:max_tokens]
            counts = expert_token_counts(model, ids)
            top_k = model.config.moe.top_k
            load = load_matrix(counts)
            n_tok = (len(ids) // model.config.block_size) * model.config.block_size
            png = plot_expert_load(
                load, out / f"{prefix}expert_load_{name}.png",
                f"{run.name}: token share per expert ({n_tok} tokens of the {source})",
            )  # fmt: skip
            files.append(png.name)
            profiles = expert_profiles(counts, tok.decode, top_k, top)
            entry.update(
                load_png=png.name,
                tokens_routed=n_tok,
                source=source,
                load=load.tolist(),
                max_load=float(load.max()),
                min_load=float(load.min()),
                table=specialisation_table(profiles),
                owned=owned_tokens(counts, tok.decode, top_k),
            )
            moe_runs.append(entry)

    md = _markdown(groups, group_rows, moe_runs, loss_png.name)
    (out / f"{prefix}report.md").write_text(md, encoding="utf-8")
    result = {
        "groups": group_rows,
        "runs": [asdict(s) | {"group": g.label} for g in groups for s in g.summaries],
        "moe_runs": [{k: v for k, v in e.items() if k != "table"} for e in moe_runs],
        "files": [*files, f"{prefix}report.md", f"{prefix}report.json"],
    }
    (out / f"{prefix}report.json").write_text(json.dumps(result, indent=1) + "\n")
    return result


def _markdown(
    groups: list[RunGroup],
    group_rows: list[dict[str, Any]],
    moe_runs: list[dict[str, Any]],
    loss_png: str,
) -> str:
    lines = ["# LM runs report", "", "## Groups (same config but the seed)", ""]
    lines += [
        "| model | runs | steps | tokens | val loss mean ± std | train loss | tokens/s "
        "| params total | params active |",
        "|---|---:|---:|---:|---|---:|---:|---:|---:|",
    ]
    for r in group_rows:
        std = "" if r["val_loss_std"] is None else f" ± {r['val_loss_std']:.4f}"
        tok = "-" if r["tokens"] is None else f"{r['tokens'] / 1e6:.2f}M"
        lines.append(
            f"| {r['label']} | {r['n']} | {r['step']} | {tok} | {_fmt(r['val_loss_mean'])}{std} "
            f"| {_fmt(r['train_loss_mean'])} | {_fmt(r['tokens_per_s_mean'], '.0f')} "
            f"| {_fmt(r['params_total'], ',')} | {_fmt(r['params_active'], ',')} |"
        )
    lines += ["", "## Runs", "", "| run | model | step | train | val | best val | tokens/s |",
              "|---|---|---:|---:|---:|---:|---:|"]  # fmt: skip
    for g in groups:
        for s in g.summaries:
            lines.append(
                f"| {Path(s.run).name} | {g.label} | {s.step} | {_fmt(s.train_loss)} "
                f"| {_fmt(s.val_loss)} | {_fmt(s.best_val_loss)} | {_fmt(s.tokens_per_s, '.0f')} |"
            )
    lines += ["", "Tokens/s: median over the run's log records (training steps only).", "",
              "## Loss curves", "", f"![loss curves]({loss_png})", ""]  # fmt: skip
    for e in moe_runs:
        name = Path(e["run"]).name
        lines += [f"## Experts of {name} ({e['group']})", ""]
        if "training_load_png" in e:
            lines += [f"![expert load during training]({e['training_load_png']})", ""]
        if "load_png" not in e:
            lines += ["(no checkpoint yet)", ""]
            continue
        lines += [
            f"![expert load]({e['load_png']})", "",
            f"Load range over experts: {e['min_load']:.1%} - {e['max_load']:.1%} "
            f"(balanced: {1 / len(e['load'][0]):.1%}); {e['tokens_routed']} tokens of the "
            f"{e['source']}.", "",
            e["table"], "",
        ]  # fmt: skip
    return "\n".join(lines)
