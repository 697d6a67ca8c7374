"""Time a dense SwiGLU FFN, aiprime's MoELayer and HF transformers' MixtralSparseMoeBlock.

    python benchmarks/moe_bench.py --out moe_bench.json [--reps 10] [--quick]

All three run in one process, interleaved per repetition (the order rotates), after a
warm-up; the reported time is the median. The dense FFN has the same active FLOPs as the
MoE (hidden size ``top_k * d_ff``). HF uses ``experts_implementation="grouped_mm"`` and
the very same weights as aiprime (the outputs are compared). Peak memory: on CUDA the
``max_memory_allocated`` increase; on CPU the peak-RSS increase (``VmHWM`` after resetting
it through ``/proc/self/clear_refs``) of one forward+backward in a fresh child process per
implementation, parameter gradients included.

``OMP_WAIT_POLICY=PASSIVE`` is set unless ``--omp-active`` is given: on a CPU shared with
other work, spinning OpenMP workers make per-expert kernels (grouped_mm, for aiprime and HF
alike) 10x slower and the figures meaningless.
"""

from __future__ import annotations

import os
import sys

if "--omp-active" not in sys.argv:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import datetime
import gc
import json
import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from aiprime.moe import DenseFFN, MoEConfig, MoELayer

SHAPES: dict[str, dict[str, int]] = {
    "mixtral_e8_top2": dict(tokens=4096, d=512, f=2048, E=8, k=2),
    "fine_e64_top8": dict(tokens=4096, d=512, f=256, E=64, k=8),
}
IMPLS = ("dense", "aiprime", "hf")


def build(shape: dict[str, int], dtype: torch.dtype, device: torch.device) -> dict[str, nn.Module]:
    """The three modules, HF sharing aiprime's weights."""
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    d, f, n_exp, k = shape["d"], shape["f"], shape["E"], shape["k"]
    torch.manual_seed(0)
    moe = MoELayer(MoEConfig(d_model=d, d_ff=f, n_experts=n_exp, top_k=k))
    hf_cfg = MixtralConfig(
        hidden_size=d,
        intermediate_size=f,
        num_local_experts=n_exp,
        num_experts_per_tok=k,
        router_jitter_noise=0.0,
        experts_implementation="grouped_mm",
    )
    hf = MixtralSparseMoeBlock(hf_cfg)
    assert hf.experts.config._experts_implementation == "grouped_mm"
    with torch.no_grad():
        hf.gate.weight.copy_(moe.router.gate.weight)
        hf.experts.gate_up_proj.copy_(moe.experts.w_in.transpose(1, 2))
        hf.experts.down_proj.copy_(moe.experts.w_out.transpose(1, 2))
    dense = DenseFFN(d, k * f)
    return {
        name: m.to(device=device, dtype=dtype).train()
        for name, m in (("dense", dense), ("aiprime", moe), ("hf", hf))
    }


def step_fns(
    mods: dict[str, nn.Module], x: Tensor, grad: Tensor
) -> dict[str, tuple[Callable[[], None], Callable[[], None]]]:
    """(forward, forward+backward) closures per implementation."""
    x3 = x.view(1, *x.shape)

    def run(name: str) -> tuple[Tensor, Tensor | None]:
        m = mods[name]
        if name == "aiprime":
            y, st = m(x)
            return y, st.aux_loss
        if name == "hf":
            return m(x3).view_as(x), None
        return m(x), None

    def make(name: str) -> tuple[Callable[[], None], Callable[[], None]]:
        def fwd() -> None:
            with torch.no_grad():
                run(name)

        def fwd_bwd() -> None:
            y, aux = run(name)
            outs, grads = [y], [grad]
            if aux is not None:  # aiprime also back-propagates its balance/z losses
                outs.append(aux)
                grads.append(torch.ones_like(aux))
            torch.autograd.backward(outs, grads)

        return fwd, fwd_bwd

    return {name: make(name) for name in mods}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def clear_grads(mods: dict[str, nn.Module], x: Tensor) -> None:
    for m in mods.values():
        m.zero_grad(set_to_none=True)
    x.grad = None


def time_shape(
    shape: dict[str, int], dtype: torch.dtype, device: torch.device, reps: int, warmup: int
) -> dict[str, Any]:
    mods = build(shape, dtype, device)
    torch.manual_seed(1)
    x = torch.randn(shape["tokens"], shape["d"], device=device, dtype=dtype, requires_grad=True)
    grad = torch.randn(shape["tokens"], shape["d"], device=device, dtype=dtype)
    with torch.no_grad():
        y_ours, _ = mods["aiprime"](x)
        y_hf = mods["hf"](x.view(1, *x.shape)).view_as(x)
        max_diff = float((y_ours.float() - y_hf.float()).abs().max())
    fns = step_fns(mods, x, grad)
    times: dict[str, dict[str, list[float]]] = {n: {"fwd": [], "fwd_bwd": []} for n in IMPLS}
    cpu: dict[str, dict[str, list[float]]] = {n: {"fwd": [], "fwd_bwd": []} for n in IMPLS}
    for rep in range(warmup + reps):
        order = IMPLS[rep % 3 :] + IMPLS[: rep % 3]
        for kind, idx in (("fwd", 0), ("fwd_bwd", 1)):
            for name in order:
                clear_grads(mods, x)
                gc.collect()
                sync(device)
                t0, c0 = time.perf_counter(), time.process_time()
                fns[name][idx]()
                sync(device)
                if rep >= warmup:
                    times[name][kind].append(time.perf_counter() - t0)
                    cpu[name][kind].append(time.process_time() - c0)

    def summary(data: dict[str, dict[str, list[float]]], fn: Callable[[list[float]], float]) -> Any:
        return {
            n: {k: round(fn(v) * 1e3, 2) for k, v in kinds.items()} for n, kinds in data.items()
        }

    med = summary(times, statistics.median)
    out: dict[str, Any] = {
        "shape": shape,
        "median_ms": med,
        "min_ms": summary(times, min),
        "median_cpu_ms": summary(cpu, statistics.median),
        "max_abs_diff_aiprime_vs_hf": max_diff,
    }
    med_cpu = out["median_cpu_ms"]
    for ref in ("dense", "hf"):
        for kind in ("fwd", "fwd_bwd"):
            out[f"ratio_vs_{ref}_{kind}"] = round(med["aiprime"][kind] / med[ref][kind], 3)
            if device.type == "cpu":  # process CPU time: robust when the machine is shared
                ratio = med_cpu["aiprime"][kind] / med_cpu[ref][kind]
                out[f"cpu_time_ratio_vs_{ref}_{kind}"] = round(ratio, 3)
    return out


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def measure_memory_child(
    shape_name: str, impl: str, dtype: torch.dtype, device: torch.device
) -> float:
    """Peak memory increase (MiB) of one forward+backward of ``impl``."""
    shape = SHAPES[shape_name] if shape_name in SHAPES else json.loads(shape_name)
    mods = build(shape, dtype, device)
    mods = {impl: mods[impl]}
    x = torch.randn(shape["tokens"], shape["d"], device=device, dtype=dtype, requires_grad=True)
    grad = torch.randn_like(x)
    _, fwd_bwd = step_fns(mods, x, grad)[impl]
    fwd_bwd()  # warm-up: thread pools, lazy init
    clear_grads(mods, x)
    if impl == "aiprime":
        # buffers kept across steps must count: let the measured step allocate them afresh
        ws = mods[impl].experts.cpu_workspace()  # type: ignore[operator]
        if ws is not None:
            ws.clear()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fwd_bwd()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    with open("/proc/self/clear_refs", "w") as fh:  # resets VmHWM to the current RSS
        fh.write("5")
    base = _status_kib("VmRSS")
    fwd_bwd()
    return (_status_kib("VmHWM") - base) / 1024


def measure_memory(
    shape: dict[str, int], impl: str, args: argparse.Namespace, device: torch.device
) -> float | None:
    if device.type == "cuda":
        return measure_memory_child(json.dumps(shape), impl, DTYPES[args.dtype], device)
    cmd = [
        sys.executable, __file__, "--mem-child", json.dumps(shape), impl,
        "--dtype", args.dtype, "--threads", str(args.threads), "--out", os.devnull,
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1200)
    if proc.returncode != 0:
        print(proc.stderr[-2000:], file=sys.stderr)
        return None
    return float(proc.stdout.strip().splitlines()[-1])


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip() + f" ({os.cpu_count()} logical CPUs)"
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", required=True, help="JSON file to write")
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="1024 tokens, 3 reps, no memory")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    p.add_argument("--shapes", nargs="*", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument("--no-memory", action="store_true")
    p.add_argument("--omp-active", action="store_true", help="keep OpenMP's default spin-wait")
    p.add_argument("--mem-child", nargs=2, metavar=("SHAPE", "IMPL"), help=argparse.SUPPRESS)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = DTYPES[args.dtype]
    if args.mem_child:
        print(measure_memory_child(args.mem_child[0], args.mem_child[1], dtype, device))
        return
    reps, memory = (3, False) if args.quick else (args.reps, not args.no_memory)

    import transformers

    result: dict[str, Any] = {
        "command": "python " + " ".join(sys.argv),
        "date": datetime.date.today().isoformat(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "device": torch.cuda.get_device_name() if device.type == "cuda" else cpu_name(),
        "cpu_threads": torch.get_num_threads(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "default"),
        "load_average_at_start": os.getloadavg()[0],
        "dtype": args.dtype,
        "reps": reps,
        "warmup": args.warmup,
        "time": "median wall-clock ms over reps, implementations interleaved; "
        "median_cpu_ms is process CPU time (user+sys, all threads) of the same runs",
        "peak_memory": "CUDA max_memory_allocated increase"
        if device.type == "cuda"
        else "CPU peak RSS increase (VmHWM) of one fwd+bwd in a fresh process",
        "shapes": {},
    }
    for name in args.shapes:
        shape = dict(SHAPES[name])
        if args.quick:
            shape["tokens"] = 1024
        print(f"[{name}] {shape}", flush=True)
        res = time_shape(shape, dtype, device, reps, args.warmup)
        if memory:
            res["peak_memory_mib"] = {i: measure_memory(shape, i, args, device) for i in IMPLS}
        result["shapes"][name] = res
        for impl in IMPLS:
            m = res["median_ms"][impl]
            print(
                f"  {impl:8s} fwd {m['fwd']:8.1f} ms   fwd+bwd {m['fwd_bwd']:8.1f} ms", flush=True
            )
        if "cpu_time_ratio_vs_dense_fwd_bwd" in res:
            print(
                f"  cpu-time ratios: vs dense {res['cpu_time_ratio_vs_dense_fwd_bwd']:.3f}  "
                f"vs hf {res['cpu_time_ratio_vs_hf_fwd_bwd']:.3f}",
                flush=True,
            )
        print(
            f"  ratio_vs_dense_fwd_bwd {res['ratio_vs_dense_fwd_bwd']:.3f}  "
            f"ratio_vs_hf_fwd_bwd {res['ratio_vs_hf_fwd_bwd']:.3f}  "
            f"max|aiprime-hf| {res['max_abs_diff_aiprime_vs_hf']:.2e}",
            flush=True,
        )
    result["load_average_at_end"] = os.getloadavg()[0]
    with open(args.out, "w") as fh:
        json.dump(result, fh, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
