"""Retrieval benchmark: aiprime vs the LangChain tutorial pipeline, same corpus, one run.

Baseline: RecursiveCharacterTextSplitter(1000, 200) + HuggingFaceEmbeddings (the same
all-MiniLM-L6-v2, PyTorch) + FAISS, each document scored by its best chunk.
aiprime: the default configuration (structure-aware chunks, ONNX int8 embedder, LanceDB,
hybrid BM25 + dense).

Both pipelines load their model and import their index library (FAISS; LanceDB, which
also connects to its empty database) before the clock starts; ingest is timed from raw
documents to a searchable index, with an empty embedding cache (a cold ingest).
Queries are interleaved (one query to each system in turn) so both see the same noise.

    python benchmarks/rag_bench.py --dataset ../shared/data/scifact --out out/rag.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("LANCE_LOG", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Both pipelines run in this one process, in turn. With OpenMP's default (active) wait,
# torch's worker threads keep spinning on the cores for a while after each call and slow
# whatever runs next (ONNX Runtime's threads, or torch's own next call): measured on a
# 1,000-document run on the busy 2-core machine (one run each, noisy), p50 53 -> 26 ms
# (aiprime) and 104 -> 26 ms (LangChain) with passive waiting. Passive waiting is what a
# server process that does other work would use.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np
import torch
from _common import write_results

from aiprime.config import load_settings
from aiprime.embed import CachedEmbedder, EmbeddingCache, load_embedder
from aiprime.rag.beir import load_beir, metrics
from aiprime.rag.fusion import best_per_doc
from aiprime.rag.kb import KnowledgeBase

CHUNK_DEPTH = 30  # chunks fetched per query, collapsed to the top-10 documents


def subset(dataset: Path, split: str, limit: int | None, workdir: Path) -> tuple[Path, dict, dict]:
    data = load_beir(dataset, split)
    docs = [json.loads(line) for line in data.corpus.open() if line.strip()]
    if limit:
        docs = docs[:limit]
        keep = {d["_id"] for d in docs}
        qrels = {q: r for q, r in data.qrels.items() if set(r) <= keep}
        corpus = workdir / "corpus.jsonl"
        with corpus.open("w") as f:
            for d in docs:
                f.write(json.dumps(d) + "\n")
    else:
        qrels, corpus = data.qrels, data.corpus
    queries = {q: data.queries[q] for q in qrels}
    return corpus, queries, qrels


def pct(xs: list[float], p: float) -> float:
    return float(np.percentile(np.asarray(xs) * 1000.0, p))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--dataset", type=Path, required=True)
    ap.add_argument("--split", default="test")
    ap.add_argument("--limit", type=int, default=None, help="first N corpus documents only")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from langchain_community.vectorstores import FAISS
    from langchain_core.documents import Document
    from langchain_huggingface import HuggingFaceEmbeddings
    from langchain_text_splitters import RecursiveCharacterTextSplitter

    from aiprime.embed import resolve_model_path

    work = Path(tempfile.mkdtemp(prefix="rag-bench-"))
    corpus, queries, qrels = subset(args.dataset, args.split, args.limit, work)
    docs = [json.loads(line) for line in corpus.open() if line.strip()]
    print(f"{len(docs)} documents, {len(queries)} queries ({args.split})")

    # --- baseline: LangChain tutorial pipeline ---------------------------------------
    lc_emb = HuggingFaceEmbeddings(
        model_name=str(resolve_model_path("all-MiniLM-L6-v2")),
        model_kwargs={"device": "cpu"},
        encode_kwargs={"normalize_embeddings": True},
    )
    lc_emb.embed_query("warm-up")
    import faiss  # noqa: F401  (FAISS.from_documents imports it on first use)

    t0 = time.perf_counter()
    splitter = RecursiveCharacterTextSplitter(chunk_size=1000, chunk_overlap=200)
    lc_docs = splitter.split_documents(
        [
            Document(page_content=f"{d['title']}\n{d['text']}", metadata={"doc_id": d["_id"]})
            for d in docs
        ]
    )
    vs = FAISS.from_documents(lc_docs, lc_emb)
    lc_ingest = time.perf_counter() - t0
    print(f"langchain: {len(lc_docs)} chunks in {lc_ingest:.1f}s")

    # --- aiprime ------------------------------------------------------------------------
    settings = load_settings(home=work / "home")
    settings.ensure_dirs()
    inner = load_embedder(settings, cached=False)  # loads (first use: exports) the model
    inner.encode(["warm-up"])
    emb = CachedEmbedder(inner, EmbeddingCache(settings.cache_dir / "embeddings.sqlite"))
    kb = KnowledgeBase(settings, collection="bench", embedder=emb)
    _ = kb.store  # imports LanceDB and connects to the (empty) database
    t0 = time.perf_counter()
    report = kb.ingest([corpus])
    ap_ingest = time.perf_counter() - t0
    assert not report.errors, report.errors[:3]
    print(
        f"aiprime: {report.chunks_written} chunks in {ap_ingest:.1f}s "
        f"({report.chunks_embedded} embedded)"
    )
    kb.search("warm-up query")

    # --- queries, interleaved -------------------------------------------------------------
    lat: dict[str, list[float]] = {"aiprime": [], "langchain": []}
    run: dict[str, dict[str, dict[str, float]]] = {"aiprime": {}, "langchain": {}}
    for qid, text in queries.items():
        t0 = time.perf_counter()
        hits = kb.search(text, k=CHUNK_DEPTH)
        lat["aiprime"].append(time.perf_counter() - t0)
        run["aiprime"][qid] = dict(sorted(best_per_doc(hits).items(), key=lambda x: -x[1])[:10])
        t0 = time.perf_counter()
        res = vs.similarity_search_with_score(text, k=CHUNK_DEPTH)  # L2 distance
        lat["langchain"].append(time.perf_counter() - t0)
        best: dict[str, float] = {}
        for d, dist in res:
            best[d.metadata["doc_id"]] = max(best.get(d.metadata["doc_id"], -1e9), -float(dist))
        run["langchain"][qid] = dict(sorted(best.items(), key=lambda x: -x[1])[:10])

    out: dict[str, Any] = {
        "dataset": str(args.dataset),
        "split": args.split,
        "documents": len(docs),
        "queries": len(queries),
        "threads": args.threads,
        "date": time.strftime("%Y-%m-%d"),
    }
    for name, ingest_s, n_chunks in (
        ("aiprime", ap_ingest, report.chunks_written),
        ("langchain", lc_ingest, len(lc_docs)),
    ):
        prefix = "" if name == "aiprime" else "langchain_"
        out[f"{prefix}ingest_seconds"] = round(ingest_s, 2)
        out[f"{prefix}chunks"] = n_chunks
        out[f"{prefix}ingest_chunks_per_s"] = round(n_chunks / ingest_s, 2)
        out[f"{prefix}ingest_docs_per_s"] = round(len(docs) / ingest_s, 2)
        out[f"{prefix}query_p50_ms"] = round(pct(lat[name], 50), 2)
        out[f"{prefix}query_p95_ms"] = round(pct(lat[name], 95), 2)
        out[f"{prefix}ndcg@10"] = round(metrics(run[name], qrels)["ndcg@10"], 4)
    out["ratio_ingest_chunks_per_s"] = round(
        out["ingest_chunks_per_s"] / out["langchain_ingest_chunks_per_s"], 2
    )
    out["ratio_ingest_docs_per_s"] = round(
        out["ingest_docs_per_s"] / out["langchain_ingest_docs_per_s"], 2
    )
    out["query_mean_ms"] = round(1000 * statistics.mean(lat["aiprime"]), 2)
    write_results(out, args.out)


if __name__ == "__main__":
    main()
