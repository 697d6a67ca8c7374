"""Property-based tests of permutation, un-permutation and capacity."""

from __future__ import annotations

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from aiprime.moe import permute, plan_expert_choice, plan_token_choice, unpermute
from aiprime.moe.dispatch import gather_sum, scatter_sum
from aiprime.moe.parallel import regroup_index


@st.composite
def routings(draw: st.DrawFn) -> tuple[torch.Tensor, int, int | None]:
    n_exp = draw(st.integers(1, 6))
    n = draw(st.integers(0, 12))
    k = draw(st.integers(1, n_exp))
    seed = draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    # distinct experts per token, like topk
    rows = [torch.randperm(n_exp, generator=g)[:k] for _ in range(n)]
    idx = torch.stack(rows) if rows else torch.zeros(0, k, dtype=torch.long)
    cap = draw(st.one_of(st.none(), st.integers(1, 2 * max(n, 1) * k)))
    return idx, n_exp, cap


@settings(max_examples=150, deadline=None, database=None)
@given(routings())
def test_plan_properties(routing: tuple[torch.Tensor, int, int | None]) -> None:
    idx, n_exp, cap = routing
    n, k = idx.shape
    w = torch.rand(n, k)
    plan = plan_token_choice(idx, w, n_exp, cap)
    s = plan.token_idx.numel()
    assert int(plan.counts.sum()) == s == int(plan.offsets[-1])
    assert plan.offsets.dtype == torch.int32
    torch.testing.assert_close(plan.routed_counts, torch.bincount(idx.reshape(-1), minlength=n_exp))
    if cap is not None:
        assert (plan.counts <= cap).all()
    assert int(plan.n_dropped) == n * k - s
    # rows are grouped by expert and every kept row is a real (token, expert, gate) triple
    experts = torch.repeat_interleave(torch.arange(n_exp), plan.counts)
    pairs = {(int(t), int(e)) for t, e in zip(plan.token_idx, experts, strict=True)}
    assert len(pairs) == s
    gate = {(int(t), int(e)): float(w[t, j]) for t in range(n) for j, e in enumerate(idx[t])}
    assert pairs <= set(gate)
    for t, e, wt in zip(
        plan.token_idx.tolist(), experts.tolist(), plan.weights.tolist(), strict=True
    ):
        assert gate[(t, e)] == wt
    # capacity keeps the highest-priority slots (slot-major, then token order)
    if cap is not None:
        for e in range(n_exp):
            order = [(j, t) for j in range(k) for t in range(n) if int(idx[t, j]) == e]
            kept = {(t, e) for _, t in order[:cap]}
            assert {p for p in pairs if p[1] == e} == kept


@settings(max_examples=150, deadline=None, database=None)
@given(routings(), st.integers(1, 5))
def test_unpermute_inverts_permute(routing: tuple[torch.Tensor, int, int | None], d: int) -> None:
    idx, n_exp, cap = routing
    n, k = idx.shape
    x = torch.randn(n, d, dtype=torch.float64)
    w = torch.rand(n, k, dtype=torch.float64)
    plan = plan_token_choice(idx, w, n_exp, cap)
    xs = permute(x, plan)
    assert xs.shape == (plan.token_idx.numel(), d)
    kept = torch.bincount(plan.token_idx, minlength=n).to(x.dtype)
    torch.testing.assert_close(unpermute(xs, plan, n), x * kept[:, None])
    gate_sum = torch.zeros(n, dtype=x.dtype).index_add_(0, plan.token_idx, plan.weights)
    torch.testing.assert_close(unpermute(xs, plan, n, plan.weights), x * gate_sum[:, None])
    if cap is None:  # dropless: every gate is used
        torch.testing.assert_close(gate_sum, w.sum(-1))


@settings(max_examples=100, deadline=None, database=None)
@given(routings(), st.booleans(), st.booleans())
def test_gather_and_scatter_unpermute_agree(
    routing: tuple[torch.Tensor, int, int | None], gated: bool, expert_choice: bool
) -> None:
    # the CPU (embedding_bag) and CUDA (scatter) un-permutes: same values and gradients
    idx, n_exp, cap = routing
    n, k = idx.shape
    if n == 0:
        return
    g = torch.Generator().manual_seed(n * 31 + k)
    if expert_choice:
        c = max(1, n // 2)
        ec = torch.stack([torch.randperm(n, generator=g)[:c] for _ in range(n_exp)])
        plan = plan_expert_choice(ec, torch.rand(n_exp, c, generator=g), n)
    else:
        plan = plan_token_choice(idx, torch.rand(n, k, generator=g), n_exp, cap)
    outs = []
    for fn in (gather_sum, scatter_sum):
        y = torch.randn(plan.token_idx.numel(), 3, generator=torch.Generator().manual_seed(1))
        y = y.double().requires_grad_(True)
        w = plan.weights.double().requires_grad_(True) if gated else None
        out = fn(y, plan, n, w)
        out.backward(torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out))
        outs.append((out.detach(), y.grad, None if w is None else w.grad))
    for a, b in zip(outs[0], outs[1], strict=True):
        if a is None or b is None:
            assert a is b
        else:
            torch.testing.assert_close(a, b)


def test_gather_sum_accumulates_bfloat16_in_float32() -> None:
    # 1 + 7 * 2**-9 is 1.0137 in float32 -> 1.0156 in bf16; summing in bf16 would give 1.0
    y = torch.tensor([[1.0]] + [[2**-9]] * 7, dtype=torch.bfloat16)
    plan = plan_token_choice(torch.arange(8).view(1, 8), torch.ones(1, 8), 8)
    assert gather_sum(y, plan, 1, None).item() == torch.tensor(1.0137).bfloat16().item()


@settings(max_examples=60, deadline=None, database=None)
@given(st.integers(1, 5), st.integers(1, 10), st.integers(0, 2**16))
def test_expert_choice_plan(n_exp: int, n: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    c = math.ceil(n / 2)
    idx = torch.stack([torch.randperm(n, generator=g)[:c] for _ in range(n_exp)])
    plan = plan_expert_choice(idx, torch.rand(n_exp, c), n)
    assert plan.counts.tolist() == [c] * n_exp
    picked = set(idx.reshape(-1).tolist())
    assert int(plan.n_dropped) == n - len(picked)


@settings(max_examples=100, deadline=None, database=None)
@given(st.integers(1, 4), st.integers(1, 4), st.integers(0, 2**16))
def test_regroup_index(world: int, n_local: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    counts = torch.randint(0, 4, (world, n_local), generator=g)
    # label every received row with its (source, expert) chunk
    labels = torch.repeat_interleave(
        torch.arange(world * n_local), counts.reshape(-1)
    )  # source-major layout
    idx = regroup_index(counts)
    assert sorted(idx.tolist()) == list(range(int(counts.sum())))
    regrouped = labels[idx]
    expert_of = regrouped % n_local
    source_of = regrouped // n_local
    key = expert_of * world + source_of  # expert-major, then source
    assert (key[1:] >= key[:-1]).all()
