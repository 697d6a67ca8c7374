"""Self-check of data-parallel training: run it under torchrun with 2+ processes.

    torchrun --standalone --nproc-per-node 2 -m aiprime.moe.lm.ddp_check \\
        --config configs/moe/smoke.toml --text some.txt --out /tmp/ddp

Every rank trains the same run twice: straight through, and stopped half-way then
resumed. Rank 0 then checks the two give identical metrics and weights, i.e. that exact
resume also holds with several ranks (each rank's batch and dropout RNG states are
checkpointed), and prints ``DDP OK world=N``.
"""

from __future__ import annotations

import argparse
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
    args = ap.parse_args(argv)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    cfg = load_config(args.config)
    cfg.data.path = str(args.text.resolve())
    half = max(1, cfg.train.max_steps // 2)
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
        print(f"DDP OK world={world} final train loss {a[-1]['train_loss']:.4f}", flush=True)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
