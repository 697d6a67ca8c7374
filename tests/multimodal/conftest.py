"""Fixtures for the multimodal tests: a tiny synthetic dataset, a tiny random CLIP that
the tests build and save themselves (no weights can be downloaded), and one small trained
MiniLM + CNN model shared by the slower tests."""

from __future__ import annotations

import os
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest
import torch

torch.set_num_threads(1)

SHARED_FASHION = Path(__file__).resolve().parents[3] / "shared" / "data" / "fashion"


@pytest.fixture(scope="session")
def shapes_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from aiprime.multimodal.synthetic import make_dataset

    return make_dataset(tmp_path_factory.mktemp("shapes"), n=240, seed=1, px=32)


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random CLIP (2 layers, width 32, 32x32 images) saved with ``save_pretrained``,
    with the MiniLM WordPiece tokenizer (so no BPE files need writing)."""
    from transformers import AutoTokenizer, CLIPConfig, CLIPModel

    from aiprime.embed.base import resolve_model_path

    tok = AutoTokenizer.from_pretrained(resolve_model_path("all-MiniLM-L6-v2"))
    cfg = CLIPConfig(
        text_config={
            "vocab_size": tok.vocab_size,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "max_position_embeddings": 40,
            "pad_token_id": tok.pad_token_id,
            "bos_token_id": tok.cls_token_id,
            "eos_token_id": tok.sep_token_id,
        },
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "image_size": 32,
            "patch_size": 8,
        },
        projection_dim=16,
    )
    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("tiny-clip")
    CLIPModel(cfg).save_pretrained(d)
    tok.save_pretrained(str(d))
    return d


@pytest.fixture(scope="session")
def mm_settings_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("mm-home")


@pytest.fixture(scope="session")
def trained(shapes_dir: Path, mm_settings_home: Path) -> Path:
    """A MiniLM (locked) + small CNN model trained briefly on the shapes: a run dir."""
    from aiprime.multimodal.train import TrainConfig, train

    cfg = TrainConfig.from_toml(
        Path(__file__).resolve().parents[2] / "configs" / "mm" / "synthetic.toml",
        **{"optim.steps": 60, "optim.batch_size": 48, "model.image_size": 32},
    )
    out = mm_settings_home / "run"
    train(cfg, shapes_dir, out, mm_settings_home / "cache" / "mm")
    return out
