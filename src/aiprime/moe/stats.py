"""Per-layer routing statistics, returned by every forward for logging."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

# Detached diagnostics computed on first access: a forward that nobody logs launches none
# of their kernels (on a GPU at a few thousand tokens, each small kernel costs about as
# much as a whole grouped matmul).
_LAZY = ("dropped_fraction", "router_entropy", "load_imbalance", "load_cv", "dead_experts")
_FIELDS = (
    "aux_loss",
    "balance_loss",
    "z_loss",
    "tokens_per_expert",
    "routed_per_expert",
    *_LAZY,
)


class MoEStats:
    """Losses (with gradient) and detached routing statistics of one MoE forward.

    ``aux_loss`` is the already-weighted sum to add to the task loss. Load statistics use
    the loads the router asked for (``routed_per_expert``, before capacity) because they
    describe the router; ``tokens_per_expert`` is what was actually computed.

    ``dropped_fraction``, ``router_entropy``, ``load_imbalance``, ``load_cv`` and
    ``dead_experts`` are either given or computed (once, without gradient) by
    ``diagnostics`` when first read.
    """

    __slots__ = (
        "_diagnostics",
        "_values",
        "aux_loss",
        "balance_loss",
        "routed_per_expert",
        "tokens_per_expert",
        "z_loss",
    )  # fmt: skip

    def __init__(
        self,
        aux_loss: Tensor,
        balance_loss: Tensor,
        z_loss: Tensor,
        tokens_per_expert: Tensor,
        routed_per_expert: Tensor,
        dropped_fraction: Tensor | None = None,
        router_entropy: Tensor | None = None,
        load_imbalance: Tensor | None = None,
        load_cv: Tensor | None = None,
        dead_experts: Tensor | None = None,
        *,
        diagnostics: Callable[[], dict[str, Tensor]] | None = None,
    ) -> None:
        self.aux_loss = aux_loss
        self.balance_loss = balance_loss
        self.z_loss = z_loss
        self.tokens_per_expert = tokens_per_expert
        self.routed_per_expert = routed_per_expert
        given = dict(
            dropped_fraction=dropped_fraction,
            router_entropy=router_entropy,
            load_imbalance=load_imbalance,
            load_cv=load_cv,
            dead_experts=dead_experts,
        )
        self._values: dict[str, Tensor] = {k: v for k, v in given.items() if v is not None}
        if diagnostics is None and len(self._values) < len(_LAZY):
            missing = sorted(set(_LAZY) - set(self._values))
            raise TypeError(f"MoEStats needs {missing} or a diagnostics function")
        self._diagnostics = diagnostics

    def _get(self, name: str) -> Tensor:
        if name not in self._values:
            assert self._diagnostics is not None
            with torch.no_grad():
                computed = self._diagnostics()
            self._diagnostics = None  # free the references it holds
            for k, v in computed.items():
                self._values.setdefault(k, v)
        return self._values[name]

    @property
    def dropped_fraction(self) -> Tensor:
        return self._get("dropped_fraction")

    @property
    def router_entropy(self) -> Tensor:
        return self._get("router_entropy")

    @property
    def load_imbalance(self) -> Tensor:
        return self._get("load_imbalance")

    @property
    def load_cv(self) -> Tensor:
        return self._get("load_cv")

    @property
    def dead_experts(self) -> Tensor:
        return self._get("dead_experts")

    def __repr__(self) -> str:
        body = ", ".join(f"{n}={getattr(self, n)!r}" for n in _FIELDS)
        return f"MoEStats({body})"

    def to_dict(self, prefix: str = "") -> dict[str, float]:
        """Scalars as floats (one host sync), e.g. ``wandb.log(stats.to_dict("moe/l3/"))``."""
        values = [(n, getattr(self, n)) for n in _FIELDS]
        scalars = [(n, v.detach().float().reshape(())) for n, v in values if v.numel() == 1]
        if not scalars:
            return {}
        host = torch.stack([v.to(scalars[0][1].device) for _, v in scalars]).tolist()
        return {prefix + n: float(h) for (n, _), h in zip(scalars, host, strict=True)}


@torch.no_grad()
def load_statistics(loads: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(max/mean, coefficient of variation, number of experts with no token)``; 1, 0, 0 is
    perfect balance."""
    loads = loads.float()
    std, mean = torch.std_mean(loads, unbiased=False)
    mean = mean.clamp_min(1e-20)
    imbalance = loads.max() / mean
    cv = std / mean
    dead = (loads == 0).sum()
    return imbalance, cv, dead
