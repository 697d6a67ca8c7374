"""Train the LM of :mod:`aiprime.moe.lm.model` from a TOML config, with exact resume.

Resume is bit-for-bit: the checkpoint holds the model, the optimizer, the step (the LR is
a pure function of it), the batch generator state, the torch RNG state (dropout, router
jitter) and the partial sums of the current log window, so a run stopped and resumed
writes the same metrics and ends with the same weights as an uninterrupted one.
"""

from __future__ import annotations

import json
import math
import os
import time
import tomllib
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import load_file
from torch import Tensor

from aiprime.moe.layer import update_bias_balancers
from aiprime.moe.parallel import shard_expert_state_dict

from .checkpoint import (
    MODEL_FILE,
    find_checkpoint,
    load_model_weights,
    load_optimizer_state,
    read_optimizer_state,
    read_state,
    save_checkpoint,
)
from .data import BatchSampler, TextData, TokenizerKind, is_rank_file, tokenizer_from_json
from .expert_parallel import (
    clip_global_grad_norm,
    expert_param_names,
    gather_model_state,
    gather_optimizer_state,
    optimizer_param_names,
    shard_optimizer_state,
    sync_grads,
)
from .model import GPT, ModelConfig

CHECKPOINT_DIR = "checkpoint"
METRICS_FILE = "metrics.jsonl"


@dataclass
class DataConfig:
    """``path``: a UTF-8 text file; relative paths are tried against the working directory,
    then the config file's directory (stored resolved, so resume works from anywhere).
    ``bpe_encoding`` (``tokenizer = "bpe"`` only): a tiktoken encoding name, or a
    ``.tiktoken`` rank file (resolved like ``path``) for offline use."""

    path: str = ""
    tokenizer: TokenizerKind = "char"
    val_fraction: float = 0.1
    bpe_encoding: str = "gpt2"


@dataclass
class OptimConfig:
    """AdamW with linear warmup then cosine decay to ``min_lr`` at ``decay_steps``
    (default: ``train.max_steps``)."""

    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup_steps: int = 100
    decay_steps: int | None = None
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.99
    eps: float = 1e-8
    grad_clip: float = 1.0


@dataclass
class TrainSection:
    """Loop settings. Intervals count optimizer steps; ``batch_size`` is per micro-batch."""

    seed: int = 1337
    batch_size: int = 32
    grad_accum: int = 1
    max_steps: int = 1000
    eval_interval: int = 100
    eval_iters: int = 10
    log_interval: int = 10
    ckpt_interval: int = 250
    out_dir: str = "out/moe/run"
    threads: int | None = None
    # under torchrun: shard each MoE layer's experts over the ranks (see expert_parallel.py)
    expert_parallel: bool = False
    # "cpu" or "cuda" (under torchrun: cuda:LOCAL_RANK, and NCCL instead of gloo)
    device: str = "cpu"


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainSection = field(default_factory=TrainSection)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        """Build from nested dicts, rejecting unknown sections and keys (typos would
        otherwise silently fall back to defaults)."""
        known = {f.name: f for f in fields(cls)}
        unknown = set(d) - set(known)
        if unknown:
            raise ValueError(f"unknown config section(s): {sorted(unknown)}")
        kinds: dict[str, Any] = {
            "model": ModelConfig,
            "data": DataConfig,
            "optim": OptimConfig,
            "train": TrainSection,
        }
        parts: dict[str, Any] = {}
        for name, kind in kinds.items():
            sec = dict(d.get(name, {}))
            _check_keys(kind, sec, name)
            if name == "model" and "moe" in sec:
                from .model import MoESettings

                _check_keys(MoESettings, sec["moe"], "model.moe")
            parts[name] = kind(**sec)
        return cls(**parts)


def _check_keys(kind: Any, sec: dict[str, Any], where: str) -> None:
    bad = set(sec) - {f.name for f in fields(kind)}
    if bad:
        raise ValueError(f"unknown key(s) in [{where}]: {sorted(bad)}")


def load_config(path: Path) -> TrainConfig:
    """Read a TOML config and resolve ``data.path`` (and a ``data.bpe_encoding`` rank
    file) to an absolute path."""
    path = Path(path)
    with path.open("rb") as f:
        cfg = TrainConfig.from_dict(tomllib.load(f))

    def resolve(name: str) -> str:
        p = Path(name).expanduser()
        if not p.is_absolute():
            cands = [Path.cwd() / p, path.parent / p]
            p = next((c for c in cands if c.exists()), cands[0])
        return str(p.resolve())

    if cfg.data.path:
        cfg.data.path = resolve(cfg.data.path)
    if is_rank_file(cfg.data.bpe_encoding):
        cfg.data.bpe_encoding = resolve(cfg.data.bpe_encoding)
    return cfg


def lr_at(step: int, o: OptimConfig, max_steps: int) -> float:
    """LR of optimizer step ``step`` (0-based): linear warmup, cosine decay, then flat."""
    decay = o.decay_steps or max_steps
    if step < o.warmup_steps:
        return o.lr * (step + 1) / o.warmup_steps
    if step >= decay:
        return o.min_lr
    ratio = (step - o.warmup_steps) / max(1, decay - o.warmup_steps)
    return o.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (o.lr - o.min_lr)


def make_optimizer(model: torch.nn.Module, o: OptimConfig) -> torch.optim.AdamW:
    """AdamW; weight decay only on matrices (and expert stacks), not on biases and norms."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    return torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": o.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=o.lr,
        betas=(o.beta1, o.beta2),
        eps=o.eps,
    )


class NonFiniteLossError(RuntimeError):
    """Training stopped on a NaN/Inf loss or gradient; ``step`` is the failing step
    (1-based) and ``checkpoint_step`` that of the checkpoint left on disk (or ``None``)."""

    def __init__(self, message: str, step: int, checkpoint_step: int | None) -> None:
        super().__init__(message)
        self.step = step
        self.checkpoint_step = checkpoint_step


@dataclass
class TrainResult:
    step: int
    val_loss: float | None
    checkpoint: Path
    metrics: Path


@dataclass
class _Window:
    """Sums since the last metrics record (checkpointed, so resumed logs are identical)."""

    steps: int = 0
    loss: float = 0.0
    aux: float = 0.0
    tokens: int = 0
    seconds: float = 0.0
    loads: list[list[float]] = field(default_factory=list)

    def add_loads(self, loads: list[Tensor]) -> None:
        vals = [t.float().tolist() for t in loads]
        if not self.loads:
            self.loads = vals
        else:
            pairs = zip(self.loads, vals, strict=True)
            self.loads = [[a + b for a, b in zip(x, y, strict=True)] for x, y in pairs]

    def fractions(self) -> list[list[float]]:
        return [[v / s if (s := sum(row)) > 0 else 0.0 for v in row] for row in self.loads]


ProgressFn = Callable[[int, int, dict[str, Any]], None]


@torch.no_grad()
def evaluate(model: GPT, batches: list[tuple[Tensor, Tensor]]) -> float:
    """Mean cross-entropy over fixed batches, in eval mode (no dropout)."""
    was = model.training
    model.eval()
    try:
        losses = [float(model(x, y).loss) for x, y in batches]
    finally:
        model.train(was)
    return sum(losses) / len(losses)


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop records written after the checkpoint we resume from."""
    if not path.exists():
        return
    keep = [ln for ln in path.read_text().splitlines() if ln and json.loads(ln)["step"] <= step]
    path.write_text("".join(ln + "\n" for ln in keep))


def train(
    cfg: TrainConfig,
    out_dir: Path | None = None,
    *,
    resume: bool = False,
    stop_at: int | None = None,
    progress: ProgressFn | None = None,
) -> TrainResult:
    """Train (or resume) a run in ``out_dir`` (default ``cfg.train.out_dir``).

    ``stop_at`` ends the run early at that step *without* changing the LR schedule (which
    follows ``train.max_steps``), so a run stopped early and resumed equals an
    uninterrupted one. On resume the config saved in the checkpoint is used; ``cfg`` only
    supplies ``train.max_steps`` (to extend a run) and ``train.threads`` (bit-for-bit
    equality assumes the same thread count: it can change float summation order).
    Raises :class:`NonFiniteLossError` on a NaN/Inf loss or gradient norm, leaving the
    last good checkpoint untouched.
    """
    out = Path(out_dir or cfg.train.out_dir)
    ckpt_dir = out / CHECKPOINT_DIR
    saved: dict[str, Any] | None = None
    if resume:
        ckpt = find_checkpoint(out)
        saved = read_state(ckpt)
        max_steps, threads = cfg.train.max_steps, cfg.train.threads
        cfg = TrainConfig.from_dict(saved["config"])
        cfg.train.max_steps, cfg.train.threads = max_steps, threads
    else:
        if (ckpt_dir / "state.json").exists():
            raise FileExistsError(
                f"{out} already holds a checkpoint: pass --resume or another --out"
            )
        cfg = TrainConfig.from_dict(cfg.to_dict())  # a private copy we may complete
    threads = torch.get_num_threads()
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    try:
        return _train(cfg, out, saved, stop_at, progress)
    finally:
        torch.set_num_threads(threads)  # do not leak the setting into the caller


class _Comm:
    """Data parallelism over ``torch.distributed`` (torchrun; gloo on CPU, NCCL on CUDA):
    ranks draw different batches and average gradients with one all-reduce per step. With
    one process every method is a no-op, so single-process runs are unaffected.

    ``device`` is where this rank trains; collectives run on ``self.cdev`` (the GPU for
    NCCL, the CPU for gloo), host-side tensors are moved there and back."""

    def __init__(self, device: str = "cpu") -> None:
        self.owned = False
        if device not in ("cpu", "cuda"):
            raise ValueError(f"train.device must be 'cpu' or 'cuda', not {device!r}")
        if device == "cuda" and not torch.cuda.is_available():
            raise ValueError("train.device = 'cuda' but CUDA is not available")
        world = int(os.environ.get("WORLD_SIZE", "1"))
        self.device = torch.device("cpu")
        if device == "cuda":
            local = int(os.environ.get("LOCAL_RANK", "0"))
            torch.cuda.set_device(local)
            self.device = torch.device("cuda", local)
        if world > 1 and dist.is_available() and not dist.is_initialized():
            dist.init_process_group("nccl" if device == "cuda" else "gloo")
            self.owned = True
        on = dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank() if on else 0
        self.world = dist.get_world_size() if on else 1
        self.group = dist.group.WORLD if self.world > 1 else None
        nccl = on and dist.get_backend() == "nccl"
        self.cdev = self.device if nccl else torch.device("cpu")

    def any_true(self, flag: bool) -> bool:
        if self.world == 1:
            return flag
        t = torch.tensor([float(flag)], device=self.cdev)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def mean_grads(self, params: list[torch.nn.Parameter]) -> None:
        """Average gradients over ranks (an expert no local token chose has ``None``)."""
        if self.world == 1:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat /= self.world
        for p, chunk in zip(params, flat.split([p.numel() for p in params]), strict=True):
            p.grad = chunk.view_as(p).clone()

    def sum_(self, t: Tensor) -> Tensor:
        if self.world > 1:
            if t.device == self.cdev:
                dist.all_reduce(t)
            else:
                c = t.to(self.cdev)
                dist.all_reduce(c)
                t = c.to(t.device)
        return t

    def gather_states(self, state: Tensor) -> list[list[int]]:
        """Every rank's RNG state (fixed-size uint8 tensors), without pickling."""
        if self.world == 1:
            return [state.tolist()]
        state = state.to(self.cdev)
        out = [torch.empty_like(state) for _ in range(self.world)]
        dist.all_gather(out, state)
        return [o.tolist() for o in out]

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def close(self) -> None:
        if self.owned:
            dist.destroy_process_group()


def _train(
    cfg: TrainConfig,
    out: Path,
    saved: dict[str, Any] | None,
    stop_at: int | None,
    progress: ProgressFn | None,
) -> TrainResult:
    comm = _Comm(cfg.train.device)
    try:
        return _loop(cfg, out, saved, stop_at, progress, comm)
    finally:
        comm.close()


def _loop(
    cfg: TrainConfig,
    out: Path,
    saved: dict[str, Any] | None,
    stop_at: int | None,
    progress: ProgressFn | None,
    comm: _Comm,
) -> TrainResult:
    t = cfg.train
    ckpt_dir = out / CHECKPOINT_DIR
    metrics_path = out / METRICS_FILE
    stop = t.max_steps if stop_at is None else min(stop_at, t.max_steps)
    lead = comm.rank == 0  # the rank that evaluates and writes files

    torch.manual_seed(t.seed)  # same initial weights on every rank
    if saved is not None:
        tok = tokenizer_from_json(saved["tokenizer"])
        data = TextData(Path(cfg.data.path), tok, cfg.data.val_fraction)
    else:
        data = TextData(
            Path(cfg.data.path), cfg.data.tokenizer, cfg.data.val_fraction, cfg.data.bpe_encoding
        )
        cfg.model = replace(cfg.model, vocab_size=data.tokenizer.vocab_size)
    mcfg = cfg.model
    model = GPT(mcfg)
    counts = model.param_counts()  # of the full model, also under expert parallelism
    ep = t.expert_parallel and comm.world > 1
    expert_names: list[str] = []
    if ep:  # same full init on every rank, then keep this rank's slice of the experts
        full = model.state_dict()
        model = GPT(mcfg, ep_group=comm.group)
        model.load_state_dict(shard_expert_state_dict(full, comm.rank, comm.world))
        expert_names = expert_param_names(model)
    cuda = comm.device.type == "cuda"
    if cuda:  # initialised on the CPU above, so a seed gives the same weights everywhere
        model.to(comm.device)
    if comm.world > 1:
        torch.manual_seed(t.seed + 7919 * comm.rank)  # different dropout per rank
    opt = make_optimizer(model, cfg.optim)
    sampler = BatchSampler(data.train, mcfg.block_size, t.batch_size, t.seed + comm.rank)
    val_batches = BatchSampler(data.val, mcfg.block_size, t.batch_size, t.seed).eval_batches(
        t.eval_iters, seed=t.seed + 1
    )
    if cuda:
        val_batches = [(x.to(comm.device), y.to(comm.device)) for x, y in val_batches]
    start = 0
    win = _Window()
    last_val: float | None = None
    ckpt_step: int | None = None
    if saved is not None:
        if len(saved["rng"]) != comm.world:
            raise ValueError(
                f"the checkpoint was written by {len(saved['rng'])} process(es); "
                f"resume it with the same number, not {comm.world}"
            )
        ckpt = find_checkpoint(out)
        if ep:
            weights = load_file(str(ckpt / MODEL_FILE))
            model.load_state_dict(shard_expert_state_dict(weights, comm.rank, comm.world))
            osd = shard_optimizer_state(
                read_optimizer_state(ckpt, saved), optimizer_param_names(opt, model),
                expert_names, comm.rank, comm.world,
            )  # fmt: skip
            opt.load_state_dict(osd)
        else:
            load_model_weights(ckpt, model)
            load_optimizer_state(ckpt, opt, saved)
        mine = saved["rng"][comm.rank]
        sampler.set_state(mine["data"])
        torch.set_rng_state(torch.tensor(mine["torch"], dtype=torch.uint8))
        if cuda and "cuda" in mine:  # dropout on the GPU draws from the CUDA generator
            torch.cuda.set_rng_state(torch.tensor(mine["cuda"], dtype=torch.uint8))
        start = ckpt_step = int(saved["step"])
        win = _Window(**saved["window"])
        last_val = saved.get("val_loss")
        if lead:
            _truncate_metrics(metrics_path, start)
    if lead:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
    model.train()

    def save(step: int) -> None:
        torch_states = comm.gather_states(torch.get_rng_state())
        data_states = comm.gather_states(sampler.generator.get_state())
        cuda_states = comm.gather_states(torch.cuda.get_rng_state()) if cuda else None
        model_sd: Any = model
        opt_sd: Any = opt
        if ep:  # every rank takes part in the gathers; rank 0 writes the full layout
            model_sd = gather_model_state(model, expert_names, comm.group)
            opt_sd = gather_optimizer_state(
                opt.state_dict(), optimizer_param_names(opt, model), expert_names, comm.group
            )
        if lead:
            rng: list[dict[str, Any]] = [
                {"torch": a, "data": b} for a, b in zip(torch_states, data_states, strict=True)
            ]
            if cuda_states is not None:
                for r, c in zip(rng, cuda_states, strict=True):
                    r["cuda"] = c
            state = {
                "step": step,
                "config": cfg.to_dict(),
                "tokenizer": data.tokenizer.to_json(),
                "rng": rng,
                "window": asdict(win),
                "val_loss": last_val,
                "param_counts": asdict(counts),
            }
            save_checkpoint(ckpt_dir, model_sd, opt_sd, state, data.tokenizer.to_json())
        comm.barrier()

    def fail(step: int, what: str) -> NonFiniteLossError:
        kept = (
            f"the last good checkpoint (step {ckpt_step}) is kept in {ckpt_dir}"
            if ckpt_step is not None
            else "no checkpoint had been written yet"
        )
        return NonFiniteLossError(
            f"non-finite {what} at step {step}; training stopped and {kept}", step, ckpt_step
        )

    tokens_per_step = t.batch_size * t.grad_accum * mcfg.block_size * comm.world
    params = [p for p in model.parameters() if p.requires_grad]
    named = dict(model.named_parameters())
    expert_params = [named[n] for n in expert_names]
    dense_params = [p for p in params if all(p is not e for e in expert_params)]
    with metrics_path.open("a") if lead else open(os.devnull, "w") as log:
        for step in range(start, stop):
            s = step + 1
            t0 = time.perf_counter()
            lr = lr_at(step, cfg.optim, t.max_steps)
            for g in opt.param_groups:
                g["lr"] = lr
            opt.zero_grad(set_to_none=True)
            sums = torch.zeros(2, dtype=torch.float64)  # loss, aux (this rank)
            loads: list[Tensor] = []
            for _ in range(t.grad_accum):
                x, y = sampler.next()
                if cuda:
                    x, y = (
                        x.to(comm.device, non_blocking=True),
                        y.to(comm.device, non_blocking=True),
                    )
                res = model(x, y)
                assert res.loss is not None
                loss_v, aux_v = res.loss.item(), res.aux_loss.item()
                if comm.any_true(not (math.isfinite(loss_v) and math.isfinite(aux_v))):
                    raise fail(s, f"loss (loss={loss_v}, aux={aux_v} on rank {comm.rank})")
                ((res.loss + res.aux_loss) / t.grad_accum).backward()
                sums += torch.tensor([loss_v, aux_v], dtype=torch.float64) / t.grad_accum
                mb = [st.routed_per_expert.float() for st in res.stats]
                loads = mb if not loads else [a + b for a, b in zip(loads, mb, strict=True)]
            max_norm = cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else math.inf
            if ep:
                sync_grads(dense_params, expert_params, comm, comm.world)
                gnorm = clip_global_grad_norm(dense_params, expert_params, max_norm, comm.group)
            else:
                comm.mean_grads(params)
                gnorm = float(torch.nn.utils.clip_grad_norm_(params, max_norm))
            if not math.isfinite(gnorm):
                raise fail(s, f"gradient norm ({gnorm})")
            opt.step()
            update_bias_balancers(model, group=comm.group)
            loss_sum, aux_sum = (comm.sum_(sums) / comm.world).tolist()
            if loads:
                loads = list(comm.sum_(torch.stack(loads)).unbind(0))
            win.steps += 1
            win.loss += loss_sum
            win.aux += aux_sum
            win.tokens += tokens_per_step
            win.add_loads(loads)
            win.seconds += time.perf_counter() - t0

            evaluated = s % t.eval_interval == 0 or s == t.max_steps
            if evaluated and (lead or ep):  # under EP all ranks run the (same) forward
                last_val = evaluate(model, val_batches)
            if s % t.log_interval == 0 or evaluated or s == stop:
                rec: dict[str, Any] = {
                    "step": s,
                    "train_loss": win.loss / win.steps,
                    "aux_loss": win.aux / win.steps,
                    "lr": lr,
                    "grad_norm": gnorm,
                    "tokens_per_s": win.tokens / max(win.seconds, 1e-9),
                    "tokens": s * tokens_per_step,
                    "expert_load": win.fractions(),
                }
                if evaluated and lead:
                    rec["val_loss"] = last_val
                log.write(json.dumps(rec) + "\n")
                log.flush()
                win = _Window()
                if progress is not None and lead:
                    progress(s, stop, rec)
            if s % t.ckpt_interval == 0 or s == stop:
                save(s)
                ckpt_step = s
    return TrainResult(step=stop, val_loss=last_val, checkpoint=ckpt_dir, metrics=metrics_path)


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """The metrics records of a run, in order."""
    path = Path(run_dir) / METRICS_FILE
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]


def load_for_inference(path: Path) -> tuple[GPT, Any]:
    """``(model in eval mode, tokenizer)`` from a checkpoint or run directory."""
    ckpt = find_checkpoint(path)
    state = read_state(ckpt)
    cfg = TrainConfig.from_dict(state["config"])
    model = GPT(cfg.model)
    load_model_weights(ckpt, model)
    model.eval()
    return model, tokenizer_from_json(state["tokenizer"])
