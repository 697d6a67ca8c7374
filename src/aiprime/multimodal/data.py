"""Image-text pairs from a folder plus a CSV or JSONL file, split by unique caption.

Splitting by caption (product name) and not by row matters: the fashion set has many
photos that share a name, and a row split would put the same name in train and test, so
the test would reward memorised names. The split is a hash of the caption, so it is stable
across runs, machines and dataset growth.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from pydantic import BaseModel, Field
from safetensors.torch import load_file, save_file

from aiprime.multimodal.images import ImageLoadError, load_batch

SPLITS = ("train", "val", "test")


class DataConfig(BaseModel):
    """Where the pairs are and which columns hold what."""

    captions_file: str = Field("", description="CSV/JSONL; '' finds captions.csv/.jsonl.")
    image_column: str = Field("id", description="Column with the image file name or id.")
    caption_column: str = Field("productDisplayName", description="Column with the caption.")
    image_pattern: str = Field(
        "images/{}.jpg", description="Path of an image relative to the data dir, from the column."
    )
    meta_columns: list[str] = Field(
        default_factory=lambda: [
            "gender",
            "masterCategory",
            "subCategory",
            "articleType",
            "baseColour",
            "season",
            "usage",
        ],
        description="Metadata columns kept for attribute templates (missing ones ignored).",
    )
    val_fraction: float = Field(0.15, ge=0.0, lt=1.0)
    # 0.16: the fashion test split then holds 1,030 distinct names, enough for a
    # 1,000-pair gallery (0.15 gave 974).
    test_fraction: float = Field(0.16, ge=0.0, lt=1.0)
    split_salt: str = Field("aiprime-mm", description="Changes which captions go where.")
    gallery_size: int = Field(1000, ge=1, description="Pairs in an evaluation gallery.")


@dataclass
class Pair:
    image: Path
    caption: str
    key: str  # the image column's value: a stable id
    meta: dict[str, str] = field(default_factory=dict)


class DataError(Exception):
    """A dataset the user must fix (missing file or column)."""


def find_captions_file(data_dir: Path, cfg: DataConfig) -> Path:
    if cfg.captions_file:
        p = Path(cfg.captions_file)
        p = p if p.is_absolute() else data_dir / p
        if not p.is_file():
            raise DataError(f"captions file {p} not found")
        return p
    for name in ("captions.csv", "captions.jsonl", "metadata.csv", "metadata.jsonl"):
        if (data_dir / name).is_file():
            return data_dir / name
    raise DataError(f"{data_dir}: no captions.csv or captions.jsonl (set data.captions_file)")


def _rows(path: Path) -> list[dict[str, str]]:
    if path.suffix.lower() == ".jsonl":
        rows = []
        with path.open(encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    try:
                        obj = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise DataError(f"{path}:{n}: invalid JSON ({e})") from e
                    rows.append({k: "" if v is None else str(v) for k, v in obj.items()})
        return rows
    with path.open(encoding="utf-8", newline="") as f:
        return [{k: (v or "") for k, v in r.items()} for r in csv.DictReader(f)]


def load_pairs(data_dir: Path, cfg: DataConfig | None = None) -> list[Pair]:
    """Rows with a caption and an existing image file; others are dropped silently here
    (an image that exists but is corrupt is reported when it is decoded)."""
    cfg = cfg or DataConfig()
    data_dir = Path(data_dir)
    path = find_captions_file(data_dir, cfg)
    rows = _rows(path)
    if rows:
        for col in (cfg.image_column, cfg.caption_column):
            if col not in rows[0]:
                raise DataError(f"{path}: no column {col!r} (columns: {sorted(rows[0])})")
    pairs: list[Pair] = []
    for r in rows:
        cap = " ".join(r[cfg.caption_column].split())
        key = r[cfg.image_column].strip()
        if not cap or not key:
            continue
        img = data_dir / cfg.image_pattern.format(key)
        if not img.is_file():
            continue
        meta = {c: r[c].strip() for c in cfg.meta_columns if r.get(c, "").strip()}
        pairs.append(Pair(img, cap, key, meta))
    if not pairs:
        raise DataError(f"{path}: no usable pairs (check image_pattern {cfg.image_pattern!r})")
    return pairs


def split_of(caption: str, cfg: DataConfig) -> str:
    """train / val / test from a hash of the normalised caption."""
    h = hashlib.sha256(f"{cfg.split_salt}\x00{caption.lower()}".encode()).digest()
    u = int.from_bytes(h[:8], "little") / 2**64
    if u < cfg.test_fraction:
        return "test"
    if u < cfg.test_fraction + cfg.val_fraction:
        return "val"
    return "train"


def split_pairs(pairs: Sequence[Pair], cfg: DataConfig) -> dict[str, list[Pair]]:
    out: dict[str, list[Pair]] = {s: [] for s in SPLITS}
    for p in pairs:
        out[split_of(p.caption, cfg)].append(p)
    return out


def gallery(pairs: Sequence[Pair], size: int, salt: str = "gallery") -> list[Pair]:
    """A deterministic evaluation gallery: one pair per distinct caption (so every query
    has exactly one right answer), then the first ``size`` by a hash order."""
    best: dict[str, Pair] = {}
    for p in sorted(pairs, key=lambda p: _h(salt, p.key)):
        best.setdefault(p.caption.lower(), p)
    return sorted(best.values(), key=lambda p: _h(salt, p.caption.lower()))[:size]


def _h(salt: str, s: str) -> str:
    return hashlib.sha256(f"{salt}\x00{s}".encode()).hexdigest()


def image_cache(
    pairs: Sequence[Pair],
    size: int,
    cache_dir: Path,
    progress: Callable[[int], None] | None = None,
    batch: int = 256,
) -> tuple[torch.Tensor, list[int], list[ImageLoadError]]:
    """All images resized once to ``size`` as uint8 (N x 3 x S x S), cached as
    safetensors keyed by the image paths and their mtimes. Returns pixels, the indices of
    ``pairs`` they belong to, and the errors of the images that were skipped."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    ident = hashlib.sha256()
    for p in pairs:
        ident.update(f"{p.image.resolve()}\x00{p.image.stat().st_mtime_ns}\n".encode())
    path = cache_dir / f"images-{size}-{ident.hexdigest()[:16]}.safetensors"
    if path.is_file():
        t = load_file(str(path))
        idx = [int(i) for i in t["indices"].tolist()]
        if progress:
            progress(len(pairs))
        return t["pixels"], idx, []
    chunks: list[np.ndarray] = []
    indices: list[int] = []
    errors: list[ImageLoadError] = []
    for s in range(0, len(pairs), batch):
        part = pairs[s : s + batch]
        lb = load_batch([p.image for p in part], size)
        chunks.append(lb.pixels)
        indices.extend(s + i for i in lb.indices)
        errors.extend(lb.errors)
        if progress:
            progress(len(part))
    pixels = torch.from_numpy(np.concatenate(chunks)) if chunks else torch.zeros(0, 3, size, size)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")  # concurrent runs never share a tmp
    save_file(
        {"pixels": pixels.to(torch.uint8).contiguous(), "indices": torch.tensor(indices)},
        str(tmp),
    )
    tmp.replace(path)
    return pixels.to(torch.uint8), indices, errors
