"""Auxiliary router losses as pure functions, usable with any router output.

Balance-loss convention (documented in docs/moe.md): ``f_i`` is the fraction of the
``N * k`` routed (token, slot) assignments that chose expert ``i`` (so ``sum f = 1``) and
``P_i`` the mean router probability of expert ``i``. The loss ``E * sum_i f_i * P_i`` is
exactly 1 for a perfectly uniform router for every ``k``; it equals the HF Mixtral
``load_balancing_loss_func`` value divided by ``k``.
"""

from __future__ import annotations

import torch
from torch import Tensor


def expert_counts(indices: Tensor, n_experts: int) -> Tensor:
    """Assignments per expert as int64 ``[E]``; static shape (unlike bincount) for torch.compile."""
    flat = indices.reshape(-1)
    return torch.zeros(n_experts, dtype=torch.int64, device=flat.device).index_add_(
        0, flat, torch.ones_like(flat)
    )


def _probabilities(scores: Tensor) -> Tensor:
    """Turn sigmoid scores into per-token distributions so the uniform value stays 1.

    For softmax scores this is the identity, gradient included (they already sum to 1).
    """
    return scores / scores.sum(dim=-1, keepdim=True).clamp_min(1e-20)


def load_balancing_loss(
    scores: Tensor,
    indices: Tensor,
    n_experts: int | None = None,
    *,
    counts: Tensor | None = None,
    normalized: bool = False,
) -> Tensor:
    """Switch/GShard balance loss ``E * sum_i f_i * P_i`` (unweighted; multiply by alpha).

    ``scores`` ``[N, E]`` are router probabilities (softmax, or sigmoid scores which are
    normalised per token), ``indices`` ``[N, k]`` the chosen experts. Gradient flows only
    through ``P`` since ``f`` is a count. ``counts`` (assignments per expert, e.g. a
    dispatch plan's ``routed_counts``) saves recounting ``indices``; ``normalized=True``
    says the rows of ``scores`` already sum to 1 (softmax) and skips the normalisation.
    """
    n_exp = scores.shape[-1] if n_experts is None else n_experts
    n_tokens = scores.shape[0]
    if n_tokens == 0 or indices.numel() == 0:
        return scores.new_zeros((), dtype=torch.float32)
    probs = scores.float() if normalized else _probabilities(scores.float())
    if counts is None:
        counts = expert_counts(indices, n_exp)
    # f_i = counts_i / (N k) and P_i = sum_t probs[t, i] / N, in one dot product
    weight = counts.to(probs.dtype) * (n_exp / (indices.numel() * n_tokens))  # no gradient
    return torch.dot(weight, probs.sum(dim=0))


def router_z_loss(logits: Tensor) -> Tensor:
    """ST-MoE z-loss ``mean(logsumexp(logits)^2)``; keeps logits small for bf16 stability."""
    if logits.shape[0] == 0:
        return logits.new_zeros((), dtype=torch.float32)
    z = torch.logsumexp(logits.float(), dim=-1)
    return torch.dot(z, z) / z.shape[0]


def router_entropy(scores: Tensor) -> Tensor:
    """Mean per-token entropy (nats) of the routing distribution; low means confident routing."""
    if scores.shape[0] == 0:
        return scores.new_zeros((), dtype=torch.float32)
    p = _probabilities(scores.float())
    return -(p * torch.log(p.clamp_min(1e-20))).sum(dim=-1).mean()
