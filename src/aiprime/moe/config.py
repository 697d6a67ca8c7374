"""Configuration of an MoE layer."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

RouterKind = Literal["topk", "expert_choice"]
ScoreFunc = Literal["softmax", "sigmoid"]
Activation = Literal["swiglu", "gelu"]


@dataclass(frozen=True)
class MoEConfig:
    """All knobs of :class:`~aiprime.moe.MoELayer` in one place, so a model config can nest it.

    ``capacity_factor_*`` of ``None`` means dropless (every routed token is computed).
    ``top_k`` is also the compute budget of expert-choice routing: each expert takes
    ``capacity_factor * n_tokens * top_k / n_experts`` tokens.
    """

    d_model: int
    d_ff: int
    n_experts: int
    top_k: int = 2
    router: RouterKind = "topk"
    score_func: ScoreFunc = "softmax"
    renormalize: bool = True
    jitter: float = 0.0
    capacity_factor_train: float | None = None
    capacity_factor_eval: float | None = None
    n_shared_experts: int = 0
    activation: Activation = "swiglu"
    aux_loss_weight: float = 0.01
    z_loss_weight: float = 0.001
    bias_balancing: bool = False
    bias_update_rate: float = 1e-3
    router_init_std: float = 0.02

    def __post_init__(self) -> None:
        if self.d_model <= 0 or self.d_ff <= 0 or self.n_experts <= 0:
            raise ValueError("d_model, d_ff and n_experts must be positive")
        if not 1 <= self.top_k <= self.n_experts:
            raise ValueError(f"top_k must be in [1, n_experts], got {self.top_k}")
        if self.router not in ("topk", "expert_choice"):
            raise ValueError(f"unknown router {self.router!r}")
        if self.score_func not in ("softmax", "sigmoid"):
            raise ValueError(f"unknown score_func {self.score_func!r}")
        if self.activation not in ("swiglu", "gelu"):
            raise ValueError(f"unknown activation {self.activation!r}")
        for cf in (self.capacity_factor_train, self.capacity_factor_eval):
            if cf is not None and cf <= 0:
                raise ValueError("capacity factors must be positive or None (dropless)")
        if self.jitter < 0:
            raise ValueError("jitter must be >= 0")
        if self.bias_balancing and self.router != "topk":
            raise ValueError("bias balancing only applies to token-choice (topk) routing")

    @classmethod
    def fine_grained(
        cls,
        d_model: int,
        dense_d_ff: int,
        n_experts: int,
        top_k: int,
        granularity: int,
        **kwargs: object,
    ) -> MoEConfig:
        """Split each expert into ``granularity`` smaller ones (DeepSeekMoE), keeping active FLOPs.

        ``n_experts`` and ``top_k`` are multiplied and ``d_ff`` divided by ``granularity``,
        so per-token compute is unchanged while routing gets more combinations.
        """
        if dense_d_ff % granularity:
            raise ValueError("dense_d_ff must be divisible by granularity")
        return cls(
            d_model=d_model,
            d_ff=dense_d_ff // granularity,
            n_experts=n_experts * granularity,
            top_k=top_k * granularity,
            **kwargs,  # type: ignore[arg-type]
        )


def expert_capacity(n_tokens: int, n_experts: int, top_k: int, capacity_factor: float) -> int:
    """Slots per expert: ``ceil(cf * n_tokens * top_k / n_experts)``, at least 1.

    Counting ``top_k`` makes ``cf = 1`` mean "exactly enough slots if perfectly balanced"
    for every k, which is the GShard/Switch convention.
    """
    return max(1, math.ceil(capacity_factor * n_tokens * top_k / n_experts))
