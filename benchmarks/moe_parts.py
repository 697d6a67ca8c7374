"""Time two parts of the fine-grained MoE layer on their own (CPU analysis behind results.md).

    python benchmarks/moe_parts.py --out out/moe_parts.json

1. The un-permute, forward+backward: the scatter into token order + sum over the k slots
   (``dispatch.scatter_sum``, the CUDA path) against the ``embedding_bag`` gather-sum
   (``dispatch.gather_sum``, the CPU path), without the buffer pool.
2. The six grouped matmuls of a forward+backward (``F.grouped_mm``) against the six dense
   GEMMs of the dense FFN with the same FLOPs.

Shape: tokens 4096, d 512, f 256, E 64, top-8 (``moe_bench.py``'s fine-grained shape),
random distinct experts per token. Medians over ``--reps`` after two warm-ups.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as moe_bench.py

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from _common import write_results

from aiprime.moe.dispatch import gather_sum, plan_token_choice, scatter_sum

N, D, FF, E, K = 4096, 512, 256, 64, 8


def median_ms(fn: Callable[[], object], reps: int) -> float:
    for _ in range(2):
        fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1000


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", type=Path, default=Path("out/moe_parts.json"))
    ap.add_argument("--reps", type=int, default=9)
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    idx = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(N)])
    plan = plan_token_choice(idx, torch.rand(N, K, generator=g), E)
    s = N * K
    y = torch.randn(s, D, requires_grad=True)
    grad = torch.randn(N, D)

    def unpermute(fn: Callable[..., torch.Tensor]) -> Callable[[], None]:
        def run() -> None:
            fn(y, plan, N, None).backward(grad)
            y.grad = None

        return run

    out: dict[str, object] = {"shape": dict(tokens=N, d=D, f=FF, E=E, k=K)}
    out["unpermute_scatter_fwd_bwd_ms"] = median_ms(unpermute(scatter_sum), args.reps)
    out["unpermute_gather_fwd_bwd_ms"] = median_ms(unpermute(gather_sum), args.reps)

    offs = plan.offsets
    x, h, gy, dgu = (torch.randn(s, n) for n in (D, FF, D, 2 * FF))
    w_in, w_out = torch.randn(E, D, 2 * FF), torch.randn(E, FF, D)
    xd, hd, gyd, dgud = (torch.randn(N, n) for n in (D, K * FF, D, 2 * K * FF))
    wd_in, wd_out = torch.randn(D, 2 * K * FF), torch.randn(K * FF, D)
    grouped = [
        lambda: F.grouped_mm(x, w_in, offs=offs),  # forward, input projection
        lambda: F.grouped_mm(h, w_out, offs=offs),  # forward, output projection
        lambda: F.grouped_mm(gy, w_out.transpose(-2, -1), offs=offs),  # d hidden
        lambda: F.grouped_mm(h.t(), gy, offs=offs),  # d w_out
        lambda: F.grouped_mm(dgu, w_in.transpose(-2, -1), offs=offs),  # d input
        lambda: F.grouped_mm(x.t(), dgu, offs=offs),  # d w_in
    ]
    dense = [
        lambda: xd @ wd_in,
        lambda: hd @ wd_out,
        lambda: gyd @ wd_out.t(),
        lambda: hd.t() @ gyd,
        lambda: dgud @ wd_in.t(),
        lambda: xd.t() @ dgud,
    ]
    out["grouped_mm_six_ms"] = sum(median_ms(f, args.reps) for f in grouped)
    out["dense_gemm_six_ms"] = sum(median_ms(f, args.reps) for f in dense)
    out["grouped_over_dense"] = out["grouped_mm_six_ms"] / out["dense_gemm_six_ms"]  # type: ignore[operator]
    write_results(out, args.out)


if __name__ == "__main__":
    main()
