"""Recall@k in both directions on a gallery of image-caption pairs.

The gallery holds one pair per distinct caption (see ``data.gallery``), so each text
query has exactly one correct image and vice versa; recall@k is the fraction of queries
whose partner is among the top k of the whole gallery.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from aiprime.multimodal.augment import to_float
from aiprime.multimodal.data import DataConfig, gallery, image_cache, load_pairs, split_pairs
from aiprime.multimodal.model import DualEncoder, load_model

KS = (1, 5, 10)


def recall_at_k(sim: torch.Tensor, ks: Sequence[int] = KS) -> dict[str, float]:
    """``sim[i, j]``: similarity of text i and image j; pair i is (text i, image i)."""
    n = sim.shape[0]
    target = torch.arange(n)
    out: dict[str, float] = {}
    for name, s in (("t2i", sim), ("i2t", sim.t())):
        # rank of the partner = how many items score strictly higher
        partner = s[target, target].unsqueeze(1)
        rank = (s > partner).sum(1)
        for k in ks:
            out[f"{name}_r@{k}"] = float((rank < k).float().mean())
    return out


@torch.no_grad()
def embed_images(model: DualEncoder, pixels: torch.Tensor, batch: int = 256) -> torch.Tensor:
    model.eval()
    return torch.cat(
        [model.encode_image(to_float(pixels[s : s + batch])) for s in range(0, len(pixels), batch)]
    )


@torch.no_grad()
def embed_texts(model: DualEncoder, texts: Sequence[str], batch: int = 256) -> torch.Tensor:
    model.eval()
    return torch.cat([model.encode_text(texts[s : s + batch]) for s in range(0, len(texts), batch)])


def evaluate_model(
    model: DualEncoder, pixels: torch.Tensor, captions: Sequence[str]
) -> dict[str, float]:
    img = embed_images(model, pixels)
    txt = embed_texts(model, captions)
    return recall_at_k(txt @ img.t())


def evaluate_dir(
    model_dir: Path,
    data_dir: Path,
    cache_dir: Path,
    split: str = "test",
    data_cfg: DataConfig | None = None,
    progress: Callable[[int], None] | None = None,
    flip_tta: bool | None = None,
) -> dict[str, Any]:
    """Evaluate a saved model on ``split`` of a dataset, with the data settings it was
    trained with (so the split is the same) unless ``data_cfg`` overrides them;
    ``flip_tta`` overrides the model's test-time augmentation."""
    from aiprime.multimodal.model import read_meta

    meta = read_meta(model_dir)
    cfg = data_cfg or DataConfig(**meta.get("data", {}))
    model = load_model(model_dir, flip_tta)
    pairs = split_pairs(load_pairs(data_dir, cfg), cfg)[split]
    gal = gallery(pairs, cfg.gallery_size)
    pixels, idx, errors = image_cache(gal, model.image_size, cache_dir, progress)
    kept = [gal[i] for i in idx]
    res: dict[str, Any] = evaluate_model(model, pixels, [p.caption for p in kept])
    res.update(
        {
            "split": split,
            "gallery": len(kept),
            "skipped_images": [str(e) for e in errors],
            "model": str(model_dir),
            "flip_tta": model.cfg.flip_tta,
            "data": str(data_dir),
        }
    )
    return res
