"""Cross-encoder backends on the same (query, top-20 chunks) sets, interleaved:
torch fp32 vs ONNX Runtime fp32 vs ONNX Runtime int8.

Candidates are the hybrid top-``k`` of SciFact test queries from an ingested collection (as
the re-ranking stage sees them). Every query is scored by each backend in turn, so a busy
machine slows them alike; per-backend ms/query (median and mean) and ratios to torch are
printed, with how far each backend's scores and top-1 agree with torch.

    python benchmarks/rerank_ce_bench.py --home out/evalhome --dataset ../shared/data/scifact \
        --queries 40 --out out/rerank_ce_bench.json
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np
from _common import write_results

from aiprime.config import load_settings
from aiprime.rag.beir import load_beir, open_beir_kb
from aiprime.rag.rerank.cross_encoder import CrossEncoderModel
from aiprime.rag.rerank.stack import cross_encoder_path

BACKENDS = ("torch", "onnx", "onnx-int8")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--home", type=Path, required=True, help="Data dir with a trained CE.")
    ap.add_argument("--dataset", type=Path, required=True)
    ap.add_argument("--queries", type=int, default=40)
    ap.add_argument("--k", type=int, default=20, help="Chunks scored per query.")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("out/rerank_ce_bench.json"))
    a = ap.parse_args()

    s = load_settings(a.home)
    data = load_beir(a.dataset, "test")
    kb, _ = open_beir_kb(s, a.dataset, data.corpus)
    qids = sorted(data.queries)[: a.queries]
    sets = [
        (data.queries[q], [h.content for h in kb.search(data.queries[q], a.k, rerank=False)])
        for q in qids
    ]
    path = cross_encoder_path(s)
    r = s.rerank
    models = {
        b: CrossEncoderModel(
            path,
            r.ce_max_length,
            r.ce_batch_size,
            device="cpu",
            backend=b,
            export_dir=s.models_dir / "onnx",
            threads=a.threads,
        )
        for b in BACKENDS
    }
    if a.threads:
        import torch

        torch.set_num_threads(a.threads)
    for m in models.values():  # warm-up: first-call allocations and graph optimisation
        m.score(*sets[0])
    ms: dict[str, list[float]] = {b: [] for b in BACKENDS}
    scores: dict[str, list[np.ndarray]] = {b: [] for b in BACKENDS}
    for query, passages in sets:
        for b, m in models.items():
            t0 = time.perf_counter()
            scores[b].append(m.score(query, passages))
            ms[b].append(1000 * (time.perf_counter() - t0))
    out: dict[str, object] = {"queries": len(sets), "pairs_per_query": a.k}
    for b in BACKENDS:
        out[f"{b}_ms_median"] = round(statistics.median(ms[b]), 1)
        out[f"{b}_ms_mean"] = round(statistics.fmean(ms[b]), 1)
        if b != "torch":
            out[f"{b}_speedup_vs_torch"] = round(
                statistics.median(ms["torch"]) / statistics.median(ms[b]), 2
            )
            pairs = list(zip(scores[b], scores["torch"], strict=True))
            diffs = [float(np.abs(x - y).max()) for x, y in pairs]
            corr = [float(np.corrcoef(x, y)[0, 1]) for x, y in pairs]
            top1 = [int(np.argmax(x) == np.argmax(y)) for x, y in pairs]
            out[f"{b}_max_abs_diff"] = round(max(diffs), 4)
            out[f"{b}_mean_pearson"] = round(statistics.fmean(corr), 4)
            out[f"{b}_top1_agreement"] = round(statistics.fmean(top1), 3)
    write_results(out, a.out)


if __name__ == "__main__":
    main()
