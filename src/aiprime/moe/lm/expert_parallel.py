"""Expert parallelism for the LM trainer (``train.expert_parallel = true`` under torchrun).

Every rank keeps a full copy of the non-expert weights (data parallel: their gradients are
averaged) but only ``n_experts / world`` experts of each MoE layer; tokens travel to their
experts with all-to-all (:func:`aiprime.moe.parallel.expert_parallel_forward`). The
all-to-all backward already sums, into each expert shard, the gradients of the tokens of
*all* ranks, so dividing them by the world size gives exactly the data-parallel average:
an expert-parallel run computes the same thing as a data-parallel one (up to float
summation order), while each rank stores and updates ``1/world`` of the experts.

Checkpoints stay in the single-process layout (full expert stacks, gathered on save and
sliced on load, optimizer moments included), so ``generate``/``inspect``/``report`` and
non-parallel resumes read them unchanged.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from aiprime.moe.layer import MoELayer

EXPERT_SUFFIXES = ("w_in", "w_out")


def expert_param_names(model: nn.Module) -> list[str]:
    """Names of the routed-expert stacks (sharded under EP); shared experts are not."""
    return [
        f"{name}.experts.{w}"
        for name, m in model.named_modules()
        if isinstance(m, MoELayer)
        for w in EXPERT_SUFFIXES
    ]


def optimizer_param_names(opt: torch.optim.Optimizer, model: nn.Module) -> dict[int, str]:
    """``state_dict()`` parameter ids of ``opt`` (its numbering: in param-group order)
    mapped to the model's parameter names."""
    names = {id(p): n for n, p in model.named_parameters()}
    out: dict[int, str] = {}
    i = 0
    for group in opt.param_groups:
        for p in group["params"]:
            out[i] = names[id(p)]
            i += 1
    return out


def _gather0(t: Tensor, group: dist.ProcessGroup | None) -> Tensor:
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, t.contiguous(), group=group)
    return torch.cat(parts, dim=0)


def _slice0(t: Tensor, rank: int, world: int) -> Tensor:
    n = t.shape[0] // world
    return t[rank * n : (rank + 1) * n].clone()


def gather_model_state(
    model: nn.Module, expert_names: list[str], group: dist.ProcessGroup | None
) -> dict[str, Tensor]:
    """The full (single-process layout) state dict; every rank must call it."""
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    for k in expert_names:
        sd[k] = _gather0(sd[k], group)
    return sd


def _moments(
    osd: dict[str, Any], pid_names: dict[int, str], expert_names: list[str]
) -> list[tuple[int, str]]:
    """(param id, state key) of every per-element optimizer tensor of an expert stack."""
    experts = set(expert_names)
    return [
        (pid, key)
        for pid, st in osd["state"].items()
        if pid_names[int(pid)] in experts
        for key, v in st.items()
        if isinstance(v, Tensor) and v.dim() > 0
    ]


def gather_optimizer_state(
    osd: dict[str, Any],
    pid_names: dict[int, str],
    expert_names: list[str],
    group: dist.ProcessGroup | None,
) -> dict[str, Any]:
    """``opt.state_dict()`` with the expert moments gathered to full size (all ranks call)."""
    state = {pid: dict(st) for pid, st in osd["state"].items()}
    for pid, key in _moments(osd, pid_names, expert_names):
        state[pid][key] = _gather0(state[pid][key], group)
    return {"state": state, "param_groups": osd["param_groups"]}


def shard_optimizer_state(
    osd: dict[str, Any], pid_names: dict[int, str], expert_names: list[str], rank: int, world: int
) -> dict[str, Any]:
    """Inverse of :func:`gather_optimizer_state` for ``rank``."""
    state = {pid: dict(st) for pid, st in osd["state"].items()}
    for pid, key in _moments(osd, pid_names, expert_names):
        state[pid][key] = _slice0(state[pid][key], rank, world)
    return {"state": state, "param_groups": osd["param_groups"]}


def sync_grads(
    dense: list[nn.Parameter], experts: list[nn.Parameter], comm: Any, world: int
) -> None:
    """Average the replicated parameters' gradients over ranks (``comm.mean_grads``) and
    turn the expert shards' summed gradients into the same average. A shard no token of
    any rank reached gets a zero gradient, as it would under data parallelism."""
    comm.mean_grads(dense)
    for p in experts:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        else:
            p.grad /= world


def clip_global_grad_norm(
    dense: list[nn.Parameter],
    experts: list[nn.Parameter],
    max_norm: float,
    group: dist.ProcessGroup | None,
) -> float:
    """Like ``clip_grad_norm_`` over the *whole* model: the replicated gradients count
    once, the expert shards' squared norms are summed over ranks. Returns the norm."""
    dev = (dense or experts)[0].device
    zero = torch.zeros((), device=dev)
    sq_dense = sum((p.grad.float().pow(2).sum() for p in dense if p.grad is not None), zero)
    sq_exp = sum((p.grad.float().pow(2).sum() for p in experts if p.grad is not None), zero)
    dist.all_reduce(sq_exp, group=group)  # the grads' device: the GPU under NCCL
    total = float(torch.sqrt(sq_dense + sq_exp))
    if math.isfinite(total) and max_norm < math.inf:
        coef = min(1.0, max_norm / (total + 1e-6))
        if coef < 1.0:
            for p in (*dense, *experts):
                if p.grad is not None:
                    p.grad.mul_(coef)
    return total
