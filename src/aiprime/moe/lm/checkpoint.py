"""Checkpoints as safetensors + JSON only (no pickle, so loading one cannot run code).

A checkpoint is a directory::

    model.safetensors      model state dict
    optimizer.safetensors  optimizer per-parameter tensors, keyed ``state/<param>/<name>``
    state.json             step, configs, optimizer param groups, RNG states, log counters
    tokenizer.json         the tokenizer, so ``generate`` needs nothing else

It is written to ``<name>.tmp`` and swapped in with renames, so a crash while saving
leaves the previous checkpoint intact.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

FORMAT_VERSION = 1
MODEL_FILE = "model.safetensors"
OPTIM_FILE = "optimizer.safetensors"
STATE_FILE = "state.json"
TOKENIZER_FILE = "tokenizer.json"


def flatten_optimizer_state(sd: dict[str, Any]) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Split ``optimizer.state_dict()`` into safetensors-ready tensors and a JSON part."""
    tensors: dict[str, Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for pid, st in sd["state"].items():
        for name, value in st.items():
            if isinstance(value, Tensor):
                tensors[f"state/{pid}/{name}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(pid), {})[name] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def unflatten_optimizer_state(tensors: dict[str, Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    """Inverse of :func:`flatten_optimizer_state`."""
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        _, pid, name = key.split("/", 2)
        state.setdefault(int(pid), {})[name] = value
    for pid, st in meta.get("scalars", {}).items():
        state.setdefault(int(pid), {}).update(st)
    return {"state": state, "param_groups": meta["param_groups"]}


def _tensors(module: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}


def save_checkpoint(
    path: Path,
    model: nn.Module | dict[str, Tensor],
    optimizer: torch.optim.Optimizer | dict[str, Any] | None,
    state: dict[str, Any],
    tokenizer: dict[str, Any],
) -> None:
    """Write a checkpoint directory atomically (see the module docstring). ``model`` and
    ``optimizer`` may be given as state dicts (expert parallelism saves gathered ones)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    old = path.with_name(path.name + ".old")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    weights = (
        _tensors(model)
        if isinstance(model, nn.Module)
        else {k: v.detach().cpu().contiguous() for k, v in model.items()}
    )
    save_file(weights, str(tmp / MODEL_FILE), metadata={"format": "pt"})
    state = {"format_version": FORMAT_VERSION, **state}
    if optimizer is not None:
        sd = optimizer if isinstance(optimizer, dict) else optimizer.state_dict()
        tensors, meta = flatten_optimizer_state(sd)
        save_file(tensors, str(tmp / OPTIM_FILE), metadata={"format": "pt"})
        state["optimizer"] = meta
    (tmp / STATE_FILE).write_text(json.dumps(state) + "\n")
    (tmp / TOKENIZER_FILE).write_text(json.dumps(tokenizer, ensure_ascii=False) + "\n")
    shutil.rmtree(old, ignore_errors=True)
    if path.exists():
        path.rename(old)
    tmp.rename(path)
    shutil.rmtree(old, ignore_errors=True)


def find_checkpoint(path: Path) -> Path:
    """Accept a checkpoint directory or a run directory holding ``checkpoint/``; falls back
    to ``checkpoint.old`` if a save was interrupted between its two renames."""
    path = Path(path)
    for cand in (path, path / "checkpoint", path / "checkpoint.old"):
        if (cand / STATE_FILE).is_file() and (cand / MODEL_FILE).is_file():
            return cand
    raise FileNotFoundError(f"no checkpoint (state.json + model.safetensors) in {path}")


def read_state(path: Path) -> dict[str, Any]:
    """The JSON part of a checkpoint."""
    state: dict[str, Any] = json.loads((Path(path) / STATE_FILE).read_text())
    if state.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"unsupported checkpoint format {state.get('format_version')!r}")
    return state


def load_model_weights(path: Path, model: nn.Module) -> None:
    """Load ``model.safetensors`` strictly (every key must match)."""
    model.load_state_dict(load_file(str(Path(path) / MODEL_FILE)), strict=True)


def read_optimizer_state(path: Path, state: dict[str, Any]) -> dict[str, Any]:
    """The optimizer state dict saved next to ``state`` (from :func:`read_state`)."""
    tensors = load_file(str(Path(path) / OPTIM_FILE))
    return unflatten_optimizer_state(tensors, state["optimizer"])


def load_optimizer_state(
    path: Path, optimizer: torch.optim.Optimizer, state: dict[str, Any]
) -> None:
    """Restore the optimizer saved next to ``state`` (from :func:`read_state`)."""
    optimizer.load_state_dict(read_optimizer_state(path, state))
