"""Query routing: a learned, load-balanced router over specialised expert pipelines.

The gate is :class:`aiprime.moe.TopKRouter` and the balancing is
:func:`aiprime.moe.load_balancing_loss` / :class:`aiprime.moe.AuxFreeBalancer`: the same
code that routes tokens in the MoE layers routes queries here. See docs/routing.md.
"""

from aiprime.routing.experts import Expert, RoutingError, build_experts

__all__ = ["Expert", "RoutingError", "build_experts"]
