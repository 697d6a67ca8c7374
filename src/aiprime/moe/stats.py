"""Per-layer routing statistics, returned by every forward for logging."""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from torch import Tensor


@dataclass
class MoEStats:
    """Losses (with gradient) and detached routing statistics of one MoE forward.

    ``aux_loss`` is the already-weighted sum to add to the task loss. Load statistics use
    the loads the router asked for (``routed_per_expert``, before capacity) because they
    describe the router; ``tokens_per_expert`` is what was actually computed.
    """

    aux_loss: Tensor
    balance_loss: Tensor
    z_loss: Tensor
    tokens_per_expert: Tensor
    routed_per_expert: Tensor
    dropped_fraction: Tensor
    router_entropy: Tensor
    load_imbalance: Tensor
    load_cv: Tensor
    dead_experts: Tensor

    def to_dict(self, prefix: str = "") -> dict[str, float]:
        """Scalars as floats (one host sync), e.g. ``wandb.log(stats.to_dict("moe/l3/"))``."""
        out: dict[str, float] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if value.numel() == 1:
                out[prefix + f.name] = float(value.detach())
        return out


@torch.no_grad()
def load_statistics(loads: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(max/mean, coefficient of variation, number of experts with no token)``; 1, 0, 0 is
    perfect balance."""
    loads = loads.float()
    mean = loads.mean().clamp_min(1e-20)
    imbalance = loads.max() / mean
    cv = loads.std(unbiased=False) / mean
    dead = (loads == 0).sum()
    return imbalance, cv, dead
