"""BEIR-format evaluation: nDCG@10, Recall@100, MRR@10 with pytrec_eval (trec_eval's code).

Documents are scored by their best chunk. Hybrid weights are tuned on a *train* split
only (``tune_hybrid``); the test split is for reporting.
"""

from __future__ import annotations

import csv
import hashlib
import json
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from aiprime.config import RetrieveSettings, Settings
from aiprime.embed import Embedder
from aiprime.rag.fusion import best_per_doc, rrf, score_mix
from aiprime.rag.retrieve import Mode, Retriever
from aiprime.store import Hit

if TYPE_CHECKING:
    from aiprime.rag.ingest import IngestReport
    from aiprime.rag.kb import KnowledgeBase

Qrels = dict[str, dict[str, int]]
Run = dict[str, dict[str, float]]


class BeirError(ValueError):
    pass


@dataclass
class BeirData:
    root: Path
    corpus: Path
    queries: dict[str, str]
    qrels: Qrels


def load_beir(root: Path, split: str) -> BeirData:
    """Read queries and qrels of ``split``; only queries that have judgements are kept."""
    root = Path(root)
    corpus = root / "corpus.jsonl"
    qfile = root / "queries.jsonl"
    rfile = root / "qrels" / f"{split}.tsv"
    for f in (corpus, qfile, rfile):
        if not f.is_file():
            raise BeirError(f"{f}: missing (a BEIR folder has corpus.jsonl, queries.jsonl, qrels/)")
    qrels: Qrels = {}
    with rfile.open(newline="") as fh:
        reader = csv.reader(fh, delimiter="\t")
        for i, row in enumerate(reader):
            if i == 0 and row and not row[-1].lstrip("-").isdigit():
                continue  # header
            if len(row) < 3:
                raise BeirError(f"{rfile}:{i + 1}: expected query-id, corpus-id, score")
            qrels.setdefault(row[0], {})[row[1]] = int(row[2])
    queries: dict[str, str] = {}
    with qfile.open() as fh:
        for i, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                q = json.loads(line)
            except json.JSONDecodeError as e:
                raise BeirError(f"{qfile}:{i}: invalid JSON ({e.msg})") from e
            if q["_id"] in qrels:
                queries[q["_id"]] = q["text"]
    missing = set(qrels) - set(queries)
    if missing:
        raise BeirError(f"{rfile}: {len(missing)} judged queries are not in {qfile}")
    return BeirData(root, corpus, queries, qrels)


def collection_for(root: Path, config_key: str = "") -> str:
    """One collection per dataset *and* embedding/chunking configuration."""
    name = "beir-" + re.sub(r"[^A-Za-z0-9_-]", "-", Path(root).resolve().name)[:40]
    if config_key:
        name += "-" + hashlib.sha256(config_key.encode()).hexdigest()[:8]
    return name


def metrics(run: Run, qrels: Qrels) -> dict[str, float]:
    """nDCG@10, Recall@100 and MRR@10, averaged over judged queries (0 for empty runs)."""
    import pytrec_eval

    full = {q: run.get(q, {}) for q in qrels}
    top10 = {q: dict(sorted(d.items(), key=lambda x: -x[1])[:10]) for q, d in full.items()}
    ev = pytrec_eval.RelevanceEvaluator(qrels, {"ndcg_cut.10", "recall.100"})
    ev_rr = pytrec_eval.RelevanceEvaluator(qrels, {"recip_rank"})
    per = ev.evaluate(full)
    per_rr = ev_rr.evaluate(top10)
    n = len(qrels)
    return {
        "ndcg@10": sum(per.get(q, {}).get("ndcg_cut_10", 0.0) for q in qrels) / n,
        "recall@100": sum(per.get(q, {}).get("recall_100", 0.0) for q in qrels) / n,
        "mrr@10": sum(per_rr.get(q, {}).get("recip_rank", 0.0) for q in qrels) / n,
    }


@dataclass
class Components:
    """Each retriever's candidate list per query, fetched once and fused many ways."""

    dense: dict[str, list[Hit]]
    bm25: dict[str, list[Hit]]
    seconds: float

    def fuse(self, settings: RetrieveSettings, mode: Mode) -> dict[str, list[Hit]]:
        out: dict[str, list[Hit]] = {}
        for q in self.dense:
            if mode == "dense":
                out[q] = self.dense[q]
            elif mode == "bm25":
                out[q] = self.bm25[q]
            elif settings.fusion == "rrf":
                out[q] = rrf({"dense": self.dense[q], "bm25": self.bm25[q]}, settings.rrf_k)
            else:
                w = settings.dense_weight
                out[q] = score_mix(
                    {"dense": self.dense[q], "bm25": self.bm25[q]},
                    {"dense": w, "bm25": 1.0 - w},
                )
        return out


def fetch_components(
    retriever: Retriever,
    queries: dict[str, str],
    depth: int,
    on_progress: Callable[[int], None] | None = None,
) -> Components:
    qids = list(queries)
    t0 = time.perf_counter()
    vecs = retriever.embedder.encode([queries[q] for q in qids])
    dense: dict[str, list[Hit]] = {}
    bm25: dict[str, list[Hit]] = {}
    for i, q in enumerate(qids):
        dense[q] = retriever.store.dense_search(vecs[i], depth)
        bm25[q] = retriever.store.text_search(queries[q], depth)
        if on_progress:
            on_progress(1)
    return Components(dense, bm25, time.perf_counter() - t0)


def to_run(ranked: dict[str, list[Hit]], n_docs: int = 100) -> Run:
    run: Run = {}
    for q, hits in ranked.items():
        docs = best_per_doc(hits)
        run[q] = dict(sorted(docs.items(), key=lambda x: -x[1])[:n_docs])
    return run


def tune_hybrid(
    comps: Components,
    qrels: Qrels,
    base: RetrieveSettings,
    weights: Sequence[float] = tuple(np.round(np.arange(0.0, 1.0001, 0.05), 2)),
) -> tuple[RetrieveSettings, list[dict[str, float]]]:
    """Grid-search the fusion on the given (train) judgements; returns the best settings."""
    trials: list[dict[str, float]] = []
    best: tuple[float, RetrieveSettings] | None = None
    candidates = [base.model_copy(update={"fusion": "rrf"})] + [
        base.model_copy(update={"fusion": "mix", "dense_weight": float(w)}) for w in weights
    ]
    for s in candidates:
        m = metrics(to_run(comps.fuse(s, "hybrid")), qrels)
        trials.append({"fusion_rrf": float(s.fusion == "rrf"), "dense_weight": s.dense_weight, **m})
        if best is None or m["ndcg@10"] > best[0]:
            best = (m["ndcg@10"], s)
    assert best is not None
    return best[1], trials


def evaluate_beir(
    settings: Settings,
    dataset: Path,
    split: str,
    retriever: Mode,
    tune_split: str | None = None,
    progress: Any = None,
    embedder: Embedder | None = None,
    rerank: Sequence[str] = (),
) -> dict[str, Any]:
    """Ingest the corpus (incrementally), optionally tune fusion on ``tune_split``, evaluate.

    ``rerank`` names re-ranking stages (``lr``, ``cross-encoder``, ``mmr``) applied in order
    to each query's fused candidates; their mean added latency is reported per stage.

    The corpus goes to its own collection, keyed by dataset and embedding/chunking
    configuration, so reruns only query and configurations never mix.
    """
    from aiprime.rag.rerank.stack import build_stack

    if tune_split is not None and tune_split == split:
        raise BeirError(f"refusing to tune on the split being reported ({split!r})")
    data = load_beir(dataset, split)
    kb, report = open_beir_kb(settings, dataset, data.corpus, progress, embedder)
    stack = build_stack(kb.settings, list(rerank), kb.embedder) if rerank else None
    rsettings: RetrieveSettings = kb.settings.retrieve
    depth = 300  # chunks; enough to fill 100 documents at ~2-3 chunks per document
    tuning: list[dict[str, float]] | None = None
    if tune_split is not None and retriever == "hybrid":
        tdata = load_beir(dataset, tune_split)
        if progress is not None:
            progress.task(f"tuning on {tune_split}", len(tdata.queries))
        tcomps = fetch_components(kb.retriever, tdata.queries, depth, _advance(progress))
        rsettings, tuning = tune_hybrid(tcomps, tdata.qrels, rsettings)
    if progress is not None:
        progress.task(f"querying {split}", len(data.queries))
    comps = fetch_components(kb.retriever, data.queries, depth, _advance(progress))
    ranked = comps.fuse(rsettings, retriever)
    if stack is not None:
        if progress is not None:
            progress.task(f"re-ranking ({'+'.join(stack.names)})", len(ranked))
        for q in ranked:
            ranked[q] = stack.rerank(data.queries[q], ranked[q])
            if progress is not None:
                progress.advance(1)
    result: dict[str, Any] = dict(metrics(to_run(ranked), data.qrels))
    result.update(
        {
            "dataset": str(Path(dataset).resolve()),
            "split": split,
            "retriever": retriever,
            "queries": len(data.queries),
            "chunks": kb.store.count(),
            "embedder": kb.embedder.model_id,
            "chunk_size_tokens": kb.settings.chunk.size_tokens,
            "chunk_overlap_tokens": kb.settings.chunk.overlap_tokens,
            "fusion": rsettings.fusion if retriever == "hybrid" else None,
            "dense_weight": rsettings.dense_weight if retriever == "hybrid" else None,
            "tuned_on": tune_split if tuning is not None else None,
            "retrieval_ms_per_query_depth300": 1000 * comps.seconds / max(1, len(data.queries)),
            "rerank": stack.names if stack is not None else [],
            "rerank_ms_per_query": stack.latency_ms() if stack is not None else {},
            "ingest": report.to_dict() | {"errors": [str(e) for e in report.errors[:20]]},
        }
    )
    if tuning is not None:
        result["tuning_trials"] = tuning
    return result


def open_beir_kb(
    settings: Settings,
    dataset: Path,
    corpus: Path,
    progress: Any = None,
    embedder: Embedder | None = None,
) -> tuple[KnowledgeBase, IngestReport]:
    """The dataset's own collection (keyed by dataset and embedding/chunking
    configuration), with the corpus ingested incrementally."""
    from aiprime.rag.kb import KnowledgeBase

    c = settings
    key = f"{c.embed.model}|{c.embed.backend}|{c.chunk.size_tokens}|{c.chunk.overlap_tokens}"
    kb = KnowledgeBase(settings, collection=collection_for(dataset, key), embedder=embedder)
    report = kb.ingest([corpus], progress)
    if report.errors and not kb.store.count():
        raise BeirError(f"{corpus}: nothing could be ingested: {report.errors[0]}")
    return kb, report


def _advance(progress: Any) -> Callable[[int], None] | None:
    return None if progress is None else progress.advance
