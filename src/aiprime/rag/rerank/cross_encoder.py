"""Neural cross-encoder re-ranker: loading, scoring and fine-tuning.

Plain ``transformers`` (``AutoModelForSequenceClassification``), so any cross-encoder
checkpoint (ms-marco-MiniLM-L-6-v2 style, one logit; or two-class heads) loads from a
local directory or the Hugging Face cache, offline. Fine-tuning starts from any BERT-like
encoder (the bundled all-MiniLM-L6-v2 by default) with a listwise loss over one positive
and hard negatives per query. This module imports neither the store nor LanceDB, so a
training run needs only torch and transformers (e.g. on a GPU machine).
"""

from __future__ import annotations

import gzip
import json
import math
import os
import random
import shutil
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from aiprime.embed.onnx import SessionPool

if TYPE_CHECKING:
    from aiprime.store import Hit

META_FILE = "aiprime-cross-encoder.json"


def resolve_cross_encoder(name: str | Path) -> Path:
    """A local directory, or a Hugging Face cache id (``cross-encoder/...``), offline."""
    p = Path(name).expanduser()
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise FileNotFoundError(f"{p}: no config.json (not a transformers checkpoint)")
        return p.resolve()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from huggingface_hub import snapshot_download

    repo = str(name) if "/" in str(name) else f"cross-encoder/{name}"
    try:
        return Path(snapshot_download(repo, local_files_only=True))
    except Exception as e:
        raise FileNotFoundError(
            f"cross-encoder {str(name)!r}: not a local directory and not in the Hugging Face "
            "cache (offline); train one with `aiprime rerank train` or pass a path"
        ) from e


def _device(device: str | None) -> str:
    import torch

    return device or ("cuda" if torch.cuda.is_available() else "cpu")


class CrossEncoderModel:
    """Scores (query, passage) pairs jointly; higher means more relevant."""

    def __init__(
        self,
        name: str | Path,
        max_length: int = 256,
        batch_size: int = 32,
        device: str | None = None,
        backend: str = "torch",
        export_dir: Path | None = None,
        threads: int = 0,
        batch_tokens: int = 512,
    ) -> None:
        """``backend``: ``torch`` (any device), ``onnx`` / ``onnx-int8`` on the CPU via
        ONNX Runtime, or ``auto`` (torch on a GPU, else onnx). The export is cached in
        ``export_dir`` (default: beside the model), keyed by the checkpoint's files, so a
        retrained model is exported again. On ONNX, pairs run unpadded in batches of one
        token length and at most ``batch_tokens`` tokens, one worker per core, as the
        embedder does."""
        from transformers import AutoTokenizer

        if backend not in ("auto", "torch", "onnx", "onnx-int8"):
            raise ValueError(
                f"cross-encoder backend {backend!r}: choose auto, torch, onnx or onnx-int8"
            )
        if backend == "auto":
            backend = "torch" if _device(device) != "cpu" else "onnx"
        self.path = resolve_cross_encoder(name)
        self.max_length = max_length
        self.batch_size = batch_size
        self.backend = backend
        self.tokenizer = AutoTokenizer.from_pretrained(str(self.path))
        meta = self.path / META_FILE
        self.meta: dict[str, Any] = json.loads(meta.read_text()) if meta.is_file() else {}
        self.batch_tokens = batch_tokens
        self.runner: SessionPool | None = None
        if backend != "torch":
            self.device = "cpu"
            self.runner = _onnx_runner(
                self.path, export_dir or self.path / "onnx", backend == "onnx-int8", threads
            )
            return
        import torch
        from transformers import AutoModelForSequenceClassification

        self.device = _device(device)
        self.model = AutoModelForSequenceClassification.from_pretrained(
            str(self.path), dtype=torch.float32
        )
        self.model.to(self.device).eval()

    def _batches(self, query: str, passages: Sequence[str], tensors: str) -> Iterable[Any]:
        """(query, passage) pairs tokenised in batches; only the passage is truncated."""
        for i in range(0, len(passages), self.batch_size):
            part = list(passages[i : i + self.batch_size])
            yield self.tokenizer(
                [query] * len(part),
                part,
                truncation="only_second",
                max_length=self.max_length,
                padding=True,
                return_tensors=tensors,
            )

    def score(self, query: str, passages: Sequence[str]) -> np.ndarray:
        """One relevance logit per passage (for two-class heads: the log-odds)."""
        if not passages:  # the tokenizer rejects an empty batch of pairs
            return np.zeros(0, dtype=np.float32)
        if self.runner is not None:
            enc = self.tokenizer(
                [query] * len(passages),
                list(passages),
                truncation="only_second",
                max_length=self.max_length,
            )
            return self.runner.run_unpadded(
                enc["input_ids"], enc.get("token_type_ids"), self.batch_size, self.batch_tokens
            )
        import torch

        out: list[np.ndarray] = []
        with torch.inference_mode():
            for enc in self._batches(query, passages, "pt"):
                logits = self.model(**enc.to(self.device)).logits.float()
                if logits.shape[-1] == 1:
                    s = logits[:, 0]
                else:
                    s = logits[:, -1] - torch.logsumexp(logits[:, :-1], dim=-1)
                out.append(s.cpu().numpy())
        return np.concatenate(out) if out else np.zeros(0, dtype=np.float32)


def export_cross_encoder_onnx(model_dir: Path, out_path: Path, quantize: bool) -> Path:
    """Export the classifier with its score head (logit, or log-odds for two classes) to
    ONNX; int8 dynamic quantisation with per-channel weights, as the embedder does."""
    import tempfile
    import warnings

    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from aiprime.embed.onnx import publish

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    try:  # eager attention exports as MatMul/Softmax, which int8 kernels handle best
        model = AutoModelForSequenceClassification.from_pretrained(
            str(model_dir), attn_implementation="eager", dtype=torch.float32
        ).eval()
    except (TypeError, ValueError):
        model = AutoModelForSequenceClassification.from_pretrained(str(model_dir)).eval()

    sample = tok(["a query", "another"], ["a passage", "a longer second passage"],
                 padding=True, return_tensors="pt")  # fmt: skip
    inputs = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in sample]

    class _Scored(torch.nn.Module):
        def __init__(self, m: torch.nn.Module) -> None:
            super().__init__()
            self.m = m

        def forward(self, *args: torch.Tensor) -> torch.Tensor:
            logits = self.m(**dict(zip(inputs, args, strict=True))).logits.float()
            if logits.shape[-1] == 1:
                return logits[:, 0]
            return logits[:, -1] - torch.logsumexp(logits[:, :-1], dim=-1)

    out_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_path.parent) as tmp:
        raw = Path(tmp) / "raw.onnx"
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                _Scored(model),
                tuple(sample[k] for k in inputs),
                str(raw),
                input_names=inputs,
                output_names=["score"],
                dynamic_axes={**{k: {0: "batch", 1: "seq"} for k in inputs}, "score": {0: "batch"}},
                opset_version=17,
                dynamo=False,
            )
        publish(raw, out_path, quantize)
    return out_path


def _onnx_runner(model_dir: Path, export_dir: Path, quantize: bool, threads: int) -> SessionPool:
    from aiprime.embed.onnx import _fingerprint

    path = export_dir / f"ce-{_fingerprint(model_dir, quantize, 0)}.onnx"
    if not path.is_file():
        export_cross_encoder_onnx(model_dir, path, quantize)
    return SessionPool(path, threads)


def _z(x: np.ndarray) -> np.ndarray:
    sd = float(x.std())
    return (x - x.mean()) / sd if sd > 1e-12 else np.zeros_like(x)


class CrossEncoderReranker:
    """Rescores the head of the list with the cross-encoder.

    ``blend`` mixes the z-scored cross-encoder score with the z-scored incoming score
    (1.0 = cross-encoder alone); a trained checkpoint carries the value tuned on held-out
    train queries, so a small fine-tuned model adds to the earlier stages instead of
    replacing them.
    """

    name = "cross-encoder"

    def __init__(
        self, model: CrossEncoderModel, top_k: int = 20, blend: float | None = None
    ) -> None:
        self.model = model
        self.depth = top_k
        self.blend = float(model.meta.get("blend", 1.0)) if blend is None else blend

    def rerank(self, query: str, hits: list[Hit], k: int | None = None) -> list[Hit]:
        from aiprime.rag.rerank.base import apply_scores

        if not hits:
            return []
        ce = self.model.score(query, [h.content for h in hits]).astype(np.float64)
        prev = np.array([h.score for h in hits], dtype=np.float64)
        for h, s in zip(hits, ce, strict=True):
            h.scores["cross-encoder_logit"] = float(s)
        final = ce if self.blend >= 1.0 else self.blend * _z(ce) + (1 - self.blend) * _z(prev)
        return apply_scores(hits, final.tolist(), self.name, k)


# -- training ----------------------------------------------------------------------------


def make_groups(
    queries: dict[str, str],
    candidates: dict[str, list[Hit]],
    qrels: dict[str, dict[str, int]],
    max_negatives: int = 30,
) -> list[dict[str, Any]]:
    """One group per (query, relevant document found): the best-ranked chunk of that
    document as the positive, the top non-relevant chunks as hard negatives."""
    groups: list[dict[str, Any]] = []
    for q, hits in candidates.items():
        rel = {d for d, s in qrels.get(q, {}).items() if s > 0}
        negs = [h.content for h in hits if h.doc_id not in rel][:max_negatives]
        seen: set[str] = set()
        for h in hits:
            if h.doc_id in rel and h.doc_id not in seen and negs:
                seen.add(h.doc_id)
                groups.append({"qid": q, "query": queries[q], "pos": h.content, "neg": negs})
    return groups


def save_groups(path: Path, groups: Iterable[dict[str, Any]]) -> Path:
    """JSON lines, gzip-compressed (the hard negatives repeat little but weigh a lot)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wt", encoding="utf-8") as f:
        for g in groups:
            f.write(json.dumps(g) + "\n")
    return path


def load_groups(path: Path) -> list[dict[str, Any]]:
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def train_cross_encoder(
    groups: Sequence[dict[str, Any]],
    base: str | Path,
    out_dir: Path,
    epochs: int = 1,
    negatives: int = 7,
    groups_per_batch: int = 4,
    lr: float = 3e-5,
    max_length: int = 256,
    seed: int = 0,
    device: str | None = None,
    on_step: Callable[[int, int, float], None] | None = None,
) -> dict[str, Any]:
    """Fine-tune a one-logit cross-encoder and save it (safetensors) to ``out_dir``.

    Loss: softmax cross-entropy over [positive, ``negatives`` hard negatives] per group
    (negatives re-sampled each epoch), which trains the ranking directly. ``on_step``
    gets (step, total_steps, loss); without it a tqdm bar shows progress.
    """
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    if not groups:
        raise ValueError("no training groups (no relevant document among the candidates)")
    t0 = time.perf_counter()
    rng = random.Random(seed)
    torch.manual_seed(seed)
    dev = _device(device)
    base_path = resolve_cross_encoder(base)
    tok = AutoTokenizer.from_pretrained(str(base_path))
    model = AutoModelForSequenceClassification.from_pretrained(
        str(base_path), num_labels=1, dtype=torch.float32
    )
    model.to(dev).train()
    steps_per_epoch = math.ceil(len(groups) / groups_per_batch)
    total = steps_per_epoch * epochs
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    warmup = max(1, total // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warmup, max(0.0, (total - s) / max(1, total - warmup)))
    )
    bar = None
    if on_step is None:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, desc="cross-encoder", unit="step")
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if dev.startswith("cuda") else None
    step, losses = 0, []
    n = 1 + negatives
    for _ in range(epochs):
        order = list(range(len(groups)))
        rng.shuffle(order)
        for b in range(0, len(order), groups_per_batch):
            batch = [groups[i] for i in order[b : b + groups_per_batch]]
            qs, ps = [], []
            for g in batch:
                negs = list(g["neg"])
                picked = (
                    rng.sample(negs, negatives)
                    if len(negs) >= negatives
                    else ([negs[j % len(negs)] for j in range(negatives)])
                )
                qs.extend([g["query"]] * n)
                ps.extend([g["pos"], *picked])
            enc = tok(
                qs,
                ps,
                truncation="only_second",
                max_length=max_length,
                padding=True,
                return_tensors="pt",
            ).to(dev)
            if autocast is not None:
                with autocast:
                    logits = model(**enc).logits
            else:
                logits = model(**enc).logits
            logits = logits.float().view(len(batch), n)
            loss = torch.nn.functional.cross_entropy(
                logits, torch.zeros(len(batch), dtype=torch.long, device=dev)
            )
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            losses.append(loss.item())
            if on_step is not None:
                on_step(step, total, losses[-1])
            elif bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}")
    if bar is not None:
        bar.close()
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.eval()
    model.save_pretrained(str(tmp), safe_serialization=True)
    tok.save_pretrained(str(tmp))
    report = {
        "base": str(base_path),
        "groups": len(groups),
        "queries": len({g.get("qid", g["query"]) for g in groups}),
        "epochs": epochs,
        "negatives": negatives,
        "batch_pairs": groups_per_batch * n,
        "lr": lr,
        "max_length": max_length,
        "steps": step,
        "loss_first20": float(np.mean(losses[:20])) if losses else None,
        "loss_last20": float(np.mean(losses[-20:])) if losses else None,
        "device": dev,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    (tmp / META_FILE).write_text(json.dumps({"blend": 1.0, "training": report}, indent=2) + "\n")
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.replace(out_dir)
    return report


def update_meta(model_dir: Path, **fields: Any) -> dict[str, Any]:
    """Merge ``fields`` into the checkpoint's aiprime metadata (e.g. the tuned blend)."""
    path = Path(model_dir) / META_FILE
    meta: dict[str, Any] = json.loads(path.read_text()) if path.is_file() else {}
    meta.update(fields)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(meta, indent=2) + "\n")
    tmp.replace(path)
    return meta
