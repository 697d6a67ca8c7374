"""Self-check of data-parallel training: run it under torchrun with 2+ processes.

    torchrun --standalone --nproc-per-node 2 -m aiprime.moe.lm.ddp_check \\
        --config configs/moe/smoke.toml --text some.txt --out /tmp/ddp

Every rank trains the same run twice: straight through, and stopped half-way then
resumed. Rank 0 then checks the two give identical metrics and weights, i.e. that exact
resume also holds with several ranks (each rank's batch and dropout RNG states are
checkpointed), and prints ``DDP OK world=N``. ``--device cuda`` runs it on one GPU per rank
with NCCL (exact resume on a GPU also needs deterministic kernels: if it fails there, compare
with ``CUBLAS_WORKSPACE_CONFIG=:4096:8``).

With ``--expert-parallel`` the two runs shard the experts over the ranks
(``train.expert_parallel``); besides exact resume it then checks that the expert-parallel
run matches a plain data-parallel one (same losses and final weights up to float summation
order, since EP only moves the expert computation) and that the checkpoint holds the full,
single-process layout. It prints ``EP-LM OK world=N``.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file

from .train import load_config, read_metrics, train


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--config", type=Path, required=True)
    ap.add_argument("--text", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--expert-parallel", action="store_true")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="cuda: NCCL")
    args = ap.parse_args(argv)
    if args.device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if args.device == "cuda" else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    cfg = load_config(args.config)
    cfg.data.path = str(args.text.resolve())
    cfg.train.device = args.device
    half = max(1, cfg.train.max_steps // 2)
    if args.expert_parallel:
        train(cfg, args.out / "dp")  # the reference: data parallel, full experts per rank
        cfg.train.expert_parallel = True
    train(cfg, args.out / "straight")
    train(cfg, args.out / "split", stop_at=half)
    train(cfg, args.out / "split", resume=True)
    if rank == 0:

        def strip(recs: list[dict]) -> list[dict]:
            return [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in recs]

        a, b = read_metrics(args.out / "straight"), read_metrics(args.out / "split")
        assert strip(a) == strip(b), "metrics differ between straight and resumed runs"
        wa = load_file(str(args.out / "straight" / "checkpoint" / "model.safetensors"))
        wb = load_file(str(args.out / "split" / "checkpoint" / "model.safetensors"))
        assert all(torch.equal(wa[k], wb[k]) for k in wa), "weights differ"
        assert a[-1]["tokens"] == cfg.train.max_steps * world * (
            cfg.train.batch_size * cfg.train.grad_accum * cfg.model.block_size
        )
        if args.expert_parallel:
            ref = read_metrics(args.out / "dp")
            wr = load_file(str(args.out / "dp" / "checkpoint" / "model.safetensors"))
            assert set(wr) == set(wa), "EP checkpoint keys differ from the full model's"
            assert all(wr[k].shape == wa[k].shape for k in wr), "EP checkpoint is sharded"
            for x, y in zip(ref, a, strict=True):
                for key in ("train_loss", "val_loss", "grad_norm"):
                    if key in x:
                        assert abs(x[key] - y[key]) <= 1e-4 * max(1.0, abs(x[key])), (key, x, y)
                assert x["expert_load"] == y["expert_load"] or all(
                    abs(u - v) < 1e-3
                    for lx, ly in zip(x["expert_load"], y["expert_load"], strict=True)
                    for u, v in zip(lx, ly, strict=True)
                ), "expert loads differ"
            worst = max(float((wr[k] - wa[k]).abs().max()) for k in wr)
            assert worst < 1e-4, f"EP weights differ from DP by {worst}"
            print(f"EP-LM OK world={world} max weight diff vs DP {worst:.2e}", flush=True)
        print(f"DDP OK world={world} final train loss {a[-1]['train_loss']:.4f}", flush=True)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
