"""End to end on the synthetic shapes: training learns, evaluation, indexing and the
three search directions through the Python API and the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from aiprime import cli
from aiprime.config import load_settings
from aiprime.multimodal.eval import evaluate_dir, recall_at_k
from aiprime.multimodal.search import MultimodalIndex


def test_recall_at_k_known_matrix() -> None:
    import torch

    sim = torch.tensor([[0.9, 0.1, 0.0], [0.8, 0.7, 0.0], [0.0, 0.95, 0.5]])
    r = recall_at_k(sim, ks=(1, 2))
    # text ranks: 0 -> 1st, 1 -> 2nd, 2 -> 2nd; image ranks (columns): 0 -> 1st, 1 -> 2nd, 2 -> 1st
    assert r["t2i_r@1"] == pytest.approx(1 / 3) and r["t2i_r@2"] == pytest.approx(1.0)
    assert r["i2t_r@1"] == pytest.approx(2 / 3) and r["i2t_r@2"] == pytest.approx(1.0)


def test_training_learns_and_logs(trained: Path) -> None:
    log = [json.loads(line) for line in (trained / "log.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in log if "loss" in r]
    assert losses[-1] < losses[0] * 0.8
    summary = json.loads((trained / "summary.json").read_text())
    assert summary["steps"] == 60
    assert (trained / "model" / "model.safetensors").is_file()


def test_eval_beats_chance_on_unseen_captions(
    trained: Path, shapes_dir: Path, mm_settings_home: Path
) -> None:
    res = evaluate_dir(trained / "model", shapes_dir, mm_settings_home / "cache" / "mm", "test")
    n = res["gallery"]
    assert n >= 10
    # chance R@5 is 5/n; unseen attribute combinations must do clearly better
    assert res["t2i_r@5"] > min(1.0, 2.5 * 5 / n)
    assert set(res) >= {f"{d}_r@{k}" for d in ("t2i", "i2t") for k in (1, 5, 10)}


def test_index_and_search_api(trained: Path, shapes_dir: Path, tmp_path: Path) -> None:
    s = load_settings(tmp_path / "home")
    idx = MultimodalIndex(s, trained / "model")
    # a corrupt image among the good ones is reported and skipped
    bad = shapes_dir / "images" / "zz_corrupt.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\nbroken")
    try:
        rep = idx.index(shapes_dir)
    finally:
        bad.unlink()
    assert rep.images_indexed == 240 and rep.captions_indexed == 240
    assert len(rep.errors) == 1 and "zz_corrupt.png" in rep.errors[0]
    assert idx.index(shapes_dir).images_unchanged == 240
    hits = idx.search_text("a large red circle", k=10)
    assert [h.modality for h in hits] == ["image"] * 10
    assert hits[0].score >= hits[-1].score
    assert sum("red" in h.text for h in hits) >= 5
    img = shapes_dir / "images" / "00003.png"
    same = idx.search_image(img, k=1)
    assert same[0].source.endswith("00003.png") and same[0].score == pytest.approx(1.0, abs=1e-3)
    # another model must not write into (or query) this collection until it is rebuilt
    import shutil

    from aiprime.store import StoreError

    other = tmp_path / "other"
    shutil.copytree(trained / "model", other)
    from safetensors.torch import load_file, save_file

    sd = load_file(str(other / "model.safetensors"))
    sd["logit_scale"] = sd["logit_scale"] + 0.5  # a retrained model: new weights, new id
    save_file(sd, str(other / "model.safetensors"))
    idx2 = MultimodalIndex(s, other)
    with pytest.raises(StoreError, match="mixing models"):
        idx2.index(shapes_dir)
    assert idx2.reset() and idx2.index(shapes_dir).images_indexed == 240
    assert not MultimodalIndex(load_settings(tmp_path / "empty"), other).reset()
    idx = idx2
    caps = idx.search_image(img, k=5, modality="text")
    assert all(h.modality == "text" for h in caps)
    assert len({h.text for h in caps}) == 5  # distinct captions, not one name five times


def test_cli_mm_commands(trained: Path, shapes_dir: Path, tmp_path: Path) -> None:
    r = CliRunner()
    home = tmp_path / "h"
    base = ["--home", str(home)]
    out = tmp_path / "eval.json"
    res = r.invoke(
        cli.app,
        [
            *base,
            "mm",
            "eval",
            "--data",
            str(shapes_dir),
            "--split",
            "val",
            "--model",
            str(trained / "model"),
            "--out",
            str(out),
        ],
    )
    assert res.exit_code == 0, res.output
    assert "t2i_r@10" in json.loads(out.read_text())
    # search looks for the model in the data directory's models/mm
    import shutil

    shutil.copytree(trained / "model", home / "models" / "mm")
    res = r.invoke(cli.app, [*base, "mm", "index", str(shapes_dir)])
    assert res.exit_code == 0 and "indexed 240 image(s)" in res.output, res.output
    res = r.invoke(cli.app, [*base, "search", "small blue star", "--modality", "image", "--json"])
    assert res.exit_code == 0, res.output
    hits = json.loads(res.output)
    assert len(hits) == 5 and all(h["modality"] == "image" for h in hits)
    img = shapes_dir / "images" / "00010.png"
    res = r.invoke(cli.app, [*base, "search", "--image", str(img), "--modality", "text", "-k", "3"])
    assert res.exit_code == 0 and "(text)" in res.output, res.output
    notimg = tmp_path / "x.png"
    notimg.write_text("text")
    res = r.invoke(cli.app, [*base, "search", "--image", str(notimg)])
    assert res.exit_code == 1 and "x.png" in res.output and "not an image" in res.output
    res = r.invoke(cli.app, [*base, "search", "x", "--modality", "video"])
    assert res.exit_code == 1 and "--modality 'video'" in res.output
    res = r.invoke(cli.app, [*base, "search", "red", "--image", str(img)])
    assert res.exit_code == 1 and "not both" in res.output
    wise = tmp_path / "wise"
    res = r.invoke(
        cli.app,
        [
            *base,
            "mm",
            "wise",
            str(trained / "model"),
            str(trained / "model"),
            "--alpha",
            "0.3",
            "--out",
            str(wise),
        ],
    )
    assert res.exit_code == 0 and (wise / "model.safetensors").is_file(), res.output


def test_cli_train_and_synth(tmp_path: Path) -> None:
    r = CliRunner()
    data = tmp_path / "shapes"
    res = r.invoke(cli.app, ["--home", str(tmp_path / "h"), "mm", "synth", str(data), "-n", "80"])
    assert res.exit_code == 0 and len(list((data / "images").glob("*.png"))) == 80
    cfg = Path(__file__).resolve().parents[2] / "configs" / "mm" / "synthetic.toml"
    res = r.invoke(
        cli.app,
        [
            "--home",
            str(tmp_path / "h"),
            "mm",
            "train",
            "--data",
            str(data),
            "--config",
            str(cfg),
            "--set",
            "optim.steps=3",
            "--set",
            "optim.batch_size=16",
            "--set",
            "model.cnn_width=4",
        ],
    )
    assert res.exit_code == 0, res.output
    assert (tmp_path / "h" / "models" / "mm" / "model.safetensors").is_file()
    res = r.invoke(
        cli.app,
        [
            "mm",
            "train",
            "--data",
            str(data),
            "--config",
            str(cfg),
            "--set",
            "optim.batch_size=1000",
        ],
    )
    assert res.exit_code == 1 and "fewer than batch_size" in res.output


def test_unknown_image_type_in_api(trained: Path, tmp_path: Path) -> None:
    from aiprime.multimodal.images import ImageLoadError

    s = load_settings(tmp_path / "home2")
    idx = MultimodalIndex(s, trained / "model")
    p = tmp_path / "pic.gif"
    Image.new("RGB", (4, 4)).save(tmp_path / "pic.bmp")
    p.write_bytes(b"GIF89a-not-really")
    with pytest.raises(ImageLoadError, match=r"pic\.gif"):
        idx.search_image(p)
