"""Dual encoders: a text tower and an image tower projected into one space.

Two families, both loaded with real Hugging Face code from a local path or the HF cache:

* ``clip_model`` set: a CLIP or SigLIP checkpoint gives both towers and their projections.
* otherwise: a sentence-transformers text model (all-MiniLM-L6-v2 by default, mean
  pooling) with either the vision tower of a CLIP/SigLIP checkpoint (``image_model`` a path)
  or a small residual CNN trained from scratch (``image_model = "cnn"``) -- the case here,
  where no pretrained image weights exist.

Locking follows LiT / open_clip: a tower's backbone is frozen (``*_trainable_layers = 0``),
fully trained (``None``), or frozen except its last N transformer layers. Projection heads
and the temperature always train. A locked text tower's features do not change, so the
trainer computes them once (see ``train.py``); that is what makes CPU training feasible.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, Field
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

MODEL_FILE = "model.safetensors"
CONFIG_FILE = "mm_config.json"
FORMAT_VERSION = 1
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class ModelConfig(BaseModel):
    clip_model: str | None = Field(None, description="CLIP/SigLIP dir or HF-cache id: both towers.")
    text_model: str = Field("all-MiniLM-L6-v2", description="Text tower when clip_model is unset.")
    image_model: str = Field("cnn", description="'cnn', or a CLIP/SigLIP dir for its vision tower.")
    image_size: int = Field(64, ge=16, description="Input side for the CNN; CLIP uses its own.")
    embed_dim: int = Field(256, ge=8)
    cnn_width: int = Field(32, ge=4)
    cnn_blocks: int = Field(1, ge=1, description="Residual blocks per CNN stage.")
    text_head: Literal["linear", "mlp"] = "mlp"
    text_max_length: int = Field(32, ge=4)
    text_trainable_layers: int | None = Field(0, description="0 locked, N last N, None all.")
    image_trainable_layers: int | None = Field(None, description="For a pretrained image tower.")
    flip_tta: bool = Field(
        False,
        description="Embed images as the mean of the image and its mirror at inference "
        "(2x image compute; training is unchanged).",
    )
    loss: Literal["infonce", "siglip"] = "infonce"
    init_temperature: float = Field(0.07, gt=0.0)
    learn_temperature: bool = True

    @property
    def text_locked(self) -> bool:
        return self.clip_model is None and self.text_trainable_layers == 0


def _resolve(name: str) -> Path:
    from aiprime.embed.base import resolve_model_path

    p = Path(name).expanduser()
    if p.is_dir():
        return p.resolve()
    if "/" in name and not name.lower().startswith("sentence-transformers/"):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from huggingface_hub import snapshot_download

        try:
            return Path(snapshot_download(name, local_files_only=True))
        except Exception as e:
            raise FileNotFoundError(f"model {name!r}: not a directory nor in the HF cache") from e
    return resolve_model_path(name)


def _layers(module: nn.Module) -> nn.ModuleList | None:
    """The transformer block list of a HF backbone (BERT, CLIP, SigLIP, ViT)."""
    for path in ("encoder.layer", "encoder.layers", "layers", "h"):
        m: Any = module
        for part in path.split("."):
            m = getattr(m, part, None)
            if m is None:
                break
        if isinstance(m, nn.ModuleList):
            return m
    return None


def lock(backbone: nn.Module, trainable_layers: int | None) -> None:
    """LiT-style locking: freeze everything but the last ``trainable_layers`` blocks (and
    the norms after them); ``None`` trains all, ``0`` freezes all."""
    if trainable_layers is None:
        backbone.requires_grad_(True)
        return
    backbone.requires_grad_(False)
    if trainable_layers <= 0:
        return
    layers = _layers(backbone)
    if layers is None:
        raise ValueError(f"{type(backbone).__name__}: no layer list to unlock partially")
    for layer in list(layers)[-trainable_layers:]:
        layer.requires_grad_(True)
    for name, mod in backbone.named_modules():
        if name.endswith(("final_layer_norm", "post_layernorm", "pooler")):
            mod.requires_grad_(True)


class _Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.b1 = nn.BatchNorm2d(cout)
        self.c2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.b2 = nn.BatchNorm2d(cout)
        self.skip: nn.Module = (
            nn.Identity()
            if stride == 1 and cin == cout
            else nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
        )

    def forward(self, x: Tensor) -> Tensor:
        y = F.relu(self.b1(self.c1(x)), inplace=True)
        return F.relu(self.b2(self.c2(y)) + self.skip(x), inplace=True)


class SmallCNN(nn.Module):
    """A ResNet-style CNN for small images (stem /2, then 3 stages /2 each): cheap enough
    to train on a CPU from cached 64x64 images."""

    def __init__(self, width: int = 32, blocks: int = 1) -> None:
        super().__init__()
        w = width
        layers: list[nn.Module] = [
            nn.Conv2d(3, w, 3, 2, 1, bias=False),
            nn.BatchNorm2d(w),
            nn.ReLU(inplace=True),
        ]
        cin = w
        for mult in (2, 4, 8):
            for b in range(blocks):
                layers.append(_Block(cin, w * mult, 2 if b == 0 else 1))
                cin = w * mult
        self.features = nn.Sequential(*layers)
        self.out_dim = cin
        self.features.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        self.mean: Tensor
        self.std: Tensor
        self.register_buffer("mean", torch.tensor([0.5, 0.5, 0.5]).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor([0.25, 0.25, 0.25]).view(1, 3, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        # channels_last: oneDNN's fast CPU convolution path (about 30% faster measured)
        x = ((x - self.mean) / self.std).contiguous(memory_format=torch.channels_last)
        f = self.features(x)
        return torch.cat([f.mean((2, 3)), f.amax((2, 3))], 1)


def _pooled(out: Any) -> Tensor:
    """``get_*_features`` returns a tensor in some transformers versions and a
    ``BaseModelOutputWithPooling`` (projected ``pooler_output``) in others."""
    if isinstance(out, Tensor):
        return out
    return out.pooler_output


class DualEncoder(nn.Module):
    """``encode_text``/``encode_image`` return L2-normalised rows in the shared space."""

    def __init__(self, cfg: ModelConfig, _weights: bool = True, _dir: Path | None = None) -> None:
        """``_weights``: load pretrained backbones (training start); loading a saved model
        builds them empty from its saved configs (``_dir``) and fills them from safetensors."""
        super().__init__()
        from transformers import AutoConfig, AutoModel, AutoTokenizer

        self.cfg = cfg
        # Any: HF models expose config/get_*_features that nn.Module's stubs lack
        self.clip: Any = None
        self.text_backbone: Any = None
        self.image_backbone: Any = None
        self.pixel_mean = CLIP_MEAN
        self.pixel_std = CLIP_STD

        saved = Path(_dir) if _dir is not None else Path(".")

        def hf(name: str, sub: str) -> Any:
            if _weights:
                return AutoModel.from_pretrained(_resolve(name))
            return AutoModel.from_config(AutoConfig.from_pretrained(saved / sub))

        if cfg.clip_model:
            self.clip = hf(cfg.clip_model, "clip")
            src = _resolve(cfg.clip_model) if _weights else saved / "clip"
            self.tokenizer = AutoTokenizer.from_pretrained(src)
            self.image_size = int(self.clip.config.vision_config.image_size)
            self._read_pixel_stats(src)
            dim = (
                int(self.clip.config.projection_dim)
                if hasattr(self.clip.config, "projection_dim")
                else int(self.clip.config.text_config.hidden_size)
            )
            self.text_head: nn.Module = nn.Identity()
            self.image_head: nn.Module = nn.Identity()
            self.embed_dim = dim
            lock(self.clip.text_model, cfg.text_trainable_layers)
            lock(self.clip.vision_model, cfg.image_trainable_layers)
            for name, p in self.clip.named_parameters():
                if "projection" in name:
                    p.requires_grad_(True)
            init_scale = float(self.clip.logit_scale.detach())
        else:
            self.text_backbone = hf(cfg.text_model, "text")
            src = _resolve(cfg.text_model) if _weights else saved / "text"
            self.tokenizer = AutoTokenizer.from_pretrained(src)
            hid = int(self.text_backbone.config.hidden_size)
            lock(self.text_backbone, cfg.text_trainable_layers)
            self.embed_dim = cfg.embed_dim
            self.text_head = (
                nn.Linear(hid, cfg.embed_dim)
                if cfg.text_head == "linear"
                else nn.Sequential(nn.Linear(hid, hid), nn.GELU(), nn.Linear(hid, cfg.embed_dim))
            )
            if cfg.image_model == "cnn":
                self.image_backbone = SmallCNN(cfg.cnn_width, cfg.cnn_blocks)
                self.image_size = cfg.image_size
                img_dim = self.image_backbone.out_dim * 2
            else:
                full = hf(cfg.image_model, "image")
                vision = getattr(full, "vision_model", full)
                self.image_backbone = vision
                self.image_size = int(full.config.vision_config.image_size)
                self._read_pixel_stats(_resolve(cfg.image_model) if _weights else saved / "image")
                img_dim = int(full.config.vision_config.hidden_size)
                self._image_config = full.config
                lock(self.image_backbone, cfg.image_trainable_layers)
            self.image_head = nn.Sequential(
                nn.Linear(img_dim, img_dim), nn.GELU(), nn.Linear(img_dim, cfg.embed_dim)
            )
            init_scale = math.log(1.0 / cfg.init_temperature)
        if cfg.loss == "siglip" and not cfg.clip_model:
            init_scale = math.log(10.0)
        self.logit_scale = nn.Parameter(torch.tensor(init_scale), cfg.learn_temperature)
        self.logit_bias = nn.Parameter(torch.tensor(-10.0 if cfg.loss == "siglip" else 0.0))
        self.logit_bias.requires_grad_(cfg.loss == "siglip")
        if self.text_backbone is not None and cfg.text_locked:
            self.text_backbone.eval()

    def _read_pixel_stats(self, src: Path) -> None:
        pp = Path(src) / "preprocessor_config.json"
        if pp.is_file():
            d = json.loads(pp.read_text())
            self.pixel_mean = tuple(d.get("image_mean", CLIP_MEAN))
            self.pixel_std = tuple(d.get("image_std", CLIP_STD))

    def train(self, mode: bool = True) -> DualEncoder:
        super().train(mode)
        if self.text_backbone is not None and self.cfg.text_locked:
            self.text_backbone.eval()  # a locked tower never runs dropout
        return self

    # -- text ---------------------------------------------------------------------------
    def tokenize(self, texts: Sequence[str]) -> dict[str, Tensor]:
        enc = self.tokenizer(
            list(texts),
            padding=True,
            truncation=True,
            max_length=self.cfg.text_max_length,
            return_tensors="pt",
        )
        return {k: v for k, v in enc.items() if k in ("input_ids", "attention_mask")}

    def text_features(self, tokens: dict[str, Tensor]) -> Tensor:
        """Backbone output before the head: mean-pooled and L2-normalised for a
        sentence-transformers tower (as the model was trained); CLIP's projected output."""
        if self.clip is not None:
            return _pooled(self.clip.get_text_features(**tokens))
        assert self.text_backbone is not None
        out = self.text_backbone(**tokens).last_hidden_state
        m = tokens["attention_mask"].unsqueeze(-1).to(out.dtype)
        pooled = (out * m).sum(1) / m.sum(1).clamp_min(1e-6)
        return F.normalize(pooled, dim=-1)

    def project_text(self, features: Tensor) -> Tensor:
        return F.normalize(self.text_head(features), dim=-1)

    def encode_text(self, texts: Sequence[str]) -> Tensor:
        return self.project_text(self.text_features(self.tokenize(texts)))

    # -- images -------------------------------------------------------------------------
    def image_features(self, pixels: Tensor) -> Tensor:
        """``pixels``: float N x 3 x H x W in [0, 1]; resized to the tower's input size."""
        if pixels.shape[-1] != self.image_size or pixels.shape[-2] != self.image_size:
            pixels = F.interpolate(
                pixels, size=(self.image_size, self.image_size), mode="bilinear", antialias=True
            )
        if self.clip is not None or not isinstance(self.image_backbone, SmallCNN):
            mean = torch.tensor(self.pixel_mean, dtype=pixels.dtype).view(1, 3, 1, 1)
            std = torch.tensor(self.pixel_std, dtype=pixels.dtype).view(1, 3, 1, 1)
            pixels = (pixels - mean) / std
        if self.clip is not None:
            return _pooled(self.clip.get_image_features(pixel_values=pixels))
        assert self.image_backbone is not None
        if isinstance(self.image_backbone, SmallCNN):
            return self.image_backbone(pixels)
        return self.image_backbone(pixel_values=pixels).pooler_output

    def encode_image(self, pixels: Tensor) -> Tensor:
        if self.cfg.flip_tta and not self.training:
            # test-time augmentation: product photos are left/right symmetric in meaning,
            # so the mirror is a second view; one batched forward for both
            z = self._embed_image(torch.cat([pixels, pixels.flip(-1)]))
            return F.normalize(z[: len(pixels)] + z[len(pixels) :], dim=-1)
        return self._embed_image(pixels)

    def _embed_image(self, pixels: Tensor) -> Tensor:
        return F.normalize(self.image_head(self.image_features(pixels)), dim=-1)

    # -- loss ---------------------------------------------------------------------------
    def loss(self, img: Tensor, txt: Tensor, same: Tensor | None = None) -> Tensor:
        """``same[i, j]``: pair i and j share a caption (not a true negative)."""
        scale = self.logit_scale.clamp(max=math.log(100.0)).exp()
        if self.cfg.loss == "siglip":
            return siglip_loss(img, txt, scale, self.logit_bias, same)
        return infonce_loss(img, txt, scale, same)


def infonce_loss(img: Tensor, txt: Tensor, scale: Tensor, same: Tensor | None = None) -> Tensor:
    """Symmetric InfoNCE (CLIP). Off-diagonal pairs with the same caption are masked out:
    they are not negatives, and treating them as such punishes correct matches."""
    logits = scale * img @ txt.t()
    if same is not None:
        eye = torch.eye(len(img), dtype=torch.bool, device=img.device)
        logits = logits.masked_fill(same & ~eye, float("-inf"))
    labels = torch.arange(len(img), device=img.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)) / 2


def siglip_loss(
    img: Tensor, txt: Tensor, scale: Tensor, bias: Tensor, same: Tensor | None = None
) -> Tensor:
    """Pairwise sigmoid loss (SigLIP, Zhai et al. 2023); same-caption pairs are positives."""
    logits = scale * img @ txt.t() + bias
    pos = torch.eye(len(img), dtype=torch.bool, device=img.device)
    if same is not None:
        pos = pos | same
    labels = pos.to(logits.dtype) * 2 - 1
    return -F.logsigmoid(labels * logits).sum() / len(img)


# -- persistence ----------------------------------------------------------------------------
def save_model(model: DualEncoder, path: Path, extra: dict[str, Any] | None = None) -> None:
    """A self-contained directory: weights (safetensors), our config (JSON) and the HF
    configs + tokenizer, so loading needs neither the original checkpoint nor pickle."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    import shutil

    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    sd = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    save_file(sd, str(tmp / MODEL_FILE), metadata={"format": "pt"})
    sub = "clip" if model.clip is not None else "text"
    backbone = model.clip if model.clip is not None else model.text_backbone
    assert backbone is not None
    backbone.config.save_pretrained(tmp / sub)
    model.tokenizer.save_pretrained(str(tmp / sub))
    img_cfg = getattr(model, "_image_config", None)
    if img_cfg is not None:
        img_cfg.save_pretrained(tmp / "image")
    for d in {tmp / sub, tmp / "image"}:
        if d.is_dir() and model.pixel_mean != CLIP_MEAN:
            stats = {"image_mean": list(model.pixel_mean), "image_std": list(model.pixel_std)}
            (d / "preprocessor_config.json").write_text(json.dumps(stats))
    meta = {"format_version": FORMAT_VERSION, "model": model.cfg.model_dump(), **(extra or {})}
    (tmp / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    old = path.with_name(path.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if path.exists():
        path.rename(old)
    tmp.rename(path)
    shutil.rmtree(old, ignore_errors=True)


def read_meta(path: Path) -> dict[str, Any]:
    f = Path(path) / CONFIG_FILE
    if not f.is_file():
        raise FileNotFoundError(f"{path}: not a multimodal model (no {CONFIG_FILE})")
    meta: dict[str, Any] = json.loads(f.read_text())
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: unsupported model format {meta.get('format_version')!r}")
    return meta


def load_model(path: Path, flip_tta: bool | None = None) -> DualEncoder:
    """Rebuild from the saved configs, then load every weight strictly; ``flip_tta``
    overrides the saved test-time augmentation (to measure it before adopting it)."""
    path = Path(path)
    cfg = ModelConfig(**read_meta(path)["model"])
    if flip_tta is not None:
        cfg = cfg.model_copy(update={"flip_tta": flip_tta})
    model = DualEncoder(cfg, _weights=False, _dir=path)
    model.load_state_dict(load_file(str(path / MODEL_FILE)), strict=True)
    model.eval()
    return model


def model_id(path: Path) -> str:
    """Identifies the exact weights (a hash of the weights file, so a copied or moved model
    keeps its id): stored with an index, so a retrained model cannot be queried against
    vectors of the previous one."""
    import hashlib

    h = hashlib.sha256()
    with (Path(path) / MODEL_FILE).open("rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    # image embeddings also depend on test-time augmentation
    tta = "+flip" if ModelConfig(**read_meta(path)["model"]).flip_tta else ""
    return f"mm:{h.hexdigest()[:16]}{tta}"
