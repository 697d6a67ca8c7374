"""Packed expert weights and grouped matrix multiplies."""

from __future__ import annotations

import functools
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from .config import Activation
from .workspace import Workspace

_GMM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_KERNEL = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


@functools.cache
def _capability(index: int | None) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def grouped_mm_supported(a: Tensor, b: Tensor) -> bool:
    """Whether ``torch`` grouped_mm accepts these operands (forward and backward layouts).

    It refuses other dtypes, mixed dtypes, and row strides or base pointers that are not a
    multiple of 16 bytes (e.g. ``d = 5`` in float32), in which case we fall back.
    """
    if _KERNEL is None or a.dtype not in _GMM_DTYPES or a.dtype != b.dtype:
        return False
    if a.device.type == "cuda" and _capability(a.device.index) < (8, 0):
        return False
    size = a.element_size()
    k, n = b.shape[-2], b.shape[-1]
    if (k * size) % 16 or (n * size) % 16:
        return False
    # empty tensors may have an unaligned (null) pointer but are never read
    return all(t.numel() == 0 or t.data_ptr() % 16 == 0 for t in (a, b))


# (device type, dtype) pairs for which the kernel raised: e.g. float32 on a CUDA build whose
# grouped_mm is bf16-only. Remembered so the exception is paid once, not per call.
_REFUSED: set[tuple[str, torch.dtype]] = set()


def _try_kernel(*args: Tensor, offs: Tensor) -> Tensor | None:
    key = (args[0].device.type, args[0].dtype)
    if _KERNEL is None or key in _REFUSED:
        return None
    try:
        out: Tensor = _KERNEL(*args, offs=offs)
    except (RuntimeError, NotImplementedError):
        _REFUSED.add(key)
        return None
    return out


def _gmm(a: Tensor, b: Tensor, offs: Tensor, use_kernel: bool) -> Tensor:
    """``out[rows of group e] = a[rows of group e] @ b[e]``; ``offs[-1]`` must equal ``len(a)``."""
    if use_kernel:
        res = _try_kernel(a.contiguous(), b, offs=offs)
        if res is not None:
            return res
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
        res = _try_kernel(a.t(), g.contiguous(), offs=offs)
        if res is not None:
            return res
    out = a.new_zeros(n_groups, a.shape[1], g.shape[1])
    start = 0
    for e, end in enumerate(offs.tolist()):
        if end > start:
            torch.mm(a[start:end].t(), g[start:end], out=out[e])
        start = end
    return out


@torch.library.custom_op("aiprime::grouped_mm", mutates_args=())
def _grouped_mm_op(a: Tensor, b: Tensor, offs: Tensor) -> Tensor:
    # An opaque custom op: torch.compile's meta kernel of grouped_mm only accepts bf16,
    # so hiding the call lets float32 models compile around it.
    return _gmm(a, b, offs, grouped_mm_supported(a, b))


@_grouped_mm_op.register_fake
def _(a: Tensor, b: Tensor, offs: Tensor) -> Tensor:
    return a.new_empty(a.shape[0], b.shape[-1])


@torch.library.custom_op("aiprime::grouped_mm_weight_grad", mutates_args=())
def _grouped_mm_weight_grad_op(a: Tensor, g: Tensor, offs: Tensor, n_groups: int) -> Tensor:
    # the kernel needs the K and N row strides of a and g 16-byte aligned (not the jagged M)
    use_kernel = grouped_mm_supported(a, g.new_empty(0, a.shape[1], g.shape[1]))
    return _gmm_weight_grad(a, g, offs, n_groups, use_kernel)


@_grouped_mm_weight_grad_op.register_fake
def _(a: Tensor, g: Tensor, offs: Tensor, n_groups: int) -> Tensor:
    return a.new_empty(n_groups, a.shape[1], g.shape[1])


def _setup_context(ctx: Any, inputs: tuple[Tensor, Tensor, Tensor], output: Tensor) -> None:
    a, b, offs = inputs
    ctx.save_for_backward(a, b, offs)


def _backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, Tensor | None, None]:
    # grad may be non-contiguous (e.g. expanded from a sum), which the kernel refuses
    a, b, offs = ctx.saved_tensors
    grad = grad.contiguous()
    grad_a = grad_b = None
    if ctx.needs_input_grad[0]:
        grad_a = _grouped_mm_op(grad, b.transpose(-2, -1), offs)
    if ctx.needs_input_grad[1]:
        grad_b = _grouped_mm_weight_grad_op(a, grad, offs, b.shape[0])
    return grad_a, grad_b, None


_grouped_mm_op.register_autograd(_backward, setup_context=_setup_context)


def _native_cuda(a: Tensor, b: Tensor) -> bool:
    """Whether to call the CUDA kernel directly, with its native autograd: bf16 (the dtype
    of its fast path), eager mode. Skips the custom op's Python dispatch, which at a few
    thousand tokens costs as much GPU idle time as the matmul itself."""
    return (
        a.is_cuda
        and b.dtype == torch.bfloat16
        and _KERNEL is not None
        and not torch.compiler.is_compiling()
        and grouped_mm_supported(a, b)
    )


def grouped_mm(a: Tensor, b: Tensor, offsets: Tensor) -> Tensor:
    """Differentiable grouped matmul: ``a`` ``[S, K]`` sorted by group, ``b`` ``[E, K, N]``.

    ``offsets`` are int32 cumulative group ends with ``offsets[-1] == S``. Uses
    ``torch.nn.functional.grouped_mm`` (CPU and CUDA sm80+) when the layout allows and a
    per-group ``torch.mm`` otherwise.
    """
    # like HF, match the weight dtype (grouped_mm is not autocast-aware)
    a = a.to(b.dtype)
    if offsets.dtype != torch.int32:
        offsets = offsets.to(torch.int32)
    if _native_cuda(a, b):
        assert _KERNEL is not None
        res: Tensor = _KERNEL(a.contiguous(), b, offs=offsets)
        return res
    out: Tensor = _grouped_mm_op(a, b, offsets)
    return out


# Padding beyond this factor of the real rows sends the padded-bmm path back to grouped_mm.
_MAX_PAD_RATIO = 2.0


def _padded_rows(offsets: Tensor, n_rows: int, n_groups: int) -> tuple[Tensor, int] | None:
    """Destination rows ``e * M + rank`` of the sorted rows in an ``[E, M]`` padded layout,
    with ``M`` the largest group (one host sync), or ``None`` when padding would waste more
    than ``_MAX_PAD_RATIO``."""
    ends = offsets.long()
    starts = ends - torch.diff(ends, prepend=ends.new_zeros(1))
    m = int((ends - starts).max()) if n_groups else 0
    m = -(-m // 8) * 8  # round up: friendlier tiles, fewer distinct shapes
    if n_rows == 0 or n_groups * m > _MAX_PAD_RATIO * n_rows:
        return None
    rows = torch.arange(n_rows, device=offsets.device)
    group = torch.searchsorted(ends, rows, right=True)
    return group * m + rows - starts[group], m


class _SwiGLU(torch.autograd.Function):
    """``silu(gate) * up [* scale]`` with in-place arithmetic.

    On CPU, fresh large buffers cost more (page faults) than the arithmetic, and eager
    autograd allocates one per elementwise op; this version allocates one buffer forward
    and one backward (the input gradient, which it fills in place). It saves only the
    grouped-matmul output it already holds.
    """

    @staticmethod
    def forward(
        ctx: Any, gate_up: Tensor, scale: Tensor | None, workspace: Workspace | None
    ) -> Tensor:
        f = gate_up.shape[-1] // 2
        gate, up = gate_up[:, :f], gate_up[:, f:]
        h = workspace.take(gate.shape, gate) if workspace else None
        h = torch.ops.aten.silu.out(gate, out=h) if h is not None else F.silu(gate)
        h.mul_(up)
        if scale is not None:
            scale = scale.to(h.dtype).unsqueeze(-1)
            h.mul_(scale)
        ctx.save_for_backward(gate_up, scale)
        ctx.workspace = workspace
        # a pooled buffer leaves as an alias, so autograd's history never lands on it
        return h.detach() if workspace else h

    @staticmethod
    @once_differentiable  # in-place arithmetic and reused buffers
    def backward(ctx: Any, dh: Tensor) -> tuple[Tensor, Tensor | None, None]:
        gate_up, scale = ctx.saved_tensors
        f = gate_up.shape[-1] // 2
        gate, up = gate_up[:, :f], gate_up[:, f:]
        ws = ctx.workspace
        d_gate_up = ws.take(gate_up.shape, gate_up) if ws else torch.empty_like(gate_up)
        d_gate, d_up = d_gate_up[:, :f], d_gate_up[:, f:]
        torch.mul(dh, up, out=d_gate)  # dL/dsilu, before the scale
        torch.ops.aten.silu.out(gate, out=d_up)
        d_scale = None
        if scale is not None and ctx.needs_input_grad[1]:
            d_scale = torch.einsum("rf,rf->r", d_gate, d_up).to(scale.dtype)
        torch.ops.aten.silu_backward.grad_input(d_gate, gate, grad_input=d_gate)
        d_up.mul_(dh)
        if scale is not None:
            d_gate_up.mul_(scale)
        return d_gate_up, d_scale, None


def swiglu(
    gate_up: Tensor, scale: Tensor | None = None, workspace: Workspace | None = None
) -> Tensor:
    """``silu(gate_up[:, :f]) * gate_up[:, f:]``, optionally times ``scale[:, None]``; the
    output and the input gradient are written into ``workspace`` buffers when given."""
    out: Tensor = _SwiGLU.apply(gate_up, scale, workspace)
    return out


# One pool for every layer: their backward passes run one after another, so the gradient
# buffers are shared by all layers (forward buffers: up to the pool's cap per shape).
CPU_WORKSPACE = Workspace()


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
        # None turns buffer reuse off for this layer
        self.workspace: Workspace | None = CPU_WORKSPACE
        self.reset_parameters()

    def cpu_workspace(self) -> Workspace | None:
        """The pool of large CPU buffers reused across steps (eager mode only)."""
        return None if torch.compiler.is_compiling() else self.workspace

    @property
    def gates_hidden(self) -> bool:
        """Whether gates scale the hidden activation (narrower than the output, ``f <= d``)."""
        return self.d_ff <= self.d_model

    def reset_parameters(self) -> None:
        nn.init.normal_(self.w_in, std=1.0 / math.sqrt(self.d_model))
        nn.init.normal_(self.w_out, std=1.0 / math.sqrt(self.d_ff))

    def forward(self, x: Tensor, offsets: Tensor, scale: Tensor | None = None) -> Tensor:
        """``x`` ``[S, d]`` sorted by expert; ``scale`` ``[S]`` (gates) is applied on the
        narrower of the hidden and output activations to save memory traffic.

        On CUDA, dtypes without a grouped_mm fast path (float32, float16) run as two padded
        batched matmuls after one host sync, instead of a sync and a matmul per expert in
        each of the six grouped matmuls of forward and backward.
        """
        if x.is_cuda and self.w_in.dtype != torch.bfloat16 and not torch.compiler.is_compiling():
            layout = _padded_rows(offsets, x.shape[0], self.n_experts)
            if layout is not None:
                return self._forward_padded(x, scale, *layout)
        return self._forward_grouped(x, offsets, scale)

    def _activation(self, h: Tensor, scale: Tensor | None) -> Tensor:
        if self.activation == "swiglu":
            if h.is_cuda:  # plain ops: fewer kernel launches than the in-place Function
                gate, up = h.chunk(2, dim=-1)
                h = F.silu(gate) * up
            else:
                return swiglu(h, scale, self.cpu_workspace())
        else:
            h = F.gelu(h)
        if scale is not None:
            h = h * scale.to(h.dtype).unsqueeze(-1)
        return h

    def _forward_grouped(self, x: Tensor, offsets: Tensor, scale: Tensor | None) -> Tensor:
        h = grouped_mm(x, self.w_in, offsets)
        early = scale is not None and self.gates_hidden
        h = self._activation(h, scale if early else None)
        y = grouped_mm(h, self.w_out, offsets)
        if scale is not None and not early:
            y = y * scale.to(y.dtype).unsqueeze(-1)
        return y

    def _forward_padded(self, x: Tensor, scale: Tensor | None, dest: Tensor, m: int) -> Tensor:
        n_exp, d = self.n_experts, self.d_model
        xp = x.new_zeros(n_exp * m, d).index_copy(0, dest, x.to(self.w_in.dtype))
        h = torch.bmm(xp.view(n_exp, m, d), self.w_in).view(n_exp * m, -1)
        early = scale is not None and self.gates_hidden
        sp = None
        if early:
            assert scale is not None
            sp = scale.new_zeros(n_exp * m).index_copy(0, dest, scale)
        h = self._activation(h, sp)
        y = torch.bmm(h.view(n_exp, m, -1), self.w_out).view(n_exp * m, d)
        y = y.index_select(0, dest)
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
