"""Collect the per-query SciFact runs of the cheap (BM25) and expensive (hybrid +
cross-encoder) pipelines for the cost/quality routing experiment (docs/routing.md).

Reads the evaluation home (``aiprime eval beir`` + ``aiprime rerank train`` outputs) only;
embeds queries with the routing home's embedder and cache. Resumable.

    python benchmarks/routing_cost_collect.py --eval-home out/evalhome \
        --home out/routehome --out out/routing/cost_runs.jsonl
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> None:
    import torch

    # One intra-op thread: on a shared, loaded CPU torch's pool oversubscribes the cores
    # and the cross-encoder ran several times slower with two threads than with one.
    torch.set_num_threads(1)
    from aiprime.config import load_settings
    from aiprime.embed import load_embedder
    from aiprime.routing.costdata import collect_cost_runs

    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--eval-home", type=Path, default=Path("out/evalhome"))
    p.add_argument("--home", type=Path, default=Path("out/routehome"))
    p.add_argument("--dataset", type=Path, default=Path("../shared/data/scifact"))
    p.add_argument("--out", type=Path, default=Path("out/routing/cost_runs.jsonl"))
    p.add_argument("--limit", type=int, default=None)
    a = p.parse_args()
    emb = load_embedder(load_settings(a.home))
    t0 = time.time()
    n = [0]

    def show(row: dict) -> None:
        n[0] += 1
        print(
            f"{n[0]} {row['split']} {row['qid']} cheap={row['cheap_ndcg']:.3f} "
            f"exp={row['expensive_ndcg']:.3f} {row['expensive_ms']:.0f}ms "
            f"t={time.time() - t0:.0f}s",
            flush=True,
        )

    collect_cost_runs(a.eval_home, a.dataset, a.out, emb, limit=a.limit, on_row=show)


if __name__ == "__main__":
    main()
