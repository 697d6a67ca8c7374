"""Profile one forward+backward of aiprime's MoELayer and HF's MixtralSparseMoeBlock.

    PYTHONPATH=src python benchmarks/moe_profile.py [--dtype bfloat16] [--rows 25]

Prints torch.profiler tables (self CPU time, then device time) per shape and
implementation, and the number of top-level operator calls: at a few thousand tokens a GPU
MoE layer is bound by kernel launches and host syncs, not by FLOPs.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from moe_bench import DTYPES, SHAPES, build, step_fns


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    p.add_argument("--rows", type=int, default=25)
    p.add_argument("--tokens", type=int, default=None)
    p.add_argument("--record-shapes", action="store_true", help="also group by input shape")
    p.add_argument("--shapes", nargs="*", default=list(SHAPES), choices=list(SHAPES))
    args = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sort_dev = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    for name in args.shapes:
        shape = dict(SHAPES[name])
        if args.tokens:
            shape["tokens"] = args.tokens
        mods = build(shape, DTYPES[args.dtype], device)
        x = torch.randn(shape["tokens"], shape["d"], device=device, dtype=DTYPES[args.dtype])
        x.requires_grad_(True)
        fns = step_fns(mods, x, torch.randn_like(x))
        for impl in ("aiprime", "hf"):
            for _ in range(3):
                fns[impl][1]()
            torch.cuda.synchronize() if device.type == "cuda" else None
            with profile(activities=acts, record_shapes=args.record_shapes) as prof:
                for _ in range(5):
                    fns[impl][1]()
                torch.cuda.synchronize() if device.type == "cuda" else None
            ev = prof.key_averages()
            print(f"\n===== {name} {args.dtype} {impl} (5 fwd+bwd) =====")
            print(
                ev.table(
                    sort_by="self_cpu_time_total", row_limit=args.rows, max_name_column_width=48
                )
            )
            if args.record_shapes:
                by_shape = prof.key_averages(group_by_input_shape=True)
                print(by_shape.table(sort_by="self_cpu_time_total", row_limit=args.rows))
            if device.type == "cuda":
                print(ev.table(sort_by=sort_dev, row_limit=args.rows, max_name_column_width=48))


if __name__ == "__main__":
    main()
