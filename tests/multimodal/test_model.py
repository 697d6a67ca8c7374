"""Dual encoders: losses, LiT locking, a tiny random CLIP loaded with real HF code, and
safetensors round trips."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from aiprime.multimodal.model import (
    DualEncoder,
    ModelConfig,
    SmallCNN,
    infonce_loss,
    load_model,
    lock,
    save_model,
    siglip_loss,
)


def test_infonce_prefers_aligned_pairs() -> None:
    torch.manual_seed(0)
    x = F.normalize(torch.randn(8, 16), dim=-1)
    scale = torch.tensor(20.0)
    aligned = infonce_loss(x, x, scale)
    shuffled = infonce_loss(x, x.roll(1, 0), scale)
    assert aligned < 0.1 < shuffled


def test_infonce_masks_same_caption_negatives() -> None:
    x = F.normalize(torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]), dim=-1)
    same = torch.tensor([[1, 1, 0], [1, 1, 0], [0, 0, 1]], dtype=torch.bool)
    scale = torch.tensor(10.0)
    # rows 0 and 1 are identical: unmasked they confuse each other, masked they do not
    assert infonce_loss(x, x, scale) > math.log(2) * 0.5
    assert infonce_loss(x, x, scale, same) < 1e-3


def test_siglip_loss_sign() -> None:
    x = F.normalize(torch.randn(6, 8), dim=-1)
    s, b = torch.tensor(10.0), torch.tensor(-5.0)
    assert siglip_loss(x, x, s, b) < siglip_loss(x, -x, s, b)


def test_temperature_is_learned() -> None:
    m = torch.nn.Parameter(torch.tensor(math.log(1 / 0.07)))
    x = F.normalize(torch.randn(4, 8), dim=-1)
    infonce_loss(x, x, m.exp()).backward()
    assert m.grad is not None and float(m.grad) != 0.0


def test_cnn_shapes() -> None:
    net = SmallCNN(width=8)
    assert net(torch.rand(2, 3, 32, 32)).shape == (2, net.out_dim * 2)


def test_minilm_cnn_locked_and_round_trip(tmp_path: Path) -> None:
    cfg = ModelConfig(image_size=32, cnn_width=8, embed_dim=16, text_trainable_layers=0)
    m = DualEncoder(cfg)
    trainable = {n.split(".")[0] for n, p in m.named_parameters() if p.requires_grad}
    assert "text_backbone" not in trainable
    assert {"text_head", "image_backbone", "image_head", "logit_scale"} <= trainable
    m.train()
    assert not m.text_backbone.training  # type: ignore[union-attr]  # locked: no dropout
    m.eval()
    t = m.encode_text(["a red circle", "a blue square"])
    i = m.encode_image(torch.rand(2, 3, 40, 40))
    assert t.shape == i.shape == (2, 16)
    assert torch.allclose(t.norm(dim=-1), torch.ones(2), atol=1e-5)
    save_model(m, tmp_path / "m")
    m2 = load_model(tmp_path / "m")
    assert torch.allclose(m2.encode_text(["a red circle"]), t[:1], atol=1e-6)
    img = torch.rand(1, 3, 32, 32)
    assert torch.allclose(m2.encode_image(img), m.encode_image(img), atol=1e-6)


def test_flip_tta_averages_the_mirror_at_inference_only(tmp_path: Path) -> None:
    from aiprime.multimodal.model import model_id

    torch.manual_seed(0)
    m = DualEncoder(ModelConfig(image_size=32, cnn_width=8, embed_dim=16))
    save_model(m, tmp_path / "m")
    img = torch.rand(3, 3, 32, 32)
    plain = load_model(tmp_path / "m")
    tta = load_model(tmp_path / "m", flip_tta=True)
    a, b = plain.encode_image(img), plain.encode_image(img.flip(-1))
    assert not torch.allclose(a, b, atol=1e-3)  # the CNN is not mirror-invariant
    torch.testing.assert_close(tta.encode_image(img), F.normalize(a + b, dim=-1))
    # an image and its mirror get the same embedding
    torch.testing.assert_close(tta.encode_image(img), tta.encode_image(img.flip(-1)))
    tta.train()  # training sees single views (augmentation already flips)
    tta.image_backbone.eval()  # type: ignore[union-attr]  # BatchNorm: same statistics
    torch.testing.assert_close(tta.encode_image(img), a)
    # an index built with one setting is not queried with the other
    save_model(tta, tmp_path / "t")
    assert model_id(tmp_path / "t").endswith("+flip")
    assert model_id(tmp_path / "m") == model_id(tmp_path / "t").removesuffix("+flip")


def test_init_from_run_settings_override_only_what_they_set() -> None:
    # a stage-2 config (init_from) changes locking and, when it says so, flip_tta and the
    # CNN's input size; everything it does not set comes from the loaded model
    from aiprime.multimodal.train import _relock

    m = DualEncoder(ModelConfig(image_size=32, cnn_width=8, embed_dim=16, flip_tta=True))
    _relock(m, ModelConfig(text_trainable_layers=0))
    assert m.cfg.flip_tta and m.image_size == 32
    _relock(m, ModelConfig(flip_tta=False, image_size=40))
    assert not m.cfg.flip_tta and m.image_size == m.cfg.image_size == 40


def test_partial_unlock_last_layer() -> None:
    m = DualEncoder(ModelConfig(cnn_width=8, embed_dim=16, text_trainable_layers=1))
    names = [n for n, p in m.named_parameters() if p.requires_grad and "text_backbone" in n]
    assert names and all("encoder.layer.5." in n or "pooler" in n for n in names)
    assert not m.cfg.text_locked


def test_lock_rejects_module_without_layers() -> None:
    with pytest.raises(ValueError, match="no layer list"):
        lock(torch.nn.Linear(2, 2), 1)


def test_tiny_clip_loads_trains_and_round_trips(tiny_clip_dir: Path, tmp_path: Path) -> None:
    cfg = ModelConfig(
        clip_model=str(tiny_clip_dir), text_trainable_layers=1, image_trainable_layers=0
    )
    m = DualEncoder(cfg)
    assert m.embed_dim == 16 and m.image_size == 32
    grads = {n for n, p in m.named_parameters() if p.requires_grad}
    assert any("text_model.encoder.layers.1." in n for n in grads)
    assert not any("text_model.encoder.layers.0." in n for n in grads)
    assert not any("vision_model.encoder" in n for n in grads)
    assert "clip.visual_projection.weight" in grads
    # one optimisation step changes the unlocked layer and not the locked ones
    before_v = m.clip.vision_model.encoder.layers[0].mlp.fc1.weight.clone()  # type: ignore[union-attr,index]
    before_t = m.clip.text_model.encoder.layers[1].mlp.fc1.weight.clone()  # type: ignore[union-attr,index]
    opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.5)
    t = m.encode_text(["red dress", "blue shoes", "green hat"])
    i = m.encode_image(torch.rand(3, 3, 48, 48))
    m.loss(i, t).backward()
    opt.step()
    assert torch.equal(before_v, m.clip.vision_model.encoder.layers[0].mlp.fc1.weight)  # type: ignore[union-attr,index]
    assert not torch.equal(before_t, m.clip.text_model.encoder.layers[1].mlp.fc1.weight)  # type: ignore[union-attr,index]
    m.eval()
    save_model(m, tmp_path / "clip-ft")
    m2 = load_model(tmp_path / "clip-ft")
    with torch.no_grad():
        assert torch.allclose(
            m2.encode_text(["red dress"]), m.encode_text(["red dress"]), atol=1e-5
        )


def test_minilm_text_with_clip_vision_tower(tiny_clip_dir: Path, tmp_path: Path) -> None:
    """The pretrained-image-tower case: MiniLM text + a CLIP checkpoint's vision tower."""
    m = DualEncoder(
        ModelConfig(image_model=str(tiny_clip_dir), embed_dim=16, image_trainable_layers=0)
    )
    assert not any(p.requires_grad for p in m.image_backbone.parameters())  # type: ignore[union-attr]
    m.eval()
    with torch.no_grad():
        e = m.encode_image(torch.rand(2, 3, 32, 32))
    assert e.shape == (2, 16)
    save_model(m, tmp_path / "mix")
    m2 = load_model(tmp_path / "mix")
    x = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(m2.encode_image(x), m.encode_image(x), atol=1e-5)
