"""Grouped matmul and packed experts against per-group matmuls."""

from __future__ import annotations

import pytest
import torch

from aiprime.moe import GroupedExperts, grouped_mm, grouped_mm_supported


def _loop(a: torch.Tensor, b: torch.Tensor, counts: list[int]) -> torch.Tensor:
    outs, start = [], 0
    for e, c in enumerate(counts):
        outs.append(a[start : start + c] @ b[e])
        start += c
    return torch.cat(outs) if outs else a.new_zeros(0, b.shape[-1])


@pytest.mark.parametrize(
    ("k", "n", "counts", "dtype"),
    [
        (16, 8, [3, 0, 7, 10], torch.float32),  # empty group, kernel path
        (16, 8, [0, 0, 0, 5], torch.float32),  # all rows in the last group
        (16, 8, [1, 2, 3, 1], torch.bfloat16),
        (5, 3, [2, 0, 4, 1], torch.float32),  # 20-byte rows: fallback path
        (8, 8, [33, 0, 0, 0], torch.float16),
    ],
)
def test_grouped_mm_forward_backward(k: int, n: int, counts: list[int], dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    a = torch.randn(sum(counts), k, dtype=dtype, requires_grad=True)
    b = torch.randn(len(counts), k, n, dtype=dtype, requires_grad=True)
    offs = torch.cumsum(torch.tensor(counts), 0).to(torch.int32)
    assert grouped_mm_supported(a, b) == ((k * a.element_size()) % 16 == 0)
    out = grouped_mm(a, b, offs)
    g = torch.randn_like(out)
    (out * g).sum().backward()
    ga, gb = a.grad.clone(), b.grad.clone()
    a.grad = b.grad = None
    ref = _loop(a, b, counts)
    (ref * g).sum().backward()
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=0.1, rtol=0.02)
    torch.testing.assert_close(out, ref, **tol)
    torch.testing.assert_close(ga, a.grad, **tol)
    torch.testing.assert_close(gb, b.grad, **tol)
    for e, c in enumerate(counts):
        if c == 0:
            assert gb[e].abs().sum() == 0


def test_non_contiguous_grad_and_empty_input() -> None:
    a = torch.randn(6, 8, requires_grad=True)
    b = torch.randn(2, 8, 4, requires_grad=True)
    offs = torch.tensor([2, 6], dtype=torch.int32)
    grouped_mm(a, b, offs).sum().backward()  # sum's grad is an expanded, stride-0 tensor
    w = b.detach()
    expected = torch.cat([torch.ones(2, 4) @ w[0].t(), torch.ones(4, 4) @ w[1].t()])
    torch.testing.assert_close(a.grad, expected)
    empty = grouped_mm(torch.randn(0, 8), b, torch.zeros(2, dtype=torch.int32))
    assert empty.shape == (0, 4)
    empty.sum().backward()


def test_float64_uses_fallback_and_gradcheck() -> None:
    torch.manual_seed(0)
    a = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, 3, 2, dtype=torch.float64, requires_grad=True)
    offs = torch.tensor([1, 1, 5], dtype=torch.int32)
    assert not grouped_mm_supported(a, b)
    assert torch.autograd.gradcheck(lambda x, w: grouped_mm(x, w, offs), (a, b))


@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
def test_packed_experts_shapes_and_scale(activation: str) -> None:
    torch.manual_seed(0)
    ex = GroupedExperts(3, 8, 4, activation)  # type: ignore[arg-type]
    assert ex.w_in.shape == (3, 8, 8 if activation == "swiglu" else 4)
    assert ex.w_out.shape == (3, 4, 8)
    x = torch.randn(7, 8)
    offs = torch.tensor([2, 2, 7], dtype=torch.int32)
    s = torch.rand(7)
    torch.testing.assert_close(ex(x, offs, s), ex(x, offs) * s[:, None])


@pytest.mark.parametrize("with_scale", [False, True])
def test_fused_swiglu_gradcheck(with_scale: bool) -> None:
    from aiprime.moe.experts import swiglu

    torch.manual_seed(0)
    gu = torch.randn(6, 8, dtype=torch.float64, requires_grad=True)
    s = torch.rand(6, dtype=torch.float64, requires_grad=True) if with_scale else None
    args = (gu, s) if with_scale else (gu,)
    assert torch.autograd.gradcheck(lambda *a: swiglu(*a), args)
    ref = torch.nn.functional.silu(gu[:, :4]) * gu[:, 4:]
    if s is not None:
        ref = ref * s[:, None]
    torch.testing.assert_close(swiglu(gu, s), ref)


@pytest.mark.parametrize("d_ff", [8, 32])  # scale applied on the hidden / output side
@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
def test_padded_bmm_path_matches_grouped(d_ff: int, activation: str) -> None:
    """The CUDA float32 path (padded bmm) gives the grouped path's values and gradients."""
    from aiprime.moe.experts import _padded_rows

    torch.manual_seed(0)
    ex = GroupedExperts(4, 16, d_ff, activation).double()  # type: ignore[arg-type]
    counts = torch.tensor([12, 0, 15, 13])
    offsets = torch.cumsum(counts, 0).to(torch.int32)
    x = torch.randn(40, 16, dtype=torch.float64, requires_grad=True)
    scale = torch.rand(40, dtype=torch.float64, requires_grad=True)
    layout = _padded_rows(offsets, 40, 4)
    assert layout is not None and layout[1] == 16
    outs = []
    for fn in (
        lambda: ex._forward_grouped(x, offsets, scale),
        lambda: ex._forward_padded(x, scale, *layout),
    ):
        y = fn()
        grads = torch.autograd.grad(y.square().sum(), (x, scale, ex.w_in, ex.w_out))
        outs.append((y, *grads))
    for a, b in zip(*outs, strict=True):
        torch.testing.assert_close(a, b)
    # a collapsed router would waste too much padding: back to grouped_mm
    assert _padded_rows(torch.tensor([0, 0, 40, 40], dtype=torch.int32), 40, 4) is None
