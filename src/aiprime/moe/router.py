"""Routers: map tokens ``[N, d]`` to experts.

They only decide; dispatch and experts live elsewhere, so a router can be reused on its
own, for instance to route user queries among pipelines.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from .config import ScoreFunc


@dataclass
class RouterOutput:
    """A routing decision.

    ``kind == "token"`` (token choice): ``indices`` ``[N, k]`` are expert ids per token and
    ``weights`` ``[N, k]`` their gates. ``kind == "expert"`` (expert choice): ``indices``
    ``[E, C]`` are token ids picked by each expert and ``weights`` ``[E, C]`` their gates.
    ``logits`` ``[N, E]`` are raw router logits (for the z-loss) and ``scores`` ``[N, E]``
    the softmax/sigmoid scores (for the balance loss and statistics); both float32.
    """

    indices: Tensor
    weights: Tensor
    logits: Tensor
    scores: Tensor
    kind: Literal["token", "expert"] = "token"


def compute_scores(logits: Tensor, score_func: ScoreFunc) -> Tensor:
    """Softmax or sigmoid in float32, since low-precision router probabilities are unstable."""
    logits = logits.float()
    if score_func == "softmax":
        return torch.softmax(logits, dim=-1)
    if score_func == "sigmoid":
        return torch.sigmoid(logits)
    raise ValueError(f"unknown score_func {score_func!r}")


def _jitter(x: Tensor, eps: float) -> Tensor:
    """Multiplicative input noise (Switch Transformer) that helps exploration during training."""
    noise = torch.empty_like(x).uniform_(1.0 - eps, 1.0 + eps)
    return x * noise


class TopKRouter(nn.Module):
    """Token-choice router: each token picks its ``top_k`` experts.

    ``k=1`` is Switch routing, ``k=2`` Mixtral/GShard. ``renormalize`` rescales the k gates
    to sum to 1 (Mixtral); it is ignored for ``k=1``, where it would pin the gate to 1 and
    cut the router off from the task gradient. A selection-only bias (see
    :class:`AuxFreeBalancer`) can be passed to ``forward``; it changes which experts are
    chosen but never the gate values, which keeps DeepSeek-V3 balancing free of gradient
    interference.
    """

    def __init__(
        self,
        d_model: int,
        n_experts: int,
        top_k: int = 2,
        score_func: ScoreFunc = "softmax",
        renormalize: bool = True,
        jitter: float = 0.0,
        init_std: float = 0.02,
    ) -> None:
        super().__init__()
        if not 1 <= top_k <= n_experts:
            raise ValueError(f"top_k must be in [1, {n_experts}], got {top_k}")
        self.d_model = d_model
        self.n_experts = n_experts
        self.top_k = top_k
        self.score_func: ScoreFunc = score_func
        self.renormalize = renormalize
        self.jitter = jitter
        self.gate = nn.Linear(d_model, n_experts, bias=False)
        nn.init.normal_(self.gate.weight, std=init_std)

    def forward(self, x: Tensor, selection_bias: Tensor | None = None) -> RouterOutput:
        x = x.reshape(-1, self.d_model)
        if self.training and self.jitter > 0:
            x = _jitter(x, self.jitter)
        logits = self.gate(x).float()
        scores = compute_scores(logits, self.score_func)
        if selection_bias is None:
            weights, indices = torch.topk(scores, self.top_k, dim=-1)
        else:
            _, indices = torch.topk(scores + selection_bias.to(scores.dtype), self.top_k, dim=-1)
            weights = scores.gather(1, indices)
        if self.renormalize and self.top_k > 1:
            total = weights.sum(dim=-1, keepdim=True)
            # a softmax top-k sums to at least k/E > 0; sigmoid scores may underflow to 0
            weights = weights / (total if self.score_func == "softmax" else total.clamp_min(1e-20))
        return RouterOutput(indices=indices, weights=weights, logits=logits, scores=scores)


class ExpertChoiceRouter(nn.Module):
    """Expert-choice router (Zhou et al. 2022): each expert picks its top ``capacity`` tokens.

    Balanced by construction, but **not causal**: whether token ``t`` is picked depends on
    the scores of all other tokens in the batch, including later ones, so it must not be
    used for autoregressive decoding without care (the routing of a prefix can change when
    tokens are appended). A token may get zero experts (it then passes through the residual).
    """

    def __init__(
        self,
        d_model: int,
        n_experts: int,
        score_func: ScoreFunc = "softmax",
        jitter: float = 0.0,
        init_std: float = 0.02,
    ) -> None:
        super().__init__()
        self.d_model = d_model
        self.n_experts = n_experts
        self.score_func: ScoreFunc = score_func
        self.jitter = jitter
        self.gate = nn.Linear(d_model, n_experts, bias=False)
        nn.init.normal_(self.gate.weight, std=init_std)

    def forward(self, x: Tensor, capacity: int) -> RouterOutput:
        x = x.reshape(-1, self.d_model)
        if self.training and self.jitter > 0:
            x = _jitter(x, self.jitter)
        logits = self.gate(x).float()
        scores = compute_scores(logits, self.score_func)
        c = max(0, min(int(capacity), scores.shape[0]))
        weights, indices = torch.topk(scores.t(), c, dim=-1)
        return RouterOutput(
            indices=indices, weights=weights, logits=logits, scores=scores, kind="expert"
        )
