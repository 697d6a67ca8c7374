"""Augmentation for image-text pairs, applied on the fly, each part switchable.

Images: kornia on whole uint8->float batches (pure torch, no torchvision). Hue jitter is
off by default because captions name colours ("Navy Blue Shirt"): shifting the hue would
teach the model that a red shirt matches "blue". Flips are on by default for the same
reason they are safe for product photos; turn them off when captions say left/right.

Text: EDA-style edits (Wei & Zou, 2019: random deletion, swap, synonym replacement) and
captions rewritten from metadata columns with templates ("Navy Blue Shirts for Men"),
which teach the text side that word order and brand words matter less than attributes.
"""

from __future__ import annotations

import random
import re
from collections.abc import Mapping

import torch
from pydantic import BaseModel, Field
from torch import nn

# A small, domain-neutral synonym table; EDA's WordNet is not available offline.
SYNONYMS: dict[str, list[str]] = {
    "men": ["male", "mens"],
    "women": ["female", "womens", "ladies"],
    "tshirt": ["t-shirt", "tee"],
    "t-shirt": ["tshirt", "tee"],
    "shoes": ["footwear"],
    "bag": ["handbag"],
    "watch": ["wristwatch"],
    "large": ["big"],
    "big": ["large"],
    "small": ["little", "tiny"],
    "circle": ["disc", "round shape"],
    "square": ["box"],
    "grey": ["gray"],
    "gray": ["grey"],
    "kids": ["children"],
    "girls": ["girl"],
    "boys": ["boy"],
}


class ImageAugConfig(BaseModel):
    enabled: bool = True
    crop_scale: tuple[float, float] = (0.7, 1.0)
    crop_ratio: tuple[float, float] = (0.85, 1.18)
    flip: bool = True
    shift: float = Field(0.06, ge=0.0, le=0.5, description="Max translation, fraction of size.")
    brightness: float = 0.2
    contrast: float = 0.2
    saturation: float = 0.2
    hue: float = Field(0.0, ge=0.0, le=0.5, description="Off by default: captions name colours.")
    jitter_p: float = 0.8


class TextAugConfig(BaseModel):
    enabled: bool = True
    p: float = Field(0.5, ge=0.0, le=1.0, description="Chance a caption is replaced by a variant.")
    delete: float = Field(0.1, ge=0.0, le=0.5, description="EDA: per-word deletion chance.")
    swap: int = Field(1, ge=0, description="EDA: random word swaps.")
    synonym: bool = True
    templates: list[str] = Field(
        default_factory=lambda: [
            "{baseColour} {articleType} for {gender}",
            "{gender} {baseColour} {articleType}",
            "{usage} {articleType} in {baseColour}",
        ],
        description="Python format strings over metadata columns; skipped if a column is empty.",
    )
    variants: int = Field(
        6, ge=1, description="Variants drawn per caption when the text tower is locked."
    )


def build_image_aug(cfg: ImageAugConfig, size: int) -> nn.Module:
    """A kornia pipeline on float images in [0, 1], N x 3 x H x W -> N x 3 x size x size."""
    import kornia.augmentation as K

    if not cfg.enabled:
        return nn.Identity()
    parts: list[nn.Module] = [
        K.RandomResizedCrop((size, size), scale=cfg.crop_scale, ratio=cfg.crop_ratio)
    ]
    if cfg.flip:
        parts.append(K.RandomHorizontalFlip())
    if cfg.shift > 0:
        parts.append(
            K.RandomAffine(degrees=0.0, translate=(cfg.shift, cfg.shift), padding_mode="border")
        )
    if max(cfg.brightness, cfg.contrast, cfg.saturation, cfg.hue) > 0:
        parts.append(
            K.ColorJitter(cfg.brightness, cfg.contrast, cfg.saturation, cfg.hue, p=cfg.jitter_p)
        )
    return nn.Sequential(*parts)


def to_float(pixels: torch.Tensor) -> torch.Tensor:
    return pixels.float().div_(255.0)


_WORDS = re.compile(r"\S+")


class TextAugmenter:
    """Returns a caption variant; deterministic for a given ``random.Random``."""

    def __init__(self, cfg: TextAugConfig) -> None:
        self.cfg = cfg

    def templates(self, meta: Mapping[str, str]) -> list[str]:
        out = []
        for t in self.cfg.templates:
            try:
                s = t.format_map(_Strict(meta))
            except KeyError:
                continue
            out.append(" ".join(s.split()))
        return out

    def eda(self, caption: str, rng: random.Random) -> str:
        words = _WORDS.findall(caption)
        if len(words) > 1 and self.cfg.delete > 0:
            kept = [w for w in words if rng.random() >= self.cfg.delete]
            words = kept or [rng.choice(words)]
        for _ in range(self.cfg.swap):
            if len(words) > 1:
                i, j = rng.sample(range(len(words)), 2)
                words[i], words[j] = words[j], words[i]
        if self.cfg.synonym:
            cands = [i for i, w in enumerate(words) if w.lower() in SYNONYMS]
            if cands:
                i = rng.choice(cands)
                words[i] = rng.choice(SYNONYMS[words[i].lower()])
        return " ".join(words)

    def __call__(self, caption: str, meta: Mapping[str, str], rng: random.Random) -> str:
        if not self.cfg.enabled or rng.random() >= self.cfg.p:
            return caption
        templ = self.templates(meta)
        if templ and rng.random() < 0.5:
            return rng.choice(templ)
        return self.eda(caption, rng)

    def variants(self, caption: str, meta: Mapping[str, str], rng: random.Random) -> list[str]:
        """Distinct variants (the caption itself excluded) for a locked text tower, whose
        features can then be computed once instead of at every step."""
        if not self.cfg.enabled:
            return []
        out: dict[str, None] = {}
        for t in self.templates(meta):
            out[t] = None
        for _ in range(self.cfg.variants * 2):
            if len(out) >= self.cfg.variants:
                break
            out[self.eda(caption, rng)] = None
        out.pop(caption, None)
        return list(out)[: self.cfg.variants]


class _Strict(dict[str, str]):
    def __missing__(self, key: str) -> str:
        raise KeyError(key)

    def __getitem__(self, key: str) -> str:
        v = super().__getitem__(key) if key in self else self.__missing__(key)
        if not v:
            raise KeyError(key)
        return v
