"""Routers, balance losses and the aux-loss-free balancer."""

from __future__ import annotations

import math

import pytest
import torch

from aiprime.moe import (
    AuxFreeBalancer,
    ExpertChoiceRouter,
    TopKRouter,
    expert_counts,
    load_balancing_loss,
    load_statistics,
    router_entropy,
    router_z_loss,
)


@pytest.mark.parametrize("n_experts", [4, 8, 64])
@pytest.mark.parametrize("k", [1, 2, 4])
@pytest.mark.parametrize("sigmoid", [False, True])
def test_uniform_router_balance_loss_is_exactly_one(n_experts: int, k: int, sigmoid: bool) -> None:
    n = 4 * n_experts
    scores = torch.full((n, n_experts), 0.5 if sigmoid else 1.0 / n_experts)
    # round-robin assignment: every expert receives exactly n * k / E slots
    indices = (torch.arange(n)[:, None] * k + torch.arange(k)[None, :]) % n_experts
    assert load_balancing_loss(scores, indices).item() == 1.0


def test_collapsed_router_balance_loss_is_n_experts() -> None:
    scores = torch.zeros(10, 8)
    scores[:, 3] = 1.0
    assert load_balancing_loss(scores, torch.full((10, 1), 3)).item() == pytest.approx(8.0)


def test_balance_loss_gradient_pushes_away_from_overloaded_expert() -> None:
    logits = torch.zeros(6, 3, requires_grad=True)
    indices = torch.zeros(6, 1, dtype=torch.long)  # everything on expert 0
    load_balancing_loss(torch.softmax(logits, -1), indices).backward()
    assert logits.grad is not None
    assert (logits.grad[:, 0] > 0).all() and (logits.grad[:, 1:] < 0).all()


def test_z_loss_and_entropy() -> None:
    logits = torch.zeros(5, 8)
    assert router_z_loss(logits).item() == pytest.approx(math.log(8) ** 2)
    assert router_entropy(torch.softmax(logits, -1)).item() == pytest.approx(math.log(8))
    logits = torch.randn(7, 4)
    torch.testing.assert_close(router_z_loss(logits), (torch.logsumexp(logits, -1) ** 2).mean())
    assert router_z_loss(torch.zeros(0, 4)).item() == 0.0


def test_topk_router_gates() -> None:
    torch.manual_seed(0)
    x = torch.randn(9, 6)
    r = TopKRouter(6, 5, top_k=2).eval()
    out = r(x)
    assert out.indices.shape == (9, 2) and out.weights.dtype == torch.float32
    torch.testing.assert_close(out.weights.sum(-1), torch.ones(9))
    switch = TopKRouter(6, 5, top_k=1).eval()
    o1 = switch(x)  # k=1 keeps the raw probability so the router still gets a gradient
    torch.testing.assert_close(o1.weights[:, 0], o1.scores.max(-1).values)
    sig = TopKRouter(6, 5, top_k=2, score_func="sigmoid", renormalize=False).eval()
    o2 = sig(x)
    torch.testing.assert_close(o2.weights, torch.sigmoid(o2.logits).topk(2, -1).values)


def test_selection_bias_changes_choice_not_gates() -> None:
    torch.manual_seed(0)
    x = torch.randn(16, 6)
    r = TopKRouter(6, 4, top_k=1).eval()
    bias = torch.tensor([0.0, 0.0, 10.0, 0.0])
    out = r(x, selection_bias=bias)
    assert (out.indices == 2).all()
    torch.testing.assert_close(out.weights[:, 0], out.scores[:, 2])


def test_jitter_only_in_training() -> None:
    torch.manual_seed(0)
    x = torch.randn(8, 6)
    r = TopKRouter(6, 4, jitter=0.5)
    r.eval()
    torch.testing.assert_close(r(x).logits, r(x).logits)
    r.train()
    assert not torch.allclose(r(x).logits, r(x).logits)


def test_expert_choice_balanced_and_not_causal() -> None:
    torch.manual_seed(0)
    r = ExpertChoiceRouter(6, 4).eval()
    with torch.no_grad():
        r.gate.weight.normal_(0, 1.0)
    x = torch.randn(32, 6)
    out = r(x, capacity=8)
    assert out.kind == "expert" and out.indices.shape == (4, 8)
    assert expert_counts(out.indices.reshape(-1), 32).max() <= 4
    # routing of the first 16 tokens depends on tokens that come after them
    prefix = r(x[:16], capacity=4)
    picked_full = {(e, t) for e in range(4) for t in out.indices[e].tolist() if t < 16}
    picked_prefix = {(e, t) for e in range(4) for t in prefix.indices[e].tolist()}
    assert picked_full != picked_prefix


def test_balancer_sign_update() -> None:
    b = AuxFreeBalancer(4, update_rate=0.1)
    b.update(torch.tensor([10.0, 0.0, 5.0, 5.0]))
    torch.testing.assert_close(b.bias, torch.tensor([-0.1, 0.1, 0.0, 0.0]))
    b.accumulate(torch.tensor([0.0, 1.0, 1.0, 1.0]))
    b.accumulate(torch.tensor([0.0, 1.0, 1.0, 1.0]))
    b.update()
    torch.testing.assert_close(b.bias, torch.tensor([0.0, 0.0, -0.1, -0.1]))


def test_balancer_adapts_online_to_shifting_distribution() -> None:
    torch.manual_seed(0)
    n_exp, d = 8, 16
    # sigmoid scores as in DeepSeek-V3: an additive bias moves them without competition
    router = TopKRouter(d, n_exp, top_k=2, score_func="sigmoid").eval()
    with torch.no_grad():
        router.gate.weight.normal_(0, 0.3)
    balancer = AuxFreeBalancer(n_exp, update_rate=0.001)
    for _ in range(2):  # the token distribution shifts to a new cluster
        center = 1.5 * torch.randn(d)
        history = []
        for _ in range(600):
            with torch.no_grad():
                out = router(center + torch.randn(512, d), selection_bias=balancer.bias)
            counts = expert_counts(out.indices, n_exp)
            balancer.update(counts)
            history.append(float(load_statistics(counts)[0]))
        assert history[0] > 2.0  # the skewed input overloads some experts...
        assert sum(history[-50:]) / 50 < 1.3  # ...until the bias steers tokens elsewhere
