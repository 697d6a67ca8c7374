"""Compose re-rankers: fused top-``depth`` → stage 1 → stage 2 on its head → ...

Each stage reorders the head of the list it is given (its ``depth``, all when None); the
rest keeps its order and is scored below the head, so deeper metrics (Recall@100) still
see every candidate. Time spent in each stage is accumulated for latency reports.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

from aiprime.config import RerankSettings, Settings
from aiprime.embed import Embedder
from aiprime.rag.rerank.base import Reranker
from aiprime.store import Hit

STAGES = ("lr", "cross-encoder", "mmr")


class RerankStack:
    def __init__(self, stages: Sequence[Reranker], depth: int = 100) -> None:
        self.stages = list(stages)
        self.depth = depth
        self.seconds: dict[str, float] = {s.name: 0.0 for s in self.stages}
        self.calls = 0

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.stages]

    def rerank(self, query: str, hits: list[Hit], k: int | None = None) -> list[Hit]:
        self.calls += 1
        head, tail = hits[: self.depth], hits[self.depth :]
        for stage in self.stages:
            d = getattr(stage, "depth", None) or len(head)
            t0 = time.perf_counter()
            top = stage.rerank(query, head[:d])
            self.seconds[stage.name] += time.perf_counter() - t0
            head = _above(top, head[d:])
        out = _above(head, tail)
        return out if k is None else out[:k]

    def latency_ms(self) -> dict[str, float]:
        """Mean milliseconds per query each stage added."""
        return {n: 1000 * s / max(1, self.calls) for n, s in self.seconds.items()}


def _above(head: list[Hit], rest: list[Hit]) -> list[Hit]:
    """``head`` then ``rest``, rescoring ``rest`` strictly below the head's minimum."""
    if head and rest:
        floor = min(h.score for h in head)
        for i, h in enumerate(rest, start=1):
            h.score = floor - i
    return head + rest


def parse_stack(spec: str) -> list[str]:
    """``"none"`` → [], ``"lr+cross-encoder"`` → ["lr", "cross-encoder"]; ``ce`` is an alias."""
    spec = spec.strip().lower()
    if spec in ("", "none"):
        return []
    names = ["cross-encoder" if p.strip() == "ce" else p.strip() for p in spec.split("+")]
    bad = [n for n in names if n not in STAGES]
    if bad:
        raise ValueError(f"re-ranker {bad[0]!r}: choose none or '+'-joined {', '.join(STAGES)}")
    return names


def lr_path(settings: Settings) -> Path:
    return settings.rerank.lr_model or settings.models_dir / "rerank" / "lr.json"


def cross_encoder_path(settings: Settings) -> str:
    return settings.rerank.cross_encoder or str(settings.models_dir / "cross-encoder")


def default_stages(settings: Settings) -> list[str]:
    """What is configured, or else every trained stage found under the data directory."""
    if settings.rerank.stack is not None:
        return list(settings.rerank.stack)
    found = []
    if lr_path(settings).is_file():
        found.append("lr")
    if Path(cross_encoder_path(settings), "config.json").is_file():
        found.append("cross-encoder")
    return found


def build_stack(
    settings: Settings, stages: Sequence[str] | None = None, embedder: Embedder | None = None
) -> RerankStack | None:
    """The configured stack (``stages`` overrides the settings); None when it is empty."""
    names = default_stages(settings) if stages is None else list(stages)
    if not names:
        return None
    r: RerankSettings = settings.rerank
    built: list[Reranker] = []
    for n in names:
        if n == "lr":
            from aiprime.rag.rerank.lr import LRReranker

            built.append(LRReranker.from_path(lr_path(settings), depth=r.depth))
        elif n == "cross-encoder":
            from aiprime.rag.rerank.cross_encoder import CrossEncoderModel, CrossEncoderReranker

            model = CrossEncoderModel(
                cross_encoder_path(settings),
                r.ce_max_length,
                r.ce_batch_size,
                backend=r.ce_backend,
                export_dir=settings.models_dir / "onnx",
            )
            built.append(CrossEncoderReranker(model, r.ce_top_k))
        elif n == "mmr":
            from aiprime.rag.rerank.mmr import MMRReranker

            if embedder is None:
                raise ValueError("the mmr stage needs an embedder")
            built.append(MMRReranker(embedder, r.mmr_lambda, r.mmr_top_k))
        else:
            raise ValueError(f"unknown re-ranker {n!r}")
    return RerankStack(built, r.depth)
