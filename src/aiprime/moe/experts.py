"""Packed expert weights and grouped matrix multiplies."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import Activation

_GMM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_grouped_mm_op = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


def grouped_mm_supported(a: Tensor, b: Tensor) -> bool:
    """Whether ``torch`` grouped_mm accepts these operands (forward and backward layouts).

    It refuses other dtypes, mixed dtypes, and row strides or base pointers that are not a
    multiple of 16 bytes (e.g. ``d = 5`` in float32), in which case we fall back.
    """
    if _grouped_mm_op is None or a.dtype not in _GMM_DTYPES or a.dtype != b.dtype:
        return False
    if a.device.type == "cuda" and torch.cuda.get_device_capability(a.device) < (8, 0):
        return False
    size = a.element_size()
    k, n = b.shape[-2], b.shape[-1]
    if (k * size) % 16 or (n * size) % 16:
        return False
    if torch.compiler.is_compiling():
        return True  # fake tensors have no storage; compiled buffers are aligned
    return a.data_ptr() % 16 == 0 and b.data_ptr() % 16 == 0


def _gmm(a: Tensor, b: Tensor, offs: Tensor, use_kernel: bool) -> Tensor:
    """``out[rows of group e] = a[rows of group e] @ b[e]``; ``offs[-1]`` must equal ``len(a)``."""
    if use_kernel:
        assert _grouped_mm_op is not None
        return _grouped_mm_op(a.contiguous(), b, offs=offs)
    # Fallback: one matmul per non-empty group, only for layouts the kernel refuses.
    out = a.new_empty(a.shape[0], b.shape[-1])
    start = 0
    for e, end in enumerate(offs.tolist()):
        if end > start:
            torch.mm(a[start:end], b[e], out=out[start:end])
        start = end
    return out


def _gmm_weight_grad(a: Tensor, g: Tensor, offs: Tensor, n_groups: int, use_kernel: bool) -> Tensor:
    """``grad_b[e] = a[rows of e].T @ g[rows of e]``, zero for empty groups."""
    if use_kernel and a.shape[0] > 0:
        assert _grouped_mm_op is not None
        return _grouped_mm_op(a.t(), g, offs=offs)
    out = a.new_zeros(n_groups, a.shape[1], g.shape[1])
    start = 0
    for e, end in enumerate(offs.tolist()):
        if end > start:
            torch.mm(a[start:end].t(), g[start:end], out=out[e])
        start = end
    return out


class _GroupedMM(torch.autograd.Function):
    """Autograd wrapper so backward also uses grouped_mm and tolerates non-contiguous grads."""

    @staticmethod
    def forward(ctx: Any, a: Tensor, b: Tensor, offs: Tensor) -> Tensor:
        use_kernel = grouped_mm_supported(a, b)
        ctx.save_for_backward(a, b, offs)
        ctx.use_kernel = use_kernel
        return _gmm(a, b, offs, use_kernel)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, Tensor | None, None]:
        a, b, offs = ctx.saved_tensors
        grad = grad.contiguous()
        grad_a = grad_b = None
        if ctx.needs_input_grad[0]:
            bt = b.transpose(-2, -1)
            grad_a = _gmm(grad, bt, offs, ctx.use_kernel)
        if ctx.needs_input_grad[1]:
            grad_b = _gmm_weight_grad(a, grad, offs, b.shape[0], ctx.use_kernel)
        return grad_a, grad_b, None


def grouped_mm(a: Tensor, b: Tensor, offsets: Tensor) -> Tensor:
    """Differentiable grouped matmul: ``a`` ``[S, K]`` sorted by group, ``b`` ``[E, K, N]``.

    ``offsets`` are int32 cumulative group ends with ``offsets[-1] == S``. Uses
    ``torch.nn.functional.grouped_mm`` (CPU and CUDA sm80+) when the layout allows and a
    per-group ``torch.mm`` otherwise.
    """
    if a.shape[0] == 0:
        return a.new_zeros(0, b.shape[-1]) + (b.sum() * 0).to(a.dtype)
    return _GroupedMM.apply(a, b, offsets.to(torch.int32))


class GroupedExperts(nn.Module):
    """``E`` FFN experts with packed weights, run on expert-sorted rows in two grouped matmuls.

    ``w_in`` is ``[E, d, 2f]`` for SwiGLU (the packed gate ``[E, d, f]`` and up ``[E, d, f]``
    projections side by side, so one grouped matmul reads the input once) or ``[E, d, f]``
    for GELU; ``w_out`` is ``[E, f, d]``.
    """

    def __init__(
        self, n_experts: int, d_model: int, d_ff: int, activation: Activation = "swiglu"
    ) -> None:
        super().__init__()
        self.n_experts = n_experts
        self.d_model = d_model
        self.d_ff = d_ff
        self.activation: Activation = activation
        n_in = 2 * d_ff if activation == "swiglu" else d_ff
        self.w_in = nn.Parameter(torch.empty(n_experts, d_model, n_in))
        self.w_out = nn.Parameter(torch.empty(n_experts, d_ff, d_model))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.w_in, std=1.0 / math.sqrt(self.d_model))
        nn.init.normal_(self.w_out, std=1.0 / math.sqrt(self.d_ff))

    def forward(self, x: Tensor, offsets: Tensor, scale: Tensor | None = None) -> Tensor:
        """``x`` ``[S, d]`` sorted by expert; ``scale`` ``[S]`` (gates) is applied on the
        narrower of the hidden and output activations to save memory traffic."""
        h = grouped_mm(x, self.w_in, offsets)
        if self.activation == "swiglu":
            gate, up = h.chunk(2, dim=-1)
            h = F.silu(gate) * up
        else:
            h = F.gelu(h)
        early = scale is not None and self.d_ff <= self.d_model
        if early:
            assert scale is not None
            h = h * scale.to(h.dtype).unsqueeze(-1)
        y = grouped_mm(h, self.w_out, offsets)
        if scale is not None and not early:
            y = y * scale.to(y.dtype).unsqueeze(-1)
        return y


class DenseFFN(nn.Module):
    """Plain FFN used for shared experts and as the dense baseline of the benchmark."""

    def __init__(self, d_model: int, d_ff: int, activation: Activation = "swiglu") -> None:
        super().__init__()
        self.activation: Activation = activation
        self.w_in = nn.Linear(d_model, 2 * d_ff if activation == "swiglu" else d_ff, bias=False)
        self.w_out = nn.Linear(d_ff, d_model, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        h = self.w_in(x)
        if self.activation == "swiglu":
            gate, up = h.chunk(2, dim=-1)
            h = F.silu(gate) * up
        else:
            h = F.gelu(h)
        return self.w_out(h)
