"""Fine-tune the cross-encoder on a GPU machine, away from the store.

Inputs (made on the CPU machine by ``aiprime rerank train`` or the same functions):
``groups.jsonl.gz`` (train-split queries with hard negatives from the hybrid retriever)
and ``tune.jsonl.gz`` (held-out train queries: their LR-ranked top-20 with labels). Each
configuration is trained with ``train_cross_encoder``; the one with the best held-out
nDCG@10 (blend with the LR score tuned there too) is written as fp16 safetensors shards,
small enough to copy back; ``--assemble SHARDS --out DIR`` joins them into an fp32
checkpoint, installed with ``aiprime rerank train --ce-epochs 0 --ce-base DIR``, which
re-tunes the blend on the CPU machine.

GPU machine:  python benchmarks/rerank_ce_gpu.py --data .ce --out OUT --configs 10:1e-4
CPU machine:  python benchmarks/rerank_ce_gpu.py --assemble OUT --out out/ce-gpu/ce-run2
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
from pathlib import Path

import numpy as np


def ndcg10(ranked_docs: list[str], qrels: dict[str, int]) -> float:
    gains = [qrels.get(d, 0) for d in ranked_docs[:10]]
    dcg = sum(g / math.log2(i + 2) for i, g in enumerate(gains))
    ideal = sorted(qrels.values(), reverse=True)[:10]
    idcg = sum(g / math.log2(i + 2) for i, g in enumerate(ideal))
    return dcg / idcg if idcg > 0 else 0.0


def doc_order(hits: list[dict], scores: np.ndarray) -> list[str]:
    best: dict[str, float] = {}
    for h, s in zip(hits, scores, strict=True):
        best[h["doc_id"]] = max(best.get(h["doc_id"], -np.inf), float(s))
    return sorted(best, key=lambda d: -best[d])


def z(x: np.ndarray) -> np.ndarray:
    sd = x.std()
    return (x - x.mean()) / sd if sd > 1e-12 else np.zeros_like(x)


def assemble(src: Path, dst: Path) -> None:
    """Back on the CPU machine: join the fp16 shards into one fp32 checkpoint, with the
    MiniLM tokenizer files (the tokenizer is unchanged by fine-tuning)."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    from aiprime.embed import resolve_model_path

    dst.mkdir(parents=True, exist_ok=True)
    w: dict[str, torch.Tensor] = {}
    for f in sorted(src.glob("shard-*.safetensors")):
        w.update(load_file(str(f)))
    parts: dict[str, dict[int, torch.Tensor]] = {}
    out: dict[str, torch.Tensor] = {}
    for k, t in w.items():
        if "@@" in k:
            base, j = k.split("@@")
            parts.setdefault(base, {})[int(j)] = t
        else:
            out[k] = t.float().contiguous()
    for base, ps in parts.items():
        out[base] = torch.cat([ps[j] for j in sorted(ps)]).float().contiguous()
    save_file(out, str(dst / "model.safetensors"), metadata={"format": "pt"})
    for n in ("config.json", "aiprime-cross-encoder.json"):
        (dst / n).write_text((src / n).read_text())
    m = resolve_model_path("all-MiniLM-L6-v2")
    for n in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"):
        shutil.copy(m / n, dst / n)


def main() -> None:
    from aiprime.rag.rerank.cross_encoder import (
        CrossEncoderModel,
        load_groups,
        train_cross_encoder,
    )

    ap = argparse.ArgumentParser()
    ap.add_argument("--data", type=Path, default=Path(".ce"))
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--configs", default="2:3e-5,4:3e-5,4:6e-5")
    ap.add_argument("--negatives", type=int, default=15)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--assemble", type=Path, help="Join shards from this dir into --out.")
    a = ap.parse_args()
    if a.assemble is not None:
        assemble(a.assemble, a.out)
        return
    groups = load_groups(a.data / "groups.jsonl.gz")
    with gzip.open(a.data / "tune.jsonl.gz", "rt") as f:
        tune = [json.loads(x) for x in f]
    base = np.mean(
        [
            ndcg10(doc_order(t["hits"], np.array([h["score"] for h in t["hits"]])), t["qrels"])
            for t in tune
        ]
    )
    results: list[dict] = [{"config": "lr-only (top-20 view)", "ndcg@10": float(base)}]
    best = None
    for i, cfg in enumerate(a.configs.split(",")):
        ep, lr = cfg.split(":")
        out = Path(f"/tmp/ce-{i}")
        rep = train_cross_encoder(
            groups,
            a.data / "minilm",
            out,
            epochs=int(ep),
            negatives=a.negatives,
            groups_per_batch=8,
            lr=float(lr),
            device=a.device,
            on_step=lambda *_: None,
        )
        m = CrossEncoderModel(out, 256, 128, a.device)
        logits = [m.score(t["query"], [h["content"] for h in t["hits"]]) for t in tune]
        per_w = {}
        for w in np.round(np.arange(0, 1.0001, 0.1), 2):
            per_w[float(w)] = float(
                np.mean(
                    [
                        ndcg10(
                            doc_order(
                                t["hits"],
                                w * z(c) + (1 - w) * z(np.array([h["score"] for h in t["hits"]])),
                            ),
                            t["qrels"],
                        )
                        for t, c in zip(tune, logits, strict=True)
                    ]
                )
            )
        bw = max(per_w, key=lambda w: per_w[w])
        r = {
            "config": cfg,
            "training": rep,
            "blend_ndcg@10": per_w,
            "best_blend": bw,
            "ndcg@10": per_w[bw],
        }
        results.append(r)
        print(
            json.dumps({k: r[k] for k in ("config", "best_blend", "ndcg@10")}),
            rep["loss_last20"],
            rep["seconds"],
            flush=True,
        )
        if best is None or r["ndcg@10"] > best[0]:
            best = (r["ndcg@10"], out, r)
    assert best is not None
    import torch
    from safetensors.torch import load_file, save_file

    a.out.mkdir(parents=True, exist_ok=True)
    w = load_file(str(best[1] / "model.safetensors"))
    keys = sorted(w)
    shard: dict[str, torch.Tensor] = {}
    size, n = 0, 0
    parts: dict[str, torch.Tensor] = {}
    for k in keys:  # no file may exceed 16 MB: split the embedding matrix by rows
        t = w[k].to(torch.float16).contiguous()
        if t.numel() > 3_000_000:
            for j, p in enumerate(torch.chunk(t, math.ceil(t.numel() / 3_000_000))):
                parts[f"{k}@@{j}"] = p.contiguous()
        else:
            parts[k] = t
    for k, t in parts.items():
        if size + t.numel() * 2 > 14_000_000 and shard:
            save_file(shard, str(a.out / f"shard-{n}.safetensors"))
            n += 1
            shard, size = {}, 0
        shard[k] = t
        size += t.numel() * 2
    save_file(shard, str(a.out / f"shard-{n}.safetensors"))
    for name in ("config.json", "aiprime-cross-encoder.json"):
        (a.out / name).write_text((best[1] / name).read_text())
    (a.out / "results.json").write_text(
        json.dumps({"chosen": best[2]["config"], "results": results}, indent=2)
    )


if __name__ == "__main__":
    main()
