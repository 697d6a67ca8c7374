"""Augmentations: switchable, shape-preserving, hue untouched by default, text edits seeded."""

from __future__ import annotations

import random

import torch

from aiprime.multimodal.augment import (
    ImageAugConfig,
    TextAugConfig,
    TextAugmenter,
    build_image_aug,
)


def test_image_aug_output_shape_and_range() -> None:
    torch.manual_seed(0)
    aug = build_image_aug(ImageAugConfig(), 24)
    x = torch.rand(5, 3, 32, 32)
    y = aug(x)
    assert y.shape == (5, 3, 24, 24)
    assert float(y.min()) >= -1e-4 and float(y.max()) <= 1 + 1e-4
    assert not torch.allclose(torch.nn.functional.interpolate(x, size=24), y)


def test_image_aug_disabled_is_identity() -> None:
    aug = build_image_aug(ImageAugConfig(enabled=False), 32)
    x = torch.rand(2, 3, 32, 32)
    assert torch.equal(aug(x), x)


def test_hue_off_by_default_keeps_colour_identity() -> None:
    """A pure red image stays the reddest channel under the default colour jitter."""
    assert ImageAugConfig().hue == 0.0
    torch.manual_seed(0)
    aug = build_image_aug(ImageAugConfig(flip=False, shift=0.0, crop_scale=(1.0, 1.0)), 16)
    x = torch.zeros(64, 3, 16, 16)
    x[:, 0] = 0.8
    y = aug(x)
    assert bool((y[:, 0].mean((1, 2)) > y[:, 1:].mean((2, 3)).max(1).values).all())
    hue = build_image_aug(ImageAugConfig(hue=0.5, jitter_p=1.0, crop_scale=(1.0, 1.0)), 16)
    z = hue(x)
    assert not bool((z[:, 0].mean((1, 2)) > z[:, 1:].mean((2, 3)).max(1).values).all())


def test_text_templates_from_metadata() -> None:
    aug = TextAugmenter(TextAugConfig(templates=["{colour} {shape}", "{missing} {shape}"]))
    assert aug.templates({"colour": "red", "shape": "circle"}) == ["red circle"]
    assert aug.templates({"colour": "", "shape": "circle"}) == []


def test_eda_is_seeded_and_keeps_words() -> None:
    aug = TextAugmenter(TextAugConfig(delete=0.3, swap=2, synonym=False))
    cap = "Turtle Check Men Navy Blue Shirt"
    a = aug.eda(cap, random.Random(3))
    assert a == aug.eda(cap, random.Random(3))
    assert set(a.split()) <= set(cap.split()) and a
    syn = TextAugmenter(TextAugConfig(delete=0.0, swap=0, synonym=True)).eda(
        "Men Shoes", random.Random(0)
    )
    assert syn != "Men Shoes"


def test_text_aug_switch_and_variants() -> None:
    off = TextAugmenter(TextAugConfig(enabled=False))
    assert off("a red circle", {"colour": "red"}, random.Random(0)) == "a red circle"
    assert off.variants("a red circle", {}, random.Random(0)) == []
    on = TextAugmenter(TextAugConfig(templates=["{colour} thing"], variants=4))
    vs = on.variants("a big red circle here", {"colour": "red"}, random.Random(0))
    assert vs[0] == "red thing" and len(vs) == len(set(vs)) <= 4
    assert "a big red circle here" not in vs
