"""WiSE-FT (Wortsman et al., 2022): interpolate a model's weights before and after
fine-tuning, ``theta = (1 - alpha) * theta_0 + alpha * theta_1``.

Fine-tuning a pretrained tower on a narrow dataset raises in-domain accuracy and can cost
what the pretrained weights knew; the interpolated model often keeps most of both, at no
inference cost. Both models must share one architecture (the same saved config apart from
which layers were locked), which holds when the fine-tuned run started from the other
(``init_from``). Choose alpha on a validation split, never on the test split.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from aiprime.multimodal.model import CONFIG_FILE, MODEL_FILE, ModelConfig, read_meta

# Settings that change the architecture; locking and loss options do not.
_ARCH_KEYS = (
    "clip_model",
    "text_model",
    "image_model",
    "image_size",
    "embed_dim",
    "cnn_width",
    "cnn_blocks",
    "text_head",
)


def interpolate_state(
    sd0: dict[str, torch.Tensor], sd1: dict[str, torch.Tensor], alpha: float
) -> dict[str, torch.Tensor]:
    """Float tensors are interpolated; integer buffers (BatchNorm's step counter) are
    taken from the fine-tuned model."""
    if set(sd0) != set(sd1):
        missing = sorted(set(sd0) ^ set(sd1))[:5]
        raise ValueError(f"the two models have different weights (e.g. {missing})")
    out: dict[str, torch.Tensor] = {}
    for k, v0 in sd0.items():
        v1 = sd1[k]
        if v0.shape != v1.shape:
            raise ValueError(f"{k}: shapes differ ({tuple(v0.shape)} vs {tuple(v1.shape)})")
        if v0.is_floating_point():
            out[k] = ((1 - alpha) * v0.float() + alpha * v1.float()).to(v0.dtype).contiguous()
        else:
            out[k] = v1.clone().contiguous()
    return out


def wise_ft(zero_shot: Path, fine_tuned: Path, alpha: float, out: Path) -> Path:
    """Write the interpolated model to ``out`` (a full model directory, loadable by
    ``load_model``; its configs and tokenizer are the fine-tuned model's)."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha {alpha}: must be within [0, 1]")
    m0, m1 = read_meta(zero_shot), read_meta(fine_tuned)
    c0, c1 = ModelConfig(**m0["model"]), ModelConfig(**m1["model"])
    for key in _ARCH_KEYS:
        if getattr(c0, key) != getattr(c1, key):
            raise ValueError(
                f"models differ in {key}: {getattr(c0, key)!r} vs {getattr(c1, key)!r}"
            )
    sd = interpolate_state(
        load_file(str(Path(zero_shot) / MODEL_FILE)),
        load_file(str(Path(fine_tuned) / MODEL_FILE)),
        alpha,
    )
    out = Path(out)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(fine_tuned, tmp)
    save_file(sd, str(tmp / MODEL_FILE), metadata={"format": "pt"})
    import json

    meta = dict(m1)
    meta["wise"] = {"zero_shot": str(zero_shot), "fine_tuned": str(fine_tuned), "alpha": alpha}
    (tmp / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out
