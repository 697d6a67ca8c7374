"""Check that expert parallelism reproduces the single-process layer; run with torchrun.

    torchrun --standalone --nproc-per-node 2 -m aiprime.moe.ep_selfcheck

Every rank builds the same full layer, keeps its slice of the experts, routes its own
share of the tokens and compares outputs and gradients with the full layer run locally
on all tokens. Exits non-zero on mismatch. Uses gloo on CPU and NCCL when CUDA is there.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.distributed as dist

from .config import MoEConfig
from .layer import MoELayer
from .parallel import shard_expert_state_dict


def run_check(
    tokens_per_rank: int = 24,
    d_model: int = 16,
    d_ff: int = 8,
    n_experts: int = 4,
    top_k: int = 2,
    skewed: bool = False,
) -> float:
    """Return the largest absolute difference found (also raises on mismatch).

    ``skewed`` zeroes the router so every token picks experts 0..k-1: the other ranks
    receive no tokens at all, the all-to-all edge case.
    """
    rank, world = dist.get_rank(), dist.get_world_size()
    device = (
        torch.device("cuda", rank % torch.cuda.device_count())
        if dist.get_backend() == "nccl"
        else torch.device("cpu")
    )
    cfg = MoEConfig(
        d_model=d_model,
        d_ff=d_ff,
        n_experts=n_experts,
        top_k=top_k,
        n_shared_experts=1,
        aux_loss_weight=0.0,
        z_loss_weight=0.0,
    )
    torch.manual_seed(0)
    full = MoELayer(cfg).to(device)
    with torch.no_grad():
        full.router.gate.weight.normal_(0.0, 0.5)
        if skewed:
            full.router.gate.weight.zero_()
    x = torch.randn(world * tokens_per_rank, d_model, device=device)
    g = torch.randn_like(x)

    ep = MoELayer(cfg, ep_group=dist.group.WORLD).to(device)
    ep.load_state_dict(shard_expert_state_dict(full.state_dict(), rank, world))

    rows = slice(rank * tokens_per_rank, (rank + 1) * tokens_per_rank)
    x_full = x.clone().requires_grad_(True)
    y_full, _ = full(x_full)
    (y_full * g).sum().backward()

    x_local = x[rows].clone().requires_grad_(True)
    y_local, _ = ep(x_local)
    (y_local * g[rows]).sum().backward()

    worst = 0.0

    def check(name: str, got: torch.Tensor, want: torch.Tensor) -> None:
        nonlocal worst
        worst = max(worst, float((got - want).detach().abs().max()))
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4, msg=f"rank {rank}: {name}")

    check("output", y_local, y_full[rows])
    assert x_local.grad is not None and x_full.grad is not None
    check("input grad", x_local.grad, x_full.grad[rows])
    n_local = n_experts // world
    experts = slice(rank * n_local, (rank + 1) * n_local)
    for name, p in ep.named_parameters():
        ref = dict(full.named_parameters())[name].grad
        assert p.grad is not None and ref is not None, name
        if name.startswith("experts."):
            check(name, p.grad, ref[experts])
        else:  # replicated parameters: data-parallel gradients sum over ranks
            total = p.grad.clone()
            dist.all_reduce(total)
            check(name, total, ref)
    return worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--backend", default="nccl" if torch.cuda.is_available() else "gloo")
    args = parser.parse_args()
    dist.init_process_group(args.backend)
    try:
        worst = max(run_check(), run_check(skewed=True))
        if dist.get_rank() == 0:
            print(f"EP OK world={dist.get_world_size()} max_abs_diff={worst:.3g}", flush=True)
    finally:
        # Every rank reaches teardown together, then the group is destroyed after a short
        # grace period: gloo's TCP pairs can abort when a peer closes mid-shutdown.
        dist.barrier()
        time.sleep(0.2)
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
