"""Reusable CPU buffers for the MoE layer's large per-step tensors.

PyTorch has no caching allocator on CPU: every multi-MiB tensor is a fresh ``mmap`` from
glibc (above 32 MiB always), paid in page faults on first write and ``munmap`` on free. A
fine-grained layer makes several ``[N·k, ·]`` buffers per step (the gathered inputs, the
SwiGLU output, two gradients), so reusing them is worth several percent of its time. A buffer
is handed out again only when nothing else holds it (its Python, tensor and storage
reference counts are back to what they were when it was made), so a graph that still saves
it, a second call of the same layer in one step, or another thread never sees it
overwritten; they get a fresh one. Forward results leave as ``detach()`` aliases, so
autograd's history is attached to the alias, never to the pooled tensor, and the alias's
hold on the storage is what marks the buffer as in use.
"""

from __future__ import annotations

import sys
import threading
from typing import Any

import torch
from torch import Tensor


def _refs(t: Tensor) -> tuple[int, int, int] | None:
    """Python, tensor and storage reference counts (the last two through private torch APIs,
    whose behaviour tests/moe checks); without them nothing is ever reused."""
    try:
        uses: int = t._use_count()  # type: ignore[attr-defined]
        storage: int = torch._C._storage_Use_Count(t.untyped_storage()._cdata)
    except AttributeError:
        return None
    return sys.getrefcount(t), uses, storage


class Workspace:
    """Per-thread pools of buffers by shape and dtype; ``take`` returns an uninitialised
    tensor. Same-shaped buffers whose uses do not overlap (the un-permute gradient is
    consumed before SwiGLU's is made) share one, so the layer's peak memory does not grow."""

    max_per_shape = 4

    def __init__(self) -> None:
        self._local = threading.local()

    def take(self, shape: tuple[int, ...], like: Tensor) -> Tensor:
        pools: dict[Any, list[list[Any]]] = self._local.__dict__.setdefault("pools", {})
        # tensors made under inference_mode cannot be written outside it: separate pools
        key = (tuple(shape), like.dtype, like.device, torch.is_inference_mode_enabled())
        pool = pools.setdefault(key, [])
        for entry in pool:
            buf = entry[0]  # counted like at creation: entry, this name, getrefcount's arg
            if entry[1] is not None and _refs(buf) == entry[1]:
                return buf
        buf = torch.empty(shape, dtype=like.dtype, device=like.device)
        if len(pool) < self.max_per_shape:
            entry = [buf, None]
            pool.append(entry)
            entry[1] = _refs(buf)
        return buf

    def nbytes(self) -> int:
        """Bytes this thread's pools hold."""
        pools = self._local.__dict__.get("pools", {})
        return sum(entry[0].nbytes for pool in pools.values() for entry in pool)

    def clear(self) -> None:
        self._local = threading.local()

    # a copied module shares the pool (it holds no model state); an unpickled one is empty
    def __deepcopy__(self, memo: dict[int, Any]) -> Workspace:
        return self

    def __getstate__(self) -> dict[str, Any]:
        return {}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self._local = threading.local()
