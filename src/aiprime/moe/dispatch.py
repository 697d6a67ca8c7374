"""Sort-by-expert dispatch: which rows go to which expert, capacity, and un-permutation.

Everything is vectorised (argsort + cumulative counts); there is no loop over experts.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .losses import expert_counts


@dataclass
class DispatchPlan:
    """Kept (token, expert) assignments sorted by expert.

    ``token_idx[s]`` is the token of sorted row ``s`` and ``weights[s]`` its gate;
    ``counts[e]`` rows belong to expert ``e`` and ``offsets`` are their int32 cumulative
    ends, the ``offs`` argument of ``torch.nn.functional.grouped_mm``. ``routed_counts``
    are the loads the router asked for before capacity; ``n_dropped`` how many
    assignments (token choice) or tokens (expert choice) got no compute.
    """

    token_idx: Tensor
    weights: Tensor
    counts: Tensor
    offsets: Tensor
    routed_counts: Tensor
    n_dropped: Tensor
    n_total: int
    capacity: int | None

    @property
    def dropped_fraction(self) -> Tensor:
        return self.n_dropped.float() / max(self.n_total, 1)


def plan_token_choice(
    indices: Tensor, weights: Tensor, n_experts: int, capacity: int | None = None
) -> DispatchPlan:
    """Plan for token-choice routing with optional per-expert ``capacity``.

    Assignments are ranked slot-major (every token's first choice before any second
    choice, then by token position, as in GShard), so with dropping a token loses its
    lower-ranked experts first and earlier tokens win ties.
    """
    n_tokens, k = indices.shape
    total = n_tokens * k
    flat_e = indices.t().reshape(-1)
    flat_w = weights.t().reshape(-1)
    order = torch.argsort(flat_e, stable=True)
    routed = expert_counts(flat_e, n_experts)
    if capacity is None or capacity >= total:
        counts = routed
        n_dropped = torch.zeros((), dtype=torch.int64, device=indices.device)
    else:
        starts = torch.cumsum(routed, 0) - routed
        rank = torch.arange(total, device=indices.device) - starts[flat_e[order]]
        keep = rank < capacity
        order = order[keep]
        counts = routed.clamp(max=capacity)
        n_dropped = total - counts.sum()
    return DispatchPlan(
        token_idx=order % max(n_tokens, 1),
        weights=flat_w[order],
        counts=counts,
        offsets=torch.cumsum(counts, 0).to(torch.int32),
        routed_counts=routed,
        n_dropped=n_dropped,
        n_total=total,
        capacity=capacity,
    )


def plan_expert_choice(indices: Tensor, weights: Tensor, n_tokens: int) -> DispatchPlan:
    """Plan for expert-choice routing: ``indices`` ``[E, C]`` are already grouped by expert."""
    n_experts, c = indices.shape
    token_idx = indices.reshape(-1)
    counts = torch.full((n_experts,), c, dtype=torch.int64, device=indices.device)
    per_token = expert_counts(token_idx, n_tokens)
    return DispatchPlan(
        token_idx=token_idx,
        weights=weights.reshape(-1),
        counts=counts,
        offsets=torch.cumsum(counts, 0).to(torch.int32),
        routed_counts=counts,
        n_dropped=(per_token == 0).sum(),
        n_total=n_tokens,
        capacity=c,
    )


def permute(x: Tensor, plan: DispatchPlan) -> Tensor:
    """Rows of ``x`` ``[N, d]`` in expert-sorted order ``[S, d]``, one per kept assignment."""
    return x.index_select(0, plan.token_idx)


def unpermute(
    y: Tensor, plan: DispatchPlan, n_tokens: int, weights: Tensor | None = None
) -> Tensor:
    """Sum expert-sorted rows ``[S, d]`` back into ``[N, d]``, optionally scaled by ``weights``.

    Dropped assignments contribute zero, so a token with none kept gets 0 here and is carried
    by the caller's residual connection. Low-precision inputs accumulate in float32.
    """
    acc_dtype = torch.float32 if y.dtype in (torch.bfloat16, torch.float16) else y.dtype
    src = y.to(acc_dtype)
    if weights is not None:
        src = src * weights.to(acc_dtype).unsqueeze(-1)
    out = torch.zeros(n_tokens, y.shape[-1], dtype=acc_dtype, device=y.device)
    return out.index_add_(0, plan.token_idx, src).to(y.dtype)
