"""Naive per-token, per-expert MoE used as ground truth; loops are fine at test sizes."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from aiprime.moe import MoELayer


def expert_ffn(layer: MoELayer, e: int, x: Tensor) -> Tensor:
    """Expert ``e`` on rows ``x`` with ordinary matmuls."""
    w_in = layer.experts.w_in[e]
    w_out = layer.experts.w_out[e]
    h = x @ w_in
    if layer.config.activation == "swiglu":
        f = layer.config.d_ff
        h = F.silu(h[:, :f]) * h[:, f:]
    else:
        h = F.gelu(h)
    return h @ w_out


def naive_forward(layer: MoELayer, x: Tensor) -> Tensor:
    """Routing and capacity re-derived independently of aiprime.moe.dispatch."""
    c = layer.config
    flat = x.reshape(-1, c.d_model)
    n = flat.shape[0]
    logits = flat @ layer.router.gate.weight.t()
    logits = logits.float()
    scores = torch.softmax(logits, -1) if c.score_func == "softmax" else torch.sigmoid(logits)
    cf = c.capacity_factor_train if layer.training else c.capacity_factor_eval
    out = torch.zeros(n, c.d_model, dtype=torch.float32)
    if c.router == "topk":
        sel = scores
        if layer.balancer is not None:
            sel = scores + layer.balancer.bias
        _, idx = torch.topk(sel, c.top_k, dim=-1)
        w = scores.gather(1, idx)
        if c.renormalize and c.top_k > 1:
            w = w / w.sum(-1, keepdim=True)
        cap = None if cf is None else max(1, math.ceil(cf * n * c.top_k / c.n_experts))
        used = [0] * c.n_experts
        for j in range(c.top_k):  # slot-major priority
            for t in range(n):
                e = int(idx[t, j])
                if cap is not None and used[e] >= cap:
                    continue
                used[e] += 1
                y = expert_ffn(layer, e, flat[t : t + 1]).float()
                out[t] += w[t, j] * y[0]
    else:
        cap = max(1, math.ceil((1.0 if cf is None else cf) * n * c.top_k / c.n_experts))
        cap = min(cap, n)
        for e in range(c.n_experts):
            w, toks = torch.topk(scores[:, e], cap)
            for wt, t in zip(w, toks.tolist(), strict=True):
                out[t] += wt * expert_ffn(layer, e, flat[t : t + 1]).float()[0]
    y = out.to(x.dtype)
    if layer.shared_experts is not None:
        y = y + layer.shared_experts(flat)
    return y.reshape(x.shape)
