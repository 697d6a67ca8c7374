"""Pairs from CSV/JSONL with configurable columns; the split never shares a caption."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from aiprime.multimodal.data import (
    DataConfig,
    DataError,
    gallery,
    image_cache,
    load_pairs,
    split_pairs,
)

from .conftest import SHARED_FASHION


def _folder(tmp_path: Path, n: int = 30) -> Path:
    (tmp_path / "pics").mkdir()
    rows = []
    for i in range(n):
        Image.new("RGB", (8, 8), (i * 8, 0, 0)).save(tmp_path / "pics" / f"p{i}.png")
        rows.append({"file": f"p{i}.png", "text": f"item {i % 10}", "colour": "red"})
    rows.append({"file": "missing.png", "text": "gone", "colour": "red"})
    with (tmp_path / "pairs.jsonl").open("w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return tmp_path


def test_jsonl_with_custom_columns(tmp_path: Path) -> None:
    d = _folder(tmp_path)
    cfg = DataConfig(
        captions_file="pairs.jsonl",
        image_column="file",
        caption_column="text",
        image_pattern="pics/{}",
        meta_columns=["colour", "absent"],
    )
    pairs = load_pairs(d, cfg)
    assert len(pairs) == 30  # the row whose image is missing is dropped
    assert pairs[3].caption == "item 3" and pairs[3].meta == {"colour": "red"}


def test_missing_column_is_a_clear_error(tmp_path: Path) -> None:
    d = _folder(tmp_path)
    cfg = DataConfig(captions_file="pairs.jsonl", image_column="file", caption_column="nope")
    with pytest.raises(DataError, match="no column 'nope'"):
        load_pairs(d, cfg)


def test_split_by_caption_is_disjoint_and_stable(shapes_dir: Path) -> None:
    cfg = DataConfig(caption_column="caption", image_pattern="images/{}.png", test_fraction=0.3)
    pairs = load_pairs(shapes_dir, cfg)
    a = split_pairs(pairs, cfg)
    b = split_pairs(list(reversed(pairs)), cfg)
    caps = {s: {p.caption for p in a[s]} for s in a}
    assert not caps["train"] & caps["test"] and not caps["train"] & caps["val"]
    assert not caps["val"] & caps["test"]
    assert {s: {p.key for p in v} for s, v in a.items()} == {
        s: {p.key for p in v} for s, v in b.items()
    }
    assert sum(len(v) for v in a.values()) == len(pairs)
    assert all(len(v) > 0 for v in a.values())


def test_gallery_one_pair_per_caption(shapes_dir: Path) -> None:
    cfg = DataConfig(caption_column="caption", image_pattern="images/{}.png")
    pairs = load_pairs(shapes_dir, cfg)
    g = gallery(pairs, 10_000)
    assert len(g) == len({p.caption for p in pairs})
    assert gallery(pairs, 5) == g[:5]


def test_image_cache_round_trip(shapes_dir: Path, tmp_path: Path) -> None:
    cfg = DataConfig(caption_column="caption", image_pattern="images/{}.png")
    pairs = load_pairs(shapes_dir, cfg)[:12]
    bad = tmp_path / "bad.png"
    bad.write_text("no")
    pairs[4].image = bad
    px, idx, errors = image_cache(pairs, 16, tmp_path / "c")
    assert px.shape == (11, 3, 16, 16) and 4 not in idx and len(errors) == 1
    px2, idx2, errors2 = image_cache(pairs, 16, tmp_path / "c")  # from the cache file
    assert idx2 == idx and bool((px2 == px).all()) and errors2 == []


@pytest.mark.data
def test_fashion_split_by_name() -> None:
    if not SHARED_FASHION.is_dir():
        pytest.skip("../shared/data/fashion is absent")
    cfg = DataConfig()
    pairs = load_pairs(SHARED_FASHION, cfg)
    assert len(pairs) == 9261
    s = split_pairs(pairs, cfg)
    names = {k: {p.caption.lower() for p in v} for k, v in s.items()}
    assert not names["train"] & names["test"]
    assert len(gallery(s["test"], 1000)) == 1000
