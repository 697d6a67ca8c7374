"""Training throughput of several configs, measured interleaved.

The ``tokens_per_s`` a training run logs depends on how busy the machine was during that run,
so runs made one after another on a shared machine are not comparable by it. Here the configs
take turns (round-robin, a few steps each, several rounds), so a load change hits all of them,
and besides wall-clock tokens/s the process CPU time is measured: at one thread,
tokens per CPU-second is a measure of compute per token that other processes barely affect.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, replace

import torch

from aiprime.moe.layer import update_bias_balancers

from .model import GPT
from .train import TrainConfig, make_optimizer


@dataclass
class Throughput:
    name: str
    tokens_per_step: int
    wall_tokens_per_s: float  # median over rounds
    cpu_tokens_per_s: float  # median over rounds: tokens / process CPU second
    params_total: int
    params_active: int


def measure_throughput(
    configs: dict[str, TrainConfig],
    vocab_size: int = 65,
    steps: int = 5,
    rounds: int = 3,
    warmup: int = 2,
    threads: int = 1,
    seed: int = 0,
) -> list[Throughput]:
    """Median tokens/s (wall and CPU) of full training steps (forward, backward with the aux
    loss, clipping, AdamW, bias balancing) on random tokens, the configs taking turns for
    ``rounds`` rounds of ``steps`` steps after ``warmup`` untimed steps each."""
    if steps < 1 or rounds < 1:
        raise ValueError("steps and rounds must be >= 1")
    torch.set_num_threads(threads)
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for name, cfg in configs.items():
        torch.manual_seed(seed)
        model = GPT(replace(cfg.model, vocab_size=vocab_size)).train()
        opt = make_optimizer(model, cfg.optim)
        shape = (cfg.train.batch_size, cfg.model.block_size + 1)
        state[name] = (model, opt, shape)

    def step(name: str) -> None:
        model, opt, shape = state[name]
        b = torch.randint(vocab_size, shape, generator=gen)
        opt.zero_grad(set_to_none=True)
        res = model(b[:, :-1], b[:, 1:])
        assert res.loss is not None
        (res.loss + res.aux_loss).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        update_bias_balancers(model)

    for name in configs:
        for _ in range(warmup):
            step(name)
    wall: dict[str, list[float]] = {n: [] for n in configs}
    cpu: dict[str, list[float]] = {n: [] for n in configs}
    for _ in range(rounds):
        for name in configs:
            w0, c0 = time.perf_counter(), time.process_time()
            for _ in range(steps):
                step(name)
            wall[name].append(time.perf_counter() - w0)
            cpu[name].append(time.process_time() - c0)
    out = []
    for name, cfg in configs.items():
        tokens = cfg.train.batch_size * cfg.model.block_size * steps
        counts = state[name][0].param_counts()
        out.append(
            Throughput(
                name=name,
                tokens_per_step=cfg.train.batch_size * cfg.model.block_size,
                wall_tokens_per_s=tokens / statistics.median(wall[name]),
                cpu_tokens_per_s=tokens / statistics.median(cpu[name]),
                params_total=counts.total,
                params_active=counts.active,
            )
        )
    return out
