"""Look inside trained LMs: which tokens each expert takes, and run summaries.

Both need no plotting library: the results are plain tables (rich or JSON), so ``inspect``
and ``compare`` work without the optional matplotlib; :mod:`.report` draws the plots.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from aiprime.moe.layer import MoELayer

from .model import GPT
from .train import TrainConfig, read_metrics


@torch.no_grad()
def expert_token_counts(model: GPT, ids: Tensor, batch_size: int = 16) -> list[Tensor]:
    """Per MoE layer, a ``[vocab, n_experts]`` count of (token id, chosen expert) pairs.

    The text ``ids`` (1-D) is cut into non-overlapping ``block_size`` windows; each MoE
    layer's input is re-routed in a pre-forward hook with the layer's own router (eval
    mode, so no jitter), which counts the ``top_k`` choices of every token position.
    """
    model.eval()
    t = model.config.block_size
    n = (len(ids) // t) * t
    if n == 0:
        raise ValueError(f"need at least block_size={t} tokens, got {len(ids)}")
    windows = ids[:n].view(-1, t)
    layers = [m for m in model.modules() if isinstance(m, MoELayer)]
    counts = [torch.zeros(model.config.vocab_size, m.config.n_experts) for m in layers]
    current: dict[str, Tensor] = {}

    def hook(i: int) -> Any:
        def pre(module: nn.Module, args: tuple[Tensor, ...]) -> None:
            assert isinstance(module, MoELayer)
            flat = args[0].reshape(-1, module.config.d_model)
            r, _ = module.route(flat)
            tok = current["ids"].reshape(-1, 1).expand_as(r.indices)
            counts[i].index_put_(
                (tok.reshape(-1), r.indices.reshape(-1)),
                torch.ones(tok.numel()),
                accumulate=True,
            )

        return pre

    handles = [m.register_forward_pre_hook(hook(i)) for i, m in enumerate(layers)]
    try:
        for chunk in windows.split(batch_size):
            current["ids"] = chunk
            model(chunk)
    finally:
        for h in handles:
            h.remove()
    return counts


@dataclass
class ExpertProfile:
    """One expert: its share of the routed (token, expert) pairs, and the tokens it takes
    most often, each as ``(text, share of this expert's tokens, p(chosen | token))``: the
    last is how often the expert is among that token's ``top_k`` choices (1.0 = always),
    so a high value marks a token the expert owns rather than one that is just frequent."""

    layer: int
    expert: int
    load: float
    top: list[tuple[str, float, float]]


def expert_profiles(
    counts: list[Tensor], decode: Any, top_k: int, top: int = 6
) -> list[ExpertProfile]:
    """Summaries of :func:`expert_token_counts` (``decode``: ids -> text; ``top_k`` of
    the router, to turn pair counts into token occurrences)."""
    out: list[ExpertProfile] = []
    for li, c in enumerate(counts):
        total = float(c.sum())
        occurrences = (c.sum(dim=1, keepdim=True) / top_k).clamp_min(1)
        p_e_given_tok = c / occurrences
        for e in range(c.shape[1]):
            col = c[:, e]
            n_e = float(col.sum())
            k = min(top, int((col > 0).sum()))
            vals, idx = torch.topk(col, k) if k else (col[:0], col[:0].long())
            tops = [
                (decode([int(i)]), float(v) / n_e, float(p_e_given_tok[int(i), e]))
                for v, i in zip(vals, idx, strict=True)
            ]
            out.append(ExpertProfile(li, e, n_e / total if total else 0.0, tops))
    return out


@dataclass
class RunSummary:
    run: str
    model: str
    params_total: int | None
    params_active: int | None
    step: int
    train_loss: float | None
    val_loss: float | None
    best_val_loss: float | None
    tokens_per_s: float | None
    group: str


def _describe(model_cfg: dict[str, Any]) -> str:
    m = model_cfg
    shape = f"{m['n_layer']}x{m['d_model']}"
    if not m.get("moe_every"):
        return f"dense {shape} d_ff {m['d_ff']}"
    moe = m["moe"]
    every = "" if m["moe_every"] == 1 else f" every {m['moe_every']}"
    return f"moe {shape} {moe['n_experts']}e top{moe['top_k']} d_ff {moe['d_ff']}{every}"


def summarize_run(run_dir: Path) -> RunSummary:
    """Final and best losses of a run directory, and its group key: the config without
    the seed and output paths, plus the last step, so the seeds of one experiment (and
    only they) fall in one group."""
    run_dir = Path(run_dir)
    cfg = json.loads((run_dir / "config.json").read_text())
    recs = read_metrics(run_dir)
    vals = [r["val_loss"] for r in recs if "val_loss" in r]
    speeds = [r["tokens_per_s"] for r in recs]
    counts: dict[str, Any] = {}
    state_file = run_dir / "checkpoint" / "state.json"
    if state_file.exists():
        counts = json.loads(state_file.read_text()).get("param_counts", {})
    # through TrainConfig so keys added since a run was made take their defaults and do not
    # split a group (e.g. data.bpe_encoding, absent from older config.json files)
    key_cfg = TrainConfig.from_dict(cfg).to_dict()
    key_cfg["train"].pop("seed", None)
    key_cfg["train"].pop("out_dir", None)
    key_cfg["train"].pop("threads", None)
    key_cfg["step"] = recs[-1]["step"] if recs else 0  # runs stopped early are not averaged in
    return RunSummary(
        run=str(run_dir),
        model=_describe(cfg["model"]),
        params_total=counts.get("total"),
        params_active=counts.get("active"),
        step=recs[-1]["step"] if recs else 0,
        train_loss=recs[-1]["train_loss"] if recs else None,
        val_loss=vals[-1] if vals else None,
        best_val_loss=min(vals) if vals else None,
        tokens_per_s=statistics.median(speeds) if speeds else None,
        group=json.dumps(key_cfg, sort_keys=True),
    )


def group_summaries(runs: list[RunSummary]) -> list[dict[str, Any]]:
    """Mean and sample std of the final val loss over runs with the same group key."""
    groups: dict[str, list[RunSummary]] = {}
    for r in runs:
        groups.setdefault(r.group, []).append(r)
    out = []
    for members in groups.values():
        vals = [r.val_loss for r in members if r.val_loss is not None]
        out.append(
            {
                "model": members[0].model,
                "runs": len(members),
                "val_loss_mean": statistics.fmean(vals) if vals else None,
                "val_loss_std": statistics.stdev(vals) if len(vals) > 1 else None,
                "params_active": members[0].params_active,
                "params_total": members[0].params_total,
            }
        )
    return out
