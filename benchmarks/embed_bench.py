"""Embedding backends compared on the same texts, interleaved: torch vs ONNX vs ONNX int8.

Two more int8 rows isolate the batching: ``onnx-int8-64texts`` runs batches of up to 64
texts instead of 512 tokens, ``onnx-int8-1worker`` uses one core's worker instead of one
per core.

Each repetition runs every backend once over the same batch of chunks, in turn, so a
noisy machine slows all of them alike; the median over repetitions is reported, with the
cosine agreement of each backend with the torch reference.

    python benchmarks/embed_bench.py --dataset ../shared/data/scifact --n 256 --out out/embed.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np
from _common import write_results

from aiprime.config import load_settings
from aiprime.embed import load_embedder


def demo_texts(n: int) -> list[str]:
    words = [
        "retrieval",
        "hybrid",
        "sparse",
        "dense",
        "vector",
        "index",
        "chunk",
        "token",
        "model",
        "query",
    ]
    rng = np.random.default_rng(0)
    return [" ".join(rng.choice(words, size=int(rng.integers(20, 180)))) for _ in range(n)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--dataset", type=Path, default=None, help="BEIR folder (else synthetic)")
    ap.add_argument("--n", type=int, default=256, help="texts per repetition")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    if args.dataset:
        with (args.dataset / "corpus.jsonl").open() as f:
            docs = [json.loads(next(f)) for _ in range(args.n)]
        texts = [f"{d['title']}\n{d['text']}" for d in docs]
    else:
        texts = demo_texts(args.n)
    home = Path(tempfile.mkdtemp(prefix="embed-bench-"))
    configs: dict[str, dict[str, object]] = {
        "torch": {"backend": "torch"},
        "onnx": {"backend": "onnx"},
        "onnx-int8": {"backend": "onnx-int8"},
        "onnx-int8-64texts": {"backend": "onnx-int8", "batch_tokens": 1_000_000},
        "onnx-int8-1worker": {"backend": "onnx-int8", "threads": 1},
    }
    backends = tuple(configs)
    emb = {
        b: load_embedder(load_settings(home=home, embed=cfg), cached=False)
        for b, cfg in configs.items()
    }
    for e in emb.values():
        e.encode(texts[:8])  # warm-up
    times: dict[str, list[float]] = {b: [] for b in backends}
    vecs: dict[str, np.ndarray] = {}
    for _ in range(args.reps):
        for b in backends:
            t0 = time.perf_counter()
            vecs[b] = emb[b].encode(texts)
            times[b].append(time.perf_counter() - t0)
    out: dict[str, object] = {"texts": len(texts), "reps": args.reps, "date": time.strftime("%F")}
    base = statistics.median(times["torch"])
    for b in backends:
        med = statistics.median(times[b])
        out[f"{b}_texts_per_s"] = round(len(texts) / med, 2)
        out[f"{b}_speedup_vs_torch"] = round(base / med, 2)
        out[f"{b}_cosine_vs_torch_mean"] = round(float((vecs[b] * vecs["torch"]).sum(1).mean()), 5)
        out[f"{b}_cosine_vs_torch_min"] = round(float((vecs[b] * vecs["torch"]).sum(1).min()), 5)
    write_results(out, args.out)


if __name__ == "__main__":
    main()
