"""Mixture-of-Experts layers for PyTorch: routers, balancing losses, grouped dispatch, EP.

Quick start::

    from aiprime.moe import MoEConfig, MoELayer

    layer = MoELayer(MoEConfig(d_model=512, d_ff=2048, n_experts=8, top_k=2))
    y, stats = layer(x)                      # x: [..., 512]
    loss = task_loss(y) + stats.aux_loss     # balance + z losses, already weighted
"""

from .balance import AuxFreeBalancer
from .config import MoEConfig, expert_capacity
from .dispatch import DispatchPlan, permute, plan_expert_choice, plan_token_choice, unpermute
from .experts import DenseFFN, GroupedExperts, grouped_mm, grouped_mm_supported
from .layer import MoELayer, update_bias_balancers
from .losses import expert_counts, load_balancing_loss, router_entropy, router_z_loss
from .parallel import all_to_all, expert_parallel_forward, shard_expert_state_dict
from .router import ExpertChoiceRouter, RouterOutput, TopKRouter, compute_scores
from .stats import MoEStats, load_statistics

__all__ = [
    "AuxFreeBalancer",
    "DenseFFN",
    "DispatchPlan",
    "ExpertChoiceRouter",
    "GroupedExperts",
    "MoEConfig",
    "MoELayer",
    "MoEStats",
    "RouterOutput",
    "TopKRouter",
    "all_to_all",
    "compute_scores",
    "expert_capacity",
    "expert_counts",
    "expert_parallel_forward",
    "grouped_mm",
    "grouped_mm_supported",
    "load_balancing_loss",
    "load_statistics",
    "permute",
    "plan_expert_choice",
    "plan_token_choice",
    "router_entropy",
    "router_z_loss",
    "shard_expert_state_dict",
    "unpermute",
    "update_bias_balancers",
]
