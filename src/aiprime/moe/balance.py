"""Auxiliary-loss-free load balancing (DeepSeek-V3)."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn


class AuxFreeBalancer(nn.Module):
    """Per-expert selection bias nudged after each optimizer step.

    Overloaded experts get their bias lowered by ``update_rate`` and underloaded ones raised
    (``b_i += u * sign(mean_load - load_i)``), so routing follows a shifting token
    distribution online without a loss term that fights the task gradient. The bias only
    affects which experts are selected, never the gate values.

    Training forwards call :meth:`accumulate`; call :meth:`update` (or
    :func:`aiprime.moe.update_bias_balancers`) once per optimizer step.
    """

    bias: Tensor
    pending: Tensor

    def __init__(self, n_experts: int, update_rate: float = 1e-3) -> None:
        super().__init__()
        self.n_experts = n_experts
        self.update_rate = update_rate
        self.register_buffer("bias", torch.zeros(n_experts, dtype=torch.float32))
        self.register_buffer(
            "pending", torch.zeros(n_experts, dtype=torch.float32), persistent=False
        )

    @torch.no_grad()
    def accumulate(self, tokens_per_expert: Tensor) -> None:
        """Add the loads of one forward (several micro-batches may add up before a step)."""
        self.pending += tokens_per_expert.to(self.pending)

    @torch.no_grad()
    def update(
        self, tokens_per_expert: Tensor | None = None, group: dist.ProcessGroup | None = None
    ) -> Tensor:
        """Apply one sign update from ``tokens_per_expert`` (default: the accumulated loads).

        With data parallelism pass ``group`` so every rank sees the global load and keeps an
        identical bias. Returns the bias.
        """
        load = self.pending.clone() if tokens_per_expert is None else tokens_per_expert.float()
        load = load.to(self.bias.device)
        if group is not None and dist.is_available() and dist.is_initialized():
            dist.all_reduce(load, group=group)
        if load.sum() > 0:
            self.bias += self.update_rate * torch.sign(load.mean() - load)
        self.pending.zero_()
        return self.bias
