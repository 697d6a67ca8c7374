"""Per-query runs of a cheap and an expensive SciFact pipeline, collected once.

The cross-encoder costs seconds per query on a CPU, so the cost/quality experiment
(:func:`aiprime.routing.eval.cost_experiment`) reads these runs from a resumable JSONL file
instead of re-ranking again for every router variant.

Which train queries: the evaluation home's cross-encoder was fine-tuned on the train
queries that :func:`aiprime.rag.rerank.train.held_out` does *not* hold out; on those its
advantage is inflated, so router labels come only from the held-out ~20% of train (used
there for one blend scalar). The test split is only used for reporting.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from aiprime.config import ExpertSettings, Settings, load_settings
from aiprime.embed import Embedder
from aiprime.rag.beir import collection_for, load_beir, metrics
from aiprime.rag.fusion import best_per_doc
from aiprime.routing.experts import Expert, expert_settings
from aiprime.store import Hit

CHEAP = ExpertSettings(name="cheap", collection="", mode="bm25", rerank=[], cost=1.0)
EXPENSIVE = ExpertSettings(
    name="expensive", collection="", mode="hybrid", rerank=["cross-encoder"], cost=100.0
)


def scifact_collection(settings: Settings, dataset: Path) -> str:
    """The collection ``aiprime eval beir`` built for the default embedding/chunking."""
    c = settings
    key = f"{c.embed.model}|{c.embed.backend}|{c.chunk.size_tokens}|{c.chunk.overlap_tokens}"
    return collection_for(dataset, key)


def cost_queries(dataset: Path) -> dict[str, dict[str, str]]:
    """``{"train": held-out train queries, "test": test queries}``."""
    from aiprime.rag.rerank.train import held_out

    train = load_beir(dataset, "train").queries
    test = load_beir(dataset, "test").queries
    return {"train": {q: t for q, t in train.items() if held_out(q)}, "test": test}


def _doc_run(hits: list[Hit]) -> dict[str, float]:
    docs = best_per_doc(hits)
    return dict(sorted(docs.items(), key=lambda x: -x[1])[:100])


def read_rows(path: Path) -> Iterator[dict[str, Any]]:
    if not path.is_file():
        return
    with path.open() as f:
        for line in f:
            if line.strip():
                try:
                    yield json.loads(line)
                except json.JSONDecodeError:  # a row cut short by a kill; it is redone
                    continue


def collect_cost_runs(
    eval_home: Path,
    dataset: Path,
    out: Path,
    embedder: Embedder,
    splits: tuple[str, ...] = ("train", "test"),
    limit: int | None = None,
    on_row: Callable[[dict[str, Any]], None] | None = None,
) -> Path:
    """Run both pipelines on every query and append one JSON row per query to ``out``.

    Resumable: queries already in ``out`` are skipped. The evaluation home is only read:
    the embedder (and its cache) must belong to another home.
    """
    base = load_settings(eval_home)
    coll = scifact_collection(base, dataset)
    cheap = Expert(
        CHEAP.model_copy(update={"collection": coll}),
        expert_settings(base, CHEAP.model_copy(update={"collection": coll})),
        embedder,
    )
    exp_spec = EXPENSIVE.model_copy(update={"collection": coll})
    expensive = Expert(exp_spec, expert_settings(base, exp_spec), embedder)
    dense_spec = ExpertSettings(name="dense", collection=coll, mode="dense", rerank=[])
    dense = Expert(dense_spec, expert_settings(base, dense_spec), embedder)
    done = {(r["split"], r["qid"]) for r in read_rows(out)}
    qsets = cost_queries(dataset)
    qrels = {s: load_beir(dataset, s).qrels for s in splits}
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.is_file() and out.stat().st_size and not out.read_bytes().endswith(b"\n"):
        with out.open("a") as f:  # terminate a row cut short by a kill
            f.write("\n")
    with out.open("a") as f:
        for split in splits:
            items = list(qsets[split].items())[:limit]
            for qid, text in items:
                if (split, qid) in done:
                    continue
                row: dict[str, Any] = {"split": split, "qid": qid, "query": text}
                for name, ex in (("cheap", cheap), ("dense", dense), ("expensive", expensive)):
                    t0 = time.perf_counter()
                    hits = ex.search(text, k=100)
                    row[f"{name}_ms"] = 1000 * (time.perf_counter() - t0)
                    run = _doc_run(hits)
                    row[f"{name}_run"] = run
                    row[f"{name}_top"] = [h.score for h in hits[:10]]
                    row[f"{name}_ndcg"] = metrics({qid: run}, {qid: qrels[split][qid]})["ndcg@10"]
                f.write(json.dumps(row) + "\n")
                f.flush()
                if on_row is not None:
                    on_row(row)
    return out
