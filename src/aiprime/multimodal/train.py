"""``aiprime mm train``: contrastive fine-tuning of a dual encoder on image-text pairs.

CPU-first choices, each measured in docs/results.md:
* images are decoded and resized once into a uint8 safetensors cache; augmentation runs
  on those small tensors with kornia, so a step never touches a JPEG;
* with the text tower locked, its features for every caption and every text-augmentation
  variant are computed once (``features.TextFeatureCache``); a step then costs the image
  tower plus two small heads;
* pairs sharing a caption are never used as each other's negatives.
The run writes ``model/`` (safetensors + JSON, see ``model.save_model``), ``log.jsonl``
(one JSON object per logged step and per validation) and ``summary.json``.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, Field

from aiprime.multimodal.augment import (
    ImageAugConfig,
    TextAugConfig,
    TextAugmenter,
    build_image_aug,
    to_float,
)
from aiprime.multimodal.data import DataConfig, gallery, image_cache, load_pairs, split_pairs
from aiprime.multimodal.eval import evaluate_model
from aiprime.multimodal.features import TextFeatureCache
from aiprime.multimodal.model import DualEncoder, ModelConfig, SmallCNN, load_model, save_model


class OptimConfig(BaseModel):
    steps: int = Field(1000, ge=1)
    batch_size: int = Field(256, ge=2)
    lr: float = Field(2e-3, gt=0.0, description="Heads and a from-scratch image tower.")
    backbone_lr: float = Field(2e-5, gt=0.0, description="Unlocked pretrained layers.")
    weight_decay: float = Field(0.05, ge=0.0)
    warmup_steps: int = Field(50, ge=0)
    min_lr_ratio: float = Field(0.02, ge=0.0, le=1.0)


class TrainConfig(BaseModel):
    """One TOML file: ``[model]``, ``[data]``, ``[image_aug]``, ``[text_aug]``, ``[optim]``
    and the top-level keys below."""

    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    image_aug: ImageAugConfig = Field(default_factory=ImageAugConfig)
    text_aug: TextAugConfig = Field(default_factory=TextAugConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    seed: int = 0
    threads: int = Field(1, ge=0, description="torch threads; 0 leaves torch's default.")
    log_every: int = Field(20, ge=1)
    eval_every: int = Field(250, ge=0, description="Validation recall every N steps; 0 = end.")
    init_from: str | None = Field(None, description="Start from a saved model (stage 2).")

    @classmethod
    def from_toml(cls, path: Path, **overrides: Any) -> TrainConfig:
        import tomllib

        with Path(path).open("rb") as f:
            d = tomllib.load(f)
        for k, v in overrides.items():  # dotted keys: "optim.steps"
            cur = d
            parts = k.split(".")
            for p in parts[:-1]:
                cur = cur.setdefault(p, {})
            cur[parts[-1]] = v
        return cls(**d)


ProgressFn = Callable[[str, int, int | None], None]  # (task, advance, total)


def _backbone_id(model: DualEncoder) -> str:
    """Identifies the text backbone's exact weights, so cached features are reused only
    for the same weights (a stage-2 model with unlocked layers gets its own)."""
    h = hashlib.sha256(model.cfg.text_model.encode())
    h.update(str(model.cfg.text_max_length).encode())
    assert model.text_backbone is not None
    for k, v in model.text_backbone.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().float().contiguous().numpy().tobytes()[:4096])
        h.update(str(float(v.float().sum())).encode())
    return h.hexdigest()


def _param_groups(model: DualEncoder, cfg: OptimConfig) -> list[dict[str, Any]]:
    """Pretrained backbones get a small learning rate, new parts the large one; norms,
    biases and the temperature get no weight decay."""
    groups: dict[tuple[float, float], list[torch.nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        pretrained = name.startswith(("clip.", "text_backbone.")) or (
            name.startswith("image_backbone.") and model.cfg.image_model != "cnn"
        )
        lr = cfg.backbone_lr if pretrained else cfg.lr
        wd = 0.0 if p.ndim < 2 or name.startswith("logit_") else cfg.weight_decay
        groups.setdefault((lr, wd), []).append(p)
    return [
        {"params": ps, "lr": lr, "weight_decay": wd, "base_lr": lr}
        for (lr, wd), ps in groups.items()
    ]


def _lr_factor(step: int, cfg: OptimConfig) -> float:
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    t = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))


def train(
    cfg: TrainConfig,
    data_dir: Path,
    out_dir: Path,
    cache_dir: Path,
    progress: ProgressFn | None = None,
) -> dict[str, Any]:
    """Train and save; returns the summary (also written to ``out_dir/summary.json``)."""
    t_start = time.time()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    prog: ProgressFn = progress or (lambda task, n, total: None)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    log_path = out_dir / "log.jsonl"
    log_f = log_path.open("w")

    def log(rec: dict[str, Any]) -> None:
        log_f.write(json.dumps(rec) + "\n")
        log_f.flush()

    # -- data: every image decoded once, at the size the image tower sees
    all_pairs = load_pairs(data_dir, cfg.data)
    splits = split_pairs(all_pairs, cfg.data)
    train_pairs = splits["train"]
    val_gal = gallery(splits["val"], cfg.data.gallery_size)
    if len(train_pairs) < cfg.optim.batch_size:
        raise ValueError(
            f"{len(train_pairs)} training pairs is fewer than batch_size {cfg.optim.batch_size}"
        )
    if cfg.init_from:
        model = load_model(Path(cfg.init_from))
        # the saved model brings its architecture; locking/loss come from this config
        model = _relock(model, cfg.model)
    else:
        model = DualEncoder(cfg.model)
    model.train()
    size = model.image_size
    pairs = train_pairs + val_gal
    prog("decoding images", 0, len(pairs))
    pixels, kept, errors = image_cache(
        pairs, size, cache_dir, lambda n: prog("decoding images", n, None)
    )
    for e in errors:
        log({"skipped": str(e)})
    n_train = len(train_pairs)
    tr_idx = [k for k in kept if k < n_train]
    va_idx = [k for k in kept if k >= n_train]
    pos = {k: i for i, k in enumerate(kept)}
    tr_pix = pixels[[pos[k] for k in tr_idx]]
    va_pix = pixels[[pos[k] for k in va_idx]]
    tr_pairs = [train_pairs[k] for k in tr_idx]
    va_caps = [pairs[k].caption for k in va_idx]
    cap_ids: dict[str, int] = {}
    tr_cap = torch.tensor([cap_ids.setdefault(p.caption.lower(), len(cap_ids)) for p in tr_pairs])

    # -- text: cached features when the tower is locked, strings otherwise
    augmenter = TextAugmenter(cfg.text_aug)
    locked = model.cfg.text_locked
    feats: torch.Tensor | None = None
    variant_rows: list[list[int]] = []
    if locked:
        tcache = TextFeatureCache(cache_dir, _backbone_id(model))
        # variants are drawn with a fixed seed so every training seed shares the cache
        vrng = random.Random(1234)
        texts: list[str] = []
        for p in tr_pairs:
            vs = [p.caption, *augmenter.variants(p.caption, p.meta, vrng)]
            variant_rows.append(list(range(len(texts), len(texts) + len(vs))))
            texts.extend(vs)
        prog("text features", 0, len(texts))
        feats = tcache.get(model, texts, progress=lambda n: prog("text features", n, None))

    image_aug = build_image_aug(cfg.image_aug, size)
    opt = torch.optim.AdamW(_param_groups(model, cfg.optim), betas=(0.9, 0.98), eps=1e-6)
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log(
        {
            "event": "start",
            "train_pairs": len(tr_pairs),
            "val_gallery": len(va_caps),
            "trainable_params": n_params,
            "config": cfg.model_dump(mode="json"),
        }
    )

    def validate(step: int) -> dict[str, float]:
        was = model.training
        res = evaluate_model(model, va_pix, va_caps) if va_caps else {}
        model.train(was)
        log({"step": step, "val": res})
        return res

    bs = cfg.optim.batch_size
    order = torch.randperm(len(tr_pairs), generator=gen)
    cursor = 0
    prog("training", 0, cfg.optim.steps)
    t0, seen, last_val = time.time(), 0, {}
    for step in range(cfg.optim.steps):
        if cursor + bs > len(order):
            order, cursor = torch.randperm(len(tr_pairs), generator=gen), 0
        idx = order[cursor : cursor + bs]
        cursor += bs
        for g in opt.param_groups:
            g["lr"] = g["base_lr"] * _lr_factor(step, cfg.optim)
        with torch.no_grad():
            imgs = image_aug(to_float(tr_pix[idx]))
        img = model.encode_image(imgs)
        if locked:
            assert feats is not None
            rows = []
            for i in idx.tolist():
                vr = variant_rows[i]
                use_aug = cfg.text_aug.enabled and len(vr) > 1 and rng.random() < cfg.text_aug.p
                rows.append(rng.choice(vr[1:]) if use_aug else vr[0])
            txt = model.project_text(feats[rows])
        else:
            caps = [augmenter(tr_pairs[i].caption, tr_pairs[i].meta, rng) for i in idx.tolist()]
            txt = model.encode_text(caps)
        c = tr_cap[idx]
        loss = model.loss(img, txt, c[:, None] == c[None, :])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], 1.0)
        opt.step()
        seen += bs
        prog("training", 1, None)
        if (step + 1) % cfg.log_every == 0 or step == 0:
            dt = time.time() - t0
            log(
                {
                    "step": step + 1,
                    "loss": round(float(loss.detach()), 5),
                    "temperature": round(float(model.logit_scale.detach().exp().reciprocal()), 5),
                    "lr": opt.param_groups[0]["lr"],
                    "pairs_per_s": round(seen / max(dt, 1e-9), 1),
                }
            )
        if cfg.eval_every and (step + 1) % cfg.eval_every == 0 and step + 1 < cfg.optim.steps:
            last_val = validate(step + 1)
    last_val = validate(cfg.optim.steps)
    model.eval()
    summary = {
        "steps": cfg.optim.steps,
        "seed": cfg.seed,
        "val": last_val,
        "train_pairs": len(tr_pairs),
        "skipped_images": len(errors),
        "seconds": round(time.time() - t_start, 1),
    }
    save_model(
        model,
        out_dir / "model",
        extra={"data": cfg.data.model_dump(mode="json"), "train": summary},
    )
    (out_dir / "config.json").write_text(json.dumps(cfg.model_dump(mode="json"), indent=2) + "\n")
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    log({"event": "done", **summary})
    log_f.close()
    return summary


def _relock(model: DualEncoder, cfg: ModelConfig) -> DualEncoder:
    """Apply this run's locking, loss and test-time augmentation to a loaded model
    (architecture unchanged)."""
    from aiprime.multimodal.model import lock

    model.cfg = model.cfg.model_copy(
        update={
            "text_trainable_layers": cfg.text_trainable_layers,
            "image_trainable_layers": cfg.image_trainable_layers,
        }
    )
    if "flip_tta" in cfg.model_fields_set:
        model.cfg = model.cfg.model_copy(update={"flip_tta": cfg.flip_tta})
    if "image_size" in cfg.model_fields_set and isinstance(model.image_backbone, SmallCNN):
        # the CNN pools globally, so it can continue at another resolution (FixRes-style)
        model.image_size = cfg.image_size
        model.cfg = model.cfg.model_copy(update={"image_size": cfg.image_size})
    if model.text_backbone is not None:
        lock(model.text_backbone, cfg.text_trainable_layers)
    if model.clip is not None:
        lock(model.clip.text_model, cfg.text_trainable_layers)
        lock(model.clip.vision_model, cfg.image_trainable_layers)
    elif model.cfg.image_model != "cnn" and model.image_backbone is not None:
        lock(model.image_backbone, cfg.image_trainable_layers)
    return model
