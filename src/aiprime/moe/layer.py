"""The MoE layer: router + dispatch + grouped experts (+ shared experts)."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .balance import AuxFreeBalancer
from .config import MoEConfig, expert_capacity
from .dispatch import DispatchPlan, permute, plan_expert_choice, plan_token_choice, unpermute
from .experts import DenseFFN, GroupedExperts
from .losses import load_balancing_loss, router_entropy, router_z_loss
from .router import ExpertChoiceRouter, RouterOutput, TopKRouter
from .stats import MoEStats, load_statistics


class MoELayer(nn.Module):
    """Drop-in replacement for a transformer FFN; returns ``(output, MoEStats)``.

    The output is the FFN branch only: add it to the residual stream as usual, so tokens
    dropped by capacity (whose routed output is 0) pass through the residual unchanged.
    With ``ep_group`` set, this rank holds ``n_experts / world_size`` experts and tokens
    are exchanged with all-to-all (see :mod:`aiprime.moe.parallel`).
    """

    def __init__(self, config: MoEConfig, ep_group: dist.ProcessGroup | None = None) -> None:
        super().__init__()
        self.config = config
        c = config
        self.router: TopKRouter | ExpertChoiceRouter
        if c.router == "topk":
            self.router = TopKRouter(
                c.d_model,
                c.n_experts,
                c.top_k,
                c.score_func,
                c.renormalize,
                c.jitter,
                c.router_init_std,
            )
        else:
            self.router = ExpertChoiceRouter(
                c.d_model, c.n_experts, c.score_func, c.jitter, c.router_init_std
            )
        self.balancer = (
            AuxFreeBalancer(c.n_experts, c.bias_update_rate) if c.bias_balancing else None
        )
        self.ep_group = ep_group
        world = dist.get_world_size(ep_group) if ep_group is not None else 1
        if c.n_experts % world:
            raise ValueError(f"n_experts={c.n_experts} not divisible by EP world size {world}")
        self.experts = GroupedExperts(c.n_experts // world, c.d_model, c.d_ff, c.activation)
        self.shared_experts = (
            DenseFFN(c.d_model, c.n_shared_experts * c.d_ff, c.activation)
            if c.n_shared_experts > 0
            else None
        )

    @property
    def capacity_factor(self) -> float | None:
        return (
            self.config.capacity_factor_train if self.training else self.config.capacity_factor_eval
        )

    def route(self, x: Tensor) -> tuple[RouterOutput, DispatchPlan]:
        """Routing decision and dispatch plan for flat tokens ``[N, d]``."""
        c = self.config
        n = x.shape[0]
        cf = self.capacity_factor
        if isinstance(self.router, TopKRouter):
            bias = self.balancer.bias if self.balancer is not None else None
            r = self.router(x, selection_bias=bias)
            cap = None if cf is None else expert_capacity(n, c.n_experts, c.top_k, cf)
            return r, plan_token_choice(r.indices, r.weights, c.n_experts, cap)
        cap = expert_capacity(n, c.n_experts, c.top_k, 1.0 if cf is None else cf)
        r = self.router(x, cap)
        return r, plan_expert_choice(r.indices, r.weights, n)

    def forward(self, x: Tensor) -> tuple[Tensor, MoEStats]:
        c = self.config
        shape = x.shape
        flat = x.reshape(-1, c.d_model)
        n = flat.shape[0]
        r, plan = self.route(flat)

        if self.ep_group is not None:
            from .parallel import expert_parallel_forward

            y = expert_parallel_forward(self.experts, flat, plan, self.ep_group)
        else:
            ws = self.experts.cpu_workspace() if flat.device.type == "cpu" else None
            xs = permute(flat, plan, ws)
            if flat.device.type == "cpu" and not self.experts.gates_hidden:
                # the gate multiply rides along in the un-permute's gather-sum
                y = unpermute(self.experts(xs, plan.offsets), plan, n, plan.weights, ws)
            else:
                y = unpermute(self.experts(xs, plan.offsets, plan.weights), plan, n, workspace=ws)
        if self.shared_experts is not None:
            y = y + self.shared_experts(flat)

        if self.training and self.balancer is not None:
            self.balancer.accumulate(plan.routed_counts)
        return y.reshape(shape), self._stats(r, plan)

    def _stats(self, r: RouterOutput, plan: DispatchPlan) -> MoEStats:
        c = self.config
        if r.kind == "token":
            balance = load_balancing_loss(
                r.scores,
                r.indices,
                c.n_experts,
                counts=plan.routed_counts,
                normalized=c.score_func == "softmax",
            )
        else:  # balanced by construction
            balance = r.scores.new_zeros(())
        z = router_z_loss(r.logits)
        aux = torch.add(balance * c.aux_loss_weight, z, alpha=c.z_loss_weight)
        scores = r.scores.detach()

        def diagnostics() -> dict[str, Tensor]:
            imbalance, cv, dead = load_statistics(plan.routed_counts)
            return {
                "dropped_fraction": plan.dropped_fraction,
                "router_entropy": router_entropy(scores),
                "load_imbalance": imbalance,
                "load_cv": cv,
                "dead_experts": dead,
            }

        return MoEStats(
            aux_loss=aux,
            balance_loss=balance,
            z_loss=z,
            tokens_per_expert=plan.counts,
            routed_per_expert=plan.routed_counts,
            diagnostics=diagnostics,
        )


def update_bias_balancers(model: nn.Module, group: dist.ProcessGroup | None = None) -> int:
    """Apply the pending aux-loss-free bias update of every MoE layer; call after
    ``optimizer.step()``. Returns how many balancers were updated."""
    n = 0
    for m in model.modules():
        if isinstance(m, AuxFreeBalancer):
            m.update(group=group)
            n += 1
    return n
