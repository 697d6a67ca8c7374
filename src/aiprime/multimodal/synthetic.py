"""A synthetic image-caption dataset drawn with PIL: coloured shapes on plain backgrounds.

It lets the demo and the tests train and search without any downloaded data. Captions
name four attributes ("a large red circle on a grey background"); because the split is by
caption, the test split holds *unseen combinations*, so good test recall means the image
tower learned the attributes rather than memorising whole captions.
"""

from __future__ import annotations

import csv
import math
import random
from pathlib import Path

from PIL import Image, ImageDraw

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 60, 220),
    "yellow": (240, 210, 20),
    "purple": (140, 40, 170),
    "orange": (250, 130, 10),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (245, 245, 245),
    "grey": (128, 128, 128),
    "black": (15, 15, 15),
}
SHAPES = ("circle", "square", "triangle", "star")
SIZES = {"small": 0.22, "large": 0.4}
META_COLUMNS = ["shape", "colour", "size", "background"]


def _polygon(shape: str, cx: float, cy: float, r: float, rot: float) -> list[tuple[float, float]]:
    if shape == "triangle":
        n, radii = 3, [r]
    elif shape == "star":
        n, radii = 10, [r, r * 0.45]
    else:  # square
        n, radii = 4, [r * 1.1]
    pts = []
    for i in range(n):
        a = rot + 2 * math.pi * i / n
        rr = radii[i % len(radii)]
        pts.append((cx + rr * math.sin(a), cy - rr * math.cos(a)))
    return pts


def draw(
    shape: str, colour: str, size: str, background: str, rng: random.Random, px: int = 64
) -> Image.Image:
    """One image; position, rotation and a little colour noise vary per call."""
    img = Image.new("RGB", (px, px), BACKGROUNDS[background])
    d = ImageDraw.Draw(img)
    r = SIZES[size] * px * rng.uniform(0.9, 1.1)
    m = r + 2
    cx, cy = rng.uniform(m, px - m), rng.uniform(m, px - m)
    fill = tuple(max(0, min(255, c + rng.randint(-15, 15))) for c in COLOURS[colour])
    if shape == "circle":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    else:
        rot = rng.uniform(0, math.pi / 8) if shape == "square" else rng.uniform(-0.2, 0.2)
        d.polygon(_polygon(shape, cx, cy, r, rot), fill=fill)
    return img


def make_dataset(out: Path, n: int = 800, seed: int = 0, px: int = 64) -> Path:
    """Write ``out/images/<id>.png`` and ``out/captions.csv`` (id, caption, attributes)."""
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        shape = rng.choice(SHAPES)
        colour = rng.choice(list(COLOURS))
        size = rng.choice(list(SIZES))
        bg = rng.choice(list(BACKGROUNDS))
        draw(shape, colour, size, bg, rng, px).save(out / "images" / f"{i:05d}.png")
        caption = f"a {size} {colour} {shape} on a {bg} background"
        rows.append(
            {
                "id": f"{i:05d}",
                "caption": caption,
                "shape": shape,
                "colour": colour,
                "size": size,
                "background": bg,
            }
        )
    with (out / "captions.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["id", "caption", *META_COLUMNS])
        w.writeheader()
        w.writerows(rows)
    return out
