"""Safe image decoding: every failure names the file, and a batch goes on without it.

Images come from users' folders, so they may be truncated, not images at all, or
decompression bombs (a few KB of PNG that expand to gigapixels and exhaust memory). PIL
only *warns* between ``MAX_IMAGE_PIXELS`` and twice that; we treat the warning as an error
and also check the header size before decoding any pixel, so the limit is hard.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

# Formats we accept; anything else PIL can identify (PSD, ICO, ...) is refused as unknown.
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
ACCEPTED_FORMATS = {"JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF", "MPO"}
DEFAULT_MAX_PIXELS = 40_000_000


class ImageLoadError(Exception):
    """An image that cannot be used; the message starts with its path."""

    def __init__(self, path: Path | str, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = str(path)
        self.reason = reason


def load_image(path: Path | str, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Open, verify and decode an image as RGB, or raise :class:`ImageLoadError`."""
    p = Path(path)
    if not p.is_file():
        raise ImageLoadError(p, "no such file")
    old_limit = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = max_pixels
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(p) as img:
                if img.format not in ACCEPTED_FORMATS:
                    raise ImageLoadError(p, f"unsupported image type {img.format!r}")
                w, h = img.size
                if w * h > max_pixels:
                    raise ImageLoadError(
                        p, f"{w}x{h} pixels exceeds the limit of {max_pixels} (decompression bomb?)"
                    )
                img.load()
                return img.convert("RGB")
    except ImageLoadError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageLoadError(p, f"too large, refused as a decompression bomb ({e})") from e
    except UnidentifiedImageError as e:
        raise ImageLoadError(p, "unknown or unsupported file type (not an image)") from e
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageLoadError(p, f"corrupt or truncated image ({e})") from e
    finally:
        Image.MAX_IMAGE_PIXELS = old_limit


def square_resize(img: Image.Image, size: int) -> np.ndarray:
    """Shorter side to ``size`` then a centre crop: HxWx3 uint8. Done once per image
    and cached, so training never decodes a JPEG again."""
    w, h = img.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    img = img.resize((nw, nh), Image.Resampling.BICUBIC, reducing_gap=3.0)
    left, top = (nw - size) // 2, (nh - size) // 2
    img = img.crop((left, top, left + size, top + size))
    return np.asarray(img, dtype=np.uint8)


@dataclass
class LoadedBatch:
    """Pixels of the images that loaded (N x 3 x S x S uint8), their indices into the
    request, and one error per image that did not."""

    pixels: np.ndarray
    indices: list[int]
    errors: list[ImageLoadError]


def load_batch(
    paths: Sequence[Path | str], size: int, max_pixels: int = DEFAULT_MAX_PIXELS
) -> LoadedBatch:
    """Load and resize many images; bad ones are reported and skipped, never fatal."""
    arrays: list[np.ndarray] = []
    indices: list[int] = []
    errors: list[ImageLoadError] = []
    for i, p in enumerate(paths):
        try:
            arrays.append(square_resize(load_image(p, max_pixels), size))
            indices.append(i)
        except ImageLoadError as e:
            errors.append(e)
    pixels = (
        np.stack(arrays).transpose(0, 3, 1, 2).copy()
        if arrays
        else np.zeros((0, 3, size, size), dtype=np.uint8)
    )
    return LoadedBatch(pixels, indices, errors)


def find_images(root: Path) -> list[Path]:
    """Image files under ``root`` (by suffix), sorted, so indexing order is stable."""
    root = Path(root)
    if root.is_file():
        return [root]
    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
