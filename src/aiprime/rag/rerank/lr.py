"""Learned feature re-ranker: logistic regression over (query, candidate) features.

The model is a handful of numbers (scaler mean/scale, coefficients, intercept) kept in
JSON, so it loads without pickle and can be read and diffed by people.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from aiprime.rag.rerank.base import apply_scores
from aiprime.rag.rerank.features import FEATURES, featurize
from aiprime.store import Hit

FORMAT = "aiprime-lr-reranker/1"


class RerankModelError(ValueError):
    """A saved re-ranker that cannot be used (missing, wrong format, other features)."""


@dataclass
class LRModel:
    features: list[str]
    mean: np.ndarray
    scale: np.ndarray
    coef: np.ndarray
    intercept: float
    meta: dict[str, Any] = field(default_factory=dict)

    def decision(self, x: np.ndarray) -> np.ndarray:
        """Log-odds of relevance; monotone in the probability, so it ranks the same."""
        return ((x - self.mean) / self.scale) @ self.coef + self.intercept

    def save(self, path: Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        doc = {
            "format": FORMAT,
            "features": self.features,
            "scaler_mean": self.mean.tolist(),
            "scaler_scale": self.scale.tolist(),
            "coef": self.coef.tolist(),
            "intercept": self.intercept,
            "meta": self.meta,
        }
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(json.dumps(doc, indent=2) + "\n")
        tmp.replace(path)  # atomic: a reader never sees half a model
        return path

    @classmethod
    def load(cls, path: Path) -> LRModel:
        path = Path(path)
        if not path.is_file():
            raise RerankModelError(f"{path}: no re-ranker model (train one: aiprime rerank train)")
        try:
            d = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise RerankModelError(f"{path}: invalid JSON ({e.msg})") from e
        if d.get("format") != FORMAT:
            raise RerankModelError(f"{path}: not an {FORMAT} model")
        if list(d["features"]) != list(FEATURES):
            raise RerankModelError(f"{path}: trained on other features; retrain it")
        return cls(
            list(d["features"]),
            np.asarray(d["scaler_mean"], dtype=np.float64),
            np.asarray(d["scaler_scale"], dtype=np.float64),
            np.asarray(d["coef"], dtype=np.float64),
            float(d["intercept"]),
            dict(d.get("meta", {})),
        )


class LRReranker:
    """Scores every candidate with the logistic regression and sorts by it."""

    name = "lr"

    def __init__(self, model: LRModel, depth: int | None = None) -> None:
        self.model = model
        self.depth = depth

    @classmethod
    def from_path(cls, path: Path, depth: int | None = None) -> LRReranker:
        return cls(LRModel.load(path), depth)

    def rerank(self, query: str, hits: list[Hit], k: int | None = None) -> list[Hit]:
        if not hits:
            return []
        x = featurize(query, hits, self.depth)
        return apply_scores(hits, self.model.decision(x).tolist(), self.name, k)


@dataclass
class TrainingSet:
    """Candidates of many queries with 0/1 labels, flattened for scikit-learn."""

    x: np.ndarray
    y: np.ndarray
    groups: np.ndarray  # query index of each row
    qids: list[str]
    hits: list[list[Hit]]


def build_training_set(
    queries: dict[str, str],
    candidates: dict[str, list[Hit]],
    qrels: dict[str, dict[str, int]],
    depth: int | None = None,
) -> TrainingSet:
    xs, ys, gs = [], [], []
    qids = [q for q in queries if candidates.get(q)]
    for gi, q in enumerate(qids):
        hits = candidates[q]
        xs.append(featurize(queries[q], hits, depth))
        ys.append(np.array([qrels.get(q, {}).get(h.doc_id, 0) > 0 for h in hits], dtype=int))
        gs.append(np.full(len(hits), gi))
    if not xs:
        raise ValueError("no candidates to train on")
    return TrainingSet(
        np.concatenate(xs),
        np.concatenate(ys),
        np.concatenate(gs),
        qids,
        [candidates[q] for q in qids],
    )


def _ndcg_of(ts: TrainingSet, idx: Sequence[int], scores: np.ndarray, qrels: Any) -> float:
    from aiprime.rag.beir import metrics

    run: dict[str, dict[str, float]] = {}
    for gi in idx:
        rows = np.flatnonzero(ts.groups == gi)
        docs: dict[str, float] = {}
        for r, h in zip(rows, ts.hits[gi], strict=True):
            docs[h.doc_id] = max(docs.get(h.doc_id, -np.inf), float(scores[r]))
        run[ts.qids[gi]] = docs
    return metrics(run, {ts.qids[gi]: qrels[ts.qids[gi]] for gi in idx})["ndcg@10"]


def train_lr(
    ts: TrainingSet,
    qrels: dict[str, dict[str, int]],
    cs: Sequence[float] = (0.01, 0.1, 1.0, 10.0),
    class_weights: Sequence[str | None] = (None, "balanced"),
    folds: int = 5,
    seed: int = 0,
) -> LRModel:
    """Pick C and class weighting by query-grouped cross-validation (nDCG@10 of the
    re-ranked folds, the metric we report), then refit on all of ``ts``."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import GroupKFold
    from sklearn.preprocessing import StandardScaler

    t0 = time.perf_counter()
    n_groups = len(ts.qids)
    k = max(2, min(folds, n_groups))
    trials: list[dict[str, Any]] = []
    best: tuple[float, float, str | None] | None = None
    if len(np.unique(ts.y)) < 2:
        raise ValueError("training candidates need both relevant and irrelevant examples")
    splits = list(GroupKFold(n_splits=k).split(ts.x, ts.y, ts.groups)) if n_groups >= 2 else []
    for c in cs:
        for cw in class_weights:
            fold_scores = []
            for tr, te in splits:
                if len(np.unique(ts.y[tr])) < 2:
                    continue
                sc = StandardScaler().fit(ts.x[tr])
                clf = LogisticRegression(C=c, class_weight=cw, max_iter=2000, random_state=seed)
                clf.fit(sc.transform(ts.x[tr]), ts.y[tr])
                s = clf.decision_function(sc.transform(ts.x[te]))
                scores = np.zeros(len(ts.y))
                scores[te] = s
                fold_scores.append(_ndcg_of(ts, sorted(set(ts.groups[te].tolist())), scores, qrels))
            mean = float(np.mean(fold_scores)) if fold_scores else 0.0
            trials.append({"C": c, "class_weight": cw, "cv_ndcg@10": mean})
            if best is None or mean > best[0]:
                best = (mean, c, cw)
    assert best is not None
    _, c, cw = best
    sc = StandardScaler().fit(ts.x)
    scale = np.where(sc.scale_ > 1e-12, sc.scale_, 1.0)
    clf = LogisticRegression(C=c, class_weight=cw, max_iter=2000, random_state=seed)
    clf.fit((ts.x - sc.mean_) / scale, ts.y)
    meta = {
        "C": c,
        "class_weight": cw,
        "cv_folds": k,
        "cv_trials": trials,
        "cv_ndcg@10": best[0],
        "train_queries": n_groups,
        "train_rows": len(ts.y),
        "train_positives": int(ts.y.sum()),
        "seconds": round(time.perf_counter() - t0, 2),
    }
    return LRModel(
        list(FEATURES),
        sc.mean_.astype(np.float64),
        scale,
        clf.coef_[0].astype(np.float64),
        float(clf.intercept_[0]),
        meta,
    )
