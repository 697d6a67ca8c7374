"""Image loading safety: corrupt files, decompression bombs and unknown types are refused
with the file named, and a batch goes on without them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from aiprime.multimodal.images import ImageLoadError, find_images, load_batch, load_image


def _png(path: Path, size: tuple[int, int] = (40, 30), colour: str = "red") -> Path:
    Image.new("RGB", size, colour).save(path)
    return path


def test_good_image_loads_as_rgb(tmp_path: Path) -> None:
    p = tmp_path / "ok.png"
    Image.new("L", (10, 12), 128).save(p)
    img = load_image(p)
    assert img.mode == "RGB" and img.size == (10, 12)


def test_corrupt_image_named(tmp_path: Path) -> None:
    p = _png(tmp_path / "broken.png")
    p.write_bytes(p.read_bytes()[:60])  # truncated
    with pytest.raises(ImageLoadError) as e:
        load_image(p)
    assert str(p) in str(e.value) and "corrupt" in str(e.value)


def test_unknown_type_named(tmp_path: Path) -> None:
    p = tmp_path / "notes.jpg"
    p.write_text("this is not an image at all")
    with pytest.raises(ImageLoadError) as e:
        load_image(p)
    assert str(p) in str(e.value) and "unknown" in str(e.value)


def test_decompression_bomb_refused_before_decoding(tmp_path: Path) -> None:
    p = _png(tmp_path / "bomb.png", (300, 300))
    with pytest.raises(ImageLoadError) as e:
        load_image(p, max_pixels=10_000)  # 90,000 pixels > 10,000
    assert str(p) in str(e.value) and "decompression bomb" in str(e.value)
    # PIL's global limit is restored afterwards
    assert Image.MAX_IMAGE_PIXELS != 10_000


def test_batch_skips_bad_images_and_keeps_order(tmp_path: Path) -> None:
    good1 = _png(tmp_path / "a.png", colour="red")
    bad = tmp_path / "b.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    good2 = _png(tmp_path / "c.png", (64, 20), colour="blue")
    missing = tmp_path / "nope.png"
    lb = load_batch([good1, bad, good2, missing], 16)
    assert lb.indices == [0, 2]
    assert lb.pixels.shape == (2, 3, 16, 16) and lb.pixels.dtype == np.uint8
    assert lb.pixels[0, 0].mean() > 200 and lb.pixels[1, 2].mean() > 200  # red, then blue
    assert sorted(e.path for e in lb.errors) == sorted([str(bad), str(missing)])


def test_find_images_by_suffix(tmp_path: Path) -> None:
    _png(tmp_path / "x.png")
    (tmp_path / "sub").mkdir()
    _png(tmp_path / "sub" / "y.PNG")
    (tmp_path / "readme.txt").write_text("hi")
    found = find_images(tmp_path)
    assert [p.name for p in found] == ["y.PNG", "x.png"]  # sorted by path: sub/ < x.png
