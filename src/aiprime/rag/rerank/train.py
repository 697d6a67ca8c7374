"""``aiprime rerank train``: fit the re-rankers on a BEIR split's judgements.

Candidates come from the hybrid retriever exactly as at search time. The logistic
regression is fitted on all queries of the split (its C chosen by grouped CV); the
cross-encoder is fine-tuned on 80% of the queries and its blend with the LR score is
tuned on the other 20%, so nothing is tuned on what it was trained on, and nothing on
the split that is reported.
"""

from __future__ import annotations

import hashlib
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from aiprime.config import Settings
from aiprime.embed import Embedder
from aiprime.store import Hit

DEPTH = 300  # chunks fetched per retriever, as in the evaluation


def held_out(qid: str, fraction: float = 0.2) -> bool:
    """Deterministic query split, stable across runs and machines."""
    h = int(hashlib.sha256(qid.encode()).hexdigest()[:8], 16)
    return h / 0xFFFFFFFF < fraction


def _copy_hits(ranked: dict[str, list[Hit]]) -> dict[str, list[Hit]]:
    """Stages rescore hits in place; each experiment starts from fresh copies."""
    return {
        q: [Hit(**{**h.__dict__, "scores": dict(h.scores)}) for h in hs] for q, hs in ranked.items()
    }


def candidates_for(
    settings: Settings,
    dataset: Path,
    split: str,
    progress: Any = None,
    embedder: Embedder | None = None,
) -> tuple[dict[str, str], dict[str, dict[str, int]], dict[str, list[Hit]]]:
    """Queries, qrels and each query's fused top-``rerank.depth`` chunks."""
    from aiprime.rag.beir import fetch_components, load_beir, open_beir_kb

    data = load_beir(dataset, split)
    kb, _ = open_beir_kb(settings, dataset, data.corpus, progress, embedder)
    if progress is not None:
        progress.task(f"candidates for {split}", len(data.queries))
    adv = None if progress is None else progress.advance
    comps = fetch_components(kb.retriever, data.queries, DEPTH, adv)
    fused = comps.fuse(kb.settings.retrieve, "hybrid")
    depth = settings.rerank.depth
    return data.queries, data.qrels, {q: hs[:depth] for q, hs in fused.items()}


def _ndcg(ranked: dict[str, list[Hit]], qrels: dict[str, dict[str, int]]) -> float:
    from aiprime.rag.beir import metrics, to_run

    return metrics(to_run(ranked), {q: qrels[q] for q in ranked})["ndcg@10"]


def train_lr_stage(
    queries: dict[str, str],
    qrels: dict[str, dict[str, int]],
    cands: dict[str, list[Hit]],
    out: Path,
    depth: int,
) -> dict[str, Any]:
    from aiprime.rag.rerank.lr import build_training_set, train_lr

    ts = build_training_set(queries, cands, qrels, depth)
    model = train_lr(ts, qrels)
    model.save(out)
    return {"path": str(out), **{k: v for k, v in model.meta.items() if k != "cv_trials"}}


def train_ce_stage(
    settings: Settings,
    queries: dict[str, str],
    qrels: dict[str, dict[str, int]],
    cands: dict[str, list[Hit]],
    out_dir: Path,
    base: str,
    epochs: int,
    max_queries: int | None,
    lr_model: Path | None,
    on_step: Callable[[int, int, float], None] | None = None,
    groups_file: Path | None = None,
    lr: float = 3e-5,
    negatives: int = 7,
    groups_per_batch: int = 4,
) -> dict[str, Any]:
    """Fine-tune on the 80% of queries, then tune the blend weight on the other 20%.

    ``epochs == 0`` skips fine-tuning: ``base`` must already be a cross-encoder (e.g. a
    checkpoint trained elsewhere with the same groups); it is copied to ``out_dir`` and
    only the blend is tuned.
    """
    from aiprime.rag.rerank.cross_encoder import (
        CrossEncoderModel,
        CrossEncoderReranker,
        make_groups,
        resolve_cross_encoder,
        save_groups,
        train_cross_encoder,
        update_meta,
    )

    fit_q = [q for q in queries if not held_out(q)]
    tune_q = [q for q in queries if held_out(q)]
    if max_queries is not None:
        fit_q = fit_q[:max_queries]
        tune_q = tune_q[: max(1, max_queries // 4)]
    groups = make_groups({q: queries[q] for q in fit_q}, {q: cands[q] for q in fit_q}, qrels)
    if groups_file is not None:
        save_groups(groups_file, groups)
    report: dict[str, Any] = {"fit_queries": len(fit_q), "tune_queries": len(tune_q)}
    if epochs > 0:
        report["training"] = train_cross_encoder(
            groups,
            base,
            out_dir,
            epochs=epochs,
            negatives=negatives,
            groups_per_batch=groups_per_batch,
            lr=lr,
            max_length=settings.rerank.ce_max_length,
            on_step=on_step,
        )
    else:
        src = resolve_cross_encoder(base)
        if src != out_dir.resolve():
            shutil.rmtree(out_dir, ignore_errors=True)
            shutil.copytree(src, out_dir)
    # Blend tuning on held-out train queries, over the same stack it will serve in.
    tune = _copy_hits({q: cands[q] for q in tune_q if q in cands})
    if lr_model is not None and lr_model.is_file():
        from aiprime.rag.rerank.lr import LRReranker

        lr_stage = LRReranker.from_path(lr_model, settings.rerank.depth)
        tune = {q: lr_stage.rerank(queries[q], hs) for q, hs in tune.items()}
    model = CrossEncoderModel(out_dir, settings.rerank.ce_max_length, settings.rerank.ce_batch_size)
    top_k = settings.rerank.ce_top_k
    logits = {q: model.score(queries[q], [h.content for h in hs[:top_k]]) for q, hs in tune.items()}
    trials = []
    best: tuple[float, float] | None = None
    for w in np.round(np.arange(0.0, 1.0001, 0.1), 2):
        ce = CrossEncoderReranker(model, top_k, float(w))
        ranked: dict[str, list[Hit]] = {}
        for q, hs in _copy_hits(tune).items():
            head = hs[:top_k]
            for h, s in zip(head, logits[q], strict=True):
                h.scores["_ce"] = float(s)
            ranked[q] = _rescore(ce, head, hs[top_k:])
        nd = _ndcg(ranked, qrels) if ranked else 0.0
        trials.append({"blend": float(w), "ndcg@10": nd})
        if best is None or nd > best[0] + 1e-9:
            best = (nd, float(w))
    assert best is not None
    update_meta(out_dir, blend=best[1], blend_trials=trials, blend_tuned_on=len(tune))
    report.update({"path": str(out_dir), "blend": best[1], "tune_ndcg@10": best[0]})
    return report


def _rescore(ce: Any, head: list[Hit], rest: list[Hit]) -> list[Hit]:
    """The cross-encoder stage with precomputed logits (so the grid costs no inference)."""
    from aiprime.rag.rerank.base import apply_scores
    from aiprime.rag.rerank.cross_encoder import _z
    from aiprime.rag.rerank.stack import _above

    c = np.array([h.scores["_ce"] for h in head])
    p = np.array([h.score for h in head])
    final = c if ce.blend >= 1.0 else ce.blend * _z(c) + (1 - ce.blend) * _z(p)
    return _above(apply_scores(head, final.tolist(), "cross-encoder", None), rest)


def calibrate_answers(
    settings: Settings,
    dataset: Path,
    split: str,
    stages: list[str],
    max_queries: int | None = None,
    report_split: str | None = None,
    progress: Any = None,
    embedder: Embedder | None = None,
    keep: float | None = 0.95,
) -> dict[str, Any]:
    """Choose the no-answer threshold of ``stages``' final score on ``split``.

    Candidates come from the hybrid retriever as at search time and go through the same
    stack that ``ask`` uses; ``report_split`` (never used for the choice) measures how well
    the threshold carries over. ``max_queries`` samples queries (seeded) to bound the
    cross-encoder's cost. ``keep``: see ``choose_threshold``.
    """
    import random

    from aiprime.rag.answer import answer_signal, choose_threshold, gate_accuracy, gate_examples
    from aiprime.rag.beir import BeirError
    from aiprime.rag.rerank.stack import build_stack

    if report_split is not None and report_split == split:
        raise BeirError(f"refusing to report on the calibration split ({split!r})")
    stack = build_stack(settings, stages, embedder) if stages else None

    def examples(sp: str) -> tuple[list[float], list[float], str]:
        queries, qrels, cands = candidates_for(settings, dataset, sp, progress, embedder)
        qids = sorted(cands)
        if max_queries is not None and len(qids) > max_queries:
            qids = sorted(random.Random(0).sample(qids, max_queries))
        if progress is not None and stack is not None:
            progress.task(f"re-ranking {sp} ({'+'.join(stack.names)})", len(qids))
        ranked: dict[str, list[Hit]] = {}
        for q in qids:
            ranked[q] = stack.rerank(queries[q], cands[q]) if stack else cands[q]
            if progress is not None and stack is not None:
                progress.advance(1)
        model_id = (embedder.model_id if embedder else None) or _model_id(settings)
        signal = answer_signal(stack.names if stack else [], model_id)
        pos, neg = gate_examples(ranked, qrels, signal)
        return pos, neg, signal

    pos, neg, signal = examples(split)
    chosen = choose_threshold(pos, neg, keep)
    out: dict[str, Any] = {
        "signal": signal,
        "dataset": str(dataset),
        "split": split,
        "queries": max_queries,
        **chosen,
    }
    if report_split is not None:
        rpos, rneg, _ = examples(report_split)
        out["report"] = {"split": report_split, **gate_accuracy(rpos, rneg, chosen["threshold"])}
    return out


def _model_id(settings: Settings) -> str:
    from aiprime.embed.base import model_name

    return model_name(settings.embed.model)
