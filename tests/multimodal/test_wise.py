"""WiSE-FT: alpha 0 and 1 reproduce the end points, 0.5 is the midpoint."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from aiprime.multimodal.model import MODEL_FILE, DualEncoder, ModelConfig, load_model, save_model
from aiprime.multimodal.wise import interpolate_state, wise_ft


def test_interpolate_state_math() -> None:
    a = {"w": torch.zeros(3), "n": torch.tensor(1)}
    b = {"w": torch.ones(3) * 4, "n": torch.tensor(7)}
    mid = interpolate_state(a, b, 0.25)
    assert torch.allclose(mid["w"], torch.ones(3)) and int(mid["n"]) == 7
    with pytest.raises(ValueError, match="different weights"):
        interpolate_state(a, {"w": torch.ones(3)}, 0.5)
    with pytest.raises(ValueError, match="shapes differ"):
        interpolate_state(a, {"w": torch.ones(2), "n": torch.tensor(1)}, 0.5)


def test_wise_ft_end_points(tmp_path: Path) -> None:
    cfg = ModelConfig(image_size=16, cnn_width=4, embed_dim=8)
    torch.manual_seed(0)
    m0 = DualEncoder(cfg)
    save_model(m0, tmp_path / "zs")
    with torch.no_grad():
        for p in m0.image_head.parameters():
            p.add_(1.0)
    save_model(m0, tmp_path / "ft")
    sd0 = load_file(str(tmp_path / "zs" / MODEL_FILE))
    sd1 = load_file(str(tmp_path / "ft" / MODEL_FILE))
    for alpha, want in ((0.0, sd0), (1.0, sd1)):
        out = wise_ft(tmp_path / "zs", tmp_path / "ft", alpha, tmp_path / f"w{alpha}")
        got = load_file(str(out / MODEL_FILE))
        assert all(torch.allclose(got[k].float(), want[k].float()) for k in want)
    wise_ft(tmp_path / "zs", tmp_path / "ft", 0.5, tmp_path / "w.5")
    m = load_model(tmp_path / "w.5")
    k = "0.weight"
    w = dict(m.image_head.named_parameters())[k]
    want_mid = (sd0[f"image_head.{k}"] + sd1[f"image_head.{k}"]) / 2
    assert torch.allclose(w, want_mid, atol=1e-6)
    with pytest.raises(ValueError, match="alpha"):
        wise_ft(tmp_path / "zs", tmp_path / "ft", 1.5, tmp_path / "bad")


def test_wise_refuses_different_architectures(tmp_path: Path) -> None:
    save_model(DualEncoder(ModelConfig(image_size=16, cnn_width=4, embed_dim=8)), tmp_path / "a")
    save_model(DualEncoder(ModelConfig(image_size=16, cnn_width=8, embed_dim=8)), tmp_path / "b")
    with pytest.raises(ValueError, match="cnn_width"):
        wise_ft(tmp_path / "a", tmp_path / "b", 0.5, tmp_path / "c")
