"""Expert parallelism: experts sharded over ranks, tokens exchanged with all-to-all.

Works with any ``torch.distributed`` backend that implements ``all_to_all_single`` with
uneven splits (gloo on CPU, NCCL on GPU). Launch one process per rank, e.g.
``torchrun --nproc-per-node 2 train.py``, then build
``MoELayer(config, ep_group=dist.group.WORLD)`` on every rank.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from .dispatch import DispatchPlan, permute, unpermute
from .experts import GroupedExperts


class _AllToAll(torch.autograd.Function):
    """Differentiable uneven all-to-all: the backward is the reverse exchange."""

    @staticmethod
    def forward(
        ctx: Any,
        x: Tensor,
        out_splits: list[int],
        in_splits: list[int],
        group: dist.ProcessGroup | None,
    ) -> Tensor:
        ctx.splits = (out_splits, in_splits)
        ctx.group = group
        out = x.new_empty(sum(out_splits), *x.shape[1:])
        dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None, None]:
        out_splits, in_splits = ctx.splits
        back = grad.new_empty(sum(in_splits), *grad.shape[1:])
        dist.all_to_all_single(back, grad.contiguous(), in_splits, out_splits, group=ctx.group)
        return back, None, None, None


def all_to_all(
    x: Tensor, out_splits: list[int], in_splits: list[int], group: dist.ProcessGroup | None = None
) -> Tensor:
    """Autograd-aware ``all_to_all_single`` with row splits."""
    out: Tensor = _AllToAll.apply(x, out_splits, in_splits, group)
    return out


def regroup_index(counts: Tensor) -> Tensor:
    """Gather index turning rows laid out ``[source rank][local expert]`` into
    ``[local expert][source rank]`` order, which grouped_mm needs. ``counts`` is ``[W, L]``."""
    w, l_ = counts.shape
    flat = counts.reshape(-1)
    src_start = torch.cumsum(flat, 0) - flat
    tgt_counts = counts.t().reshape(-1)
    tgt_src_start = src_start.view(w, l_).t().reshape(-1)
    total = int(flat.sum())
    chunk = torch.repeat_interleave(torch.arange(w * l_, device=counts.device), tgt_counts)
    tgt_start = torch.cumsum(tgt_counts, 0) - tgt_counts
    pos = torch.arange(total, device=counts.device) - tgt_start[chunk]
    return tgt_src_start[chunk] + pos


def expert_parallel_forward(
    experts: GroupedExperts, x: Tensor, plan: DispatchPlan, group: dist.ProcessGroup | None
) -> Tensor:
    """Routed output ``[N, d]`` for local tokens ``x`` with experts sharded over ``group``.

    ``plan`` indexes global experts; rank ``r`` owns experts ``[r*L, (r+1)*L)``. Gates are
    applied back on the source rank so only activations cross the network.
    """
    world = dist.get_world_size(group)
    n_local = experts.n_experts
    send_counts = plan.counts.to(torch.int64)
    recv_counts = torch.empty_like(send_counts)
    dist.all_to_all_single(recv_counts, send_counts, group=group)
    in_splits = send_counts.view(world, n_local).sum(1).tolist()
    recv_grid = recv_counts.view(world, n_local)
    out_splits = recv_grid.sum(1).tolist()

    received = all_to_all(permute(x, plan), out_splits, in_splits, group)
    idx = regroup_index(recv_grid)
    local_offsets = torch.cumsum(recv_grid.sum(0), 0).to(torch.int32)
    local_y = experts(received.index_select(0, idx), local_offsets)
    back = local_y.index_select(0, torch.argsort(idx))
    returned = all_to_all(back, in_splits, out_splits, group)
    return unpermute(returned, plan, x.shape[0], weights=plan.weights)


def shard_expert_state_dict(
    state: dict[str, Tensor], rank: int, world_size: int
) -> dict[str, Tensor]:
    """Slice the packed expert weights of a single-process state dict for ``rank``."""
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        if key.endswith(("experts.w_in", "experts.w_out")):
            n_local = value.shape[0] // world_size
            value = value[rank * n_local : (rank + 1) * n_local].clone()
        out[key] = value
    return out
