"""Sort-by-expert dispatch: which rows go to which expert, capacity, and un-permutation.

Everything is vectorised (argsort + cumulative counts); there is no loop over experts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from .losses import expert_counts
from .workspace import Workspace


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
    # dropless token choice only: ``slots[s]`` is the position ``token * k + slot`` of sorted
    # row ``s``, so un-permuting is a scatter and a sum over the k slots (no atomics)
    slots: Tensor | None = None
    top_k: int = 0
    # combine_index's result, computed once for the gather and the un-permute
    _combine: tuple[Tensor, Tensor | None] | None = field(default=None, repr=False)

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
    if capacity is None or capacity >= total:
        # Dropless: token-major order needs no transposed copies, and the order of rows
        # within an expert's group does not matter.
        flat_e = indices.reshape(-1)
        order = torch.argsort(flat_e, stable=True)
        routed = expert_counts(flat_e, n_experts)
        return DispatchPlan(
            token_idx=order // k,
            weights=weights.reshape(-1)[order],
            counts=routed,
            offsets=torch.cumsum(routed, 0, dtype=torch.int32),
            routed_counts=routed,
            n_dropped=torch.zeros((), dtype=torch.int64, device=indices.device),
            n_total=total,
            capacity=capacity,
            slots=order,
            top_k=k,
        )
    flat_e = indices.t().reshape(-1)
    flat_w = weights.t().reshape(-1)
    order = torch.argsort(flat_e, stable=True)
    routed = expert_counts(flat_e, n_experts)
    starts = torch.cumsum(routed, 0) - routed
    rank = torch.arange(total, device=indices.device) - starts[flat_e[order]]
    order = order[rank < capacity]
    counts = routed.clamp(max=capacity)
    return DispatchPlan(
        token_idx=order % max(n_tokens, 1),
        weights=flat_w[order],
        counts=counts,
        offsets=torch.cumsum(counts, 0, dtype=torch.int32),
        routed_counts=routed,
        n_dropped=total - counts.sum(),
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


def permute(x: Tensor, plan: DispatchPlan, workspace: Workspace | None = None) -> Tensor:
    """Rows of ``x`` ``[N, d]`` in expert-sorted order ``[S, d]``, one per kept assignment.

    With a ``workspace`` (CPU) the rows are gathered into a reused buffer and the backward
    is the gather-sum of :func:`unpermute` (no zero-filled ``[N, d]`` scatter target)."""
    if workspace is None or x.shape[0] == 0:
        return x.index_select(0, plan.token_idx)
    idx, offsets = combine_index(plan, x.shape[0])
    out: Tensor = _Gather.apply(x, plan.token_idx, idx, offsets, workspace)
    return out


class _Gather(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any,
        x: Tensor,
        token_idx: Tensor,
        idx: Tensor,
        offsets: Tensor | None,
        workspace: Workspace,
    ) -> Tensor:
        rows = workspace.take((token_idx.numel(), x.shape[-1]), x)
        torch.index_select(x, 0, token_idx, out=rows)
        ctx.save_for_backward(idx, offsets)
        # autograd attaches history to an alias, never to the pooled buffer; the alias's
        # hold on the storage is what keeps the buffer from reuse while a graph saves it
        return rows.detach()

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        idx, offsets = ctx.saved_tensors
        return F.embedding_bag(idx, grad.contiguous(), offsets, mode="sum"), None, None, None, None


def combine_index(plan: DispatchPlan, n_tokens: int) -> tuple[Tensor, Tensor | None]:
    """Sorted-row positions grouped by token, as ``embedding_bag`` input and bag offsets.

    Dropless token choice gives every token exactly ``k`` rows: the inverse of the sort,
    ``[N, k]``, with no offsets. Otherwise (capacity, expert choice) tokens own 0..E rows:
    a stable sort of ``token_idx`` and the start of each token's bag.
    """
    if plan._combine is None:
        if plan.slots is not None and plan.slots.numel() == n_tokens * plan.top_k:
            inv = torch.empty_like(plan.slots)
            inv[plan.slots] = torch.arange(plan.slots.numel(), device=inv.device)
            plan._combine = inv.view(n_tokens, plan.top_k), None
        else:
            order = torch.argsort(plan.token_idx, stable=True)
            per_token = expert_counts(plan.token_idx, n_tokens)
            plan._combine = order, torch.cumsum(per_token, 0) - per_token
    return plan._combine


def unpermute(
    y: Tensor,
    plan: DispatchPlan,
    n_tokens: int,
    weights: Tensor | None = None,
    workspace: Workspace | None = None,
) -> Tensor:
    """Sum expert-sorted rows ``[S, d]`` back into ``[N, d]``, optionally scaled by ``weights``.

    Dropped assignments contribute zero, so a token with none kept gets 0 here and is carried
    by the caller's residual connection. Low-precision inputs accumulate in float32.
    """
    if n_tokens == 0:
        return y.new_zeros(0, y.shape[-1])
    if y.device.type == "cpu":
        return gather_sum(y, plan, n_tokens, weights, workspace)
    return scatter_sum(y, plan, n_tokens, weights)


def gather_sum(
    y: Tensor,
    plan: DispatchPlan,
    n_tokens: int,
    weights: Tensor | None,
    workspace: Workspace | None = None,
) -> Tensor:
    """:func:`unpermute` as one ``embedding_bag``: a gather-sum per token, with the gates as
    per-sample weights. It writes only the ``[N, d]`` result; on CPU, where every fresh large
    buffer is paid in page faults, that beats :func:`scatter_sum`'s two ``[S, d]`` buffers
    per forward and backward (fine-grained benchmark shape: 64 -> 20 ms fwd+bwd,
    ``benchmarks/moe_parts.py``). The backward gathers the output gradient back to the rows,
    into ``workspace`` when given."""
    idx, offsets = combine_index(plan, n_tokens)
    out: Tensor = _GatherSum.apply(y, weights, idx, offsets, plan.token_idx, workspace)
    return out


class _GatherSum(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any,
        y: Tensor,
        weights: Tensor | None,
        idx: Tensor,
        offsets: Tensor | None,
        token_idx: Tensor,
        workspace: Workspace | None,
    ) -> Tensor:
        psw = None if weights is None else weights.to(y.dtype)[idx]
        ctx.save_for_backward(y if weights is not None else None, weights, token_idx)
        ctx.workspace = workspace
        return F.embedding_bag(idx, y, offsets, mode="sum", per_sample_weights=psw)

    @staticmethod
    @once_differentiable  # in-place arithmetic and reused buffers
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        y, weights, token_idx = ctx.saved_tensors
        grad = grad.contiguous()
        shape = (token_idx.numel(), grad.shape[-1])
        rows = ctx.workspace.take(shape, grad) if ctx.workspace else None
        rows = torch.index_select(grad, 0, token_idx, out=rows)
        d_w = None
        if weights is not None:
            if ctx.needs_input_grad[1]:
                d_w = torch.linalg.vecdot(rows, y).to(weights.dtype)
            rows.mul_(weights.to(rows.dtype).unsqueeze(-1))
        return rows, d_w, None, None, None, None


def scatter_sum(y: Tensor, plan: DispatchPlan, n_tokens: int, weights: Tensor | None) -> Tensor:
    """:func:`unpermute` as a scatter: the CUDA path, tuned for few kernel launches."""
    if weights is None and plan.slots is not None and plan.slots.numel() == n_tokens * plan.top_k:
        # every token has exactly k rows: place them token-major, then reduce over the slots
        # (the reduction accumulates low precision in float32 and rounds once; no atomics)
        flat = y.new_empty(n_tokens * plan.top_k, y.shape[-1]).index_copy_(0, plan.slots, y)
        return flat.view(n_tokens, plan.top_k, -1).sum(dim=1)
    acc_dtype = torch.float32 if y.dtype in (torch.bfloat16, torch.float16) else y.dtype
    src = y.to(acc_dtype)
    if weights is not None:
        src = src * weights.to(acc_dtype).unsqueeze(-1)
    out = torch.zeros(n_tokens, y.shape[-1], dtype=acc_dtype, device=y.device)
    return out.index_add_(0, plan.token_idx, src).to(y.dtype)
