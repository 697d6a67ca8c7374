"""``aiprime moe report``: grouping over seeds, curves, heatmap data, tables and the files."""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from aiprime.moe.lm import load_config, train
from aiprime.moe.lm.inspect import ExpertProfile
from aiprime.moe.lm.report import (
    load_matrix,
    mean_std_curve,
    owned_tokens,
    specialisation_table,
    training_load,
    write_report,
)
from aiprime.moe.lm.train import TrainConfig, read_metrics

from .lm_common import TEXT, one_thread  # noqa: F401 (autouse fixture)

pytest.importorskip("matplotlib")

REPO = Path(__file__).resolve().parents[2]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _smoke(tmp_path: Path) -> TrainConfig:
    text = tmp_path / "input.txt"
    text.write_text(TEXT, encoding="utf-8")
    cfg = load_config(REPO / "configs" / "moe" / "smoke.toml")
    cfg.data.path = str(text)
    return cfg


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[Path]]:
    """Two seeds of the smoke MoE and one dense variant (6 steps each, about a second)."""
    tmp = tmp_path_factory.mktemp("runs")
    torch.set_num_threads(1)
    out: dict[str, list[Path]] = {"moe": [], "dense": []}
    for seed in (1, 2):
        cfg = _smoke(tmp)
        cfg.train.seed = seed
        train(cfg, tmp / f"moe_s{seed}")
        out["moe"].append(tmp / f"moe_s{seed}")
    cfg = _smoke(tmp)
    cfg.model.moe_every = 0
    train(cfg, tmp / "dense_s1")
    out["dense"].append(tmp / "dense_s1")
    return out


def test_mean_std_curve_uses_common_points_only() -> None:
    a = [{"tokens": 10, "val_loss": 3.0}, {"tokens": 20, "val_loss": 2.0},
         {"tokens": 30, "val_loss": 1.0}]  # fmt: skip
    b = [{"tokens": 10, "val_loss": 5.0}, {"tokens": 15, "train_loss": 9.0},
         {"tokens": 20, "val_loss": 4.0}]  # fmt: skip
    c = mean_std_curve([a, b], "val_loss")
    assert c.x == [10.0, 20.0]  # b stopped before 30: not averaged over one run
    assert c.mean == [4.0, 3.0]
    assert c.std == pytest.approx([statistics.stdev([3.0, 5.0])] * 2)
    single = mean_std_curve([a], "val_loss")
    assert single.std == [0.0, 0.0, 0.0] and single.mean == [3.0, 2.0, 1.0]


def test_load_matrix_and_training_load() -> None:
    counts = [torch.tensor([[3.0, 1.0], [0.0, 4.0]]), torch.tensor([[2.0, 2.0], [2.0, 2.0]])]
    m = load_matrix(counts)
    assert m.shape == (2, 2)
    assert m.tolist() == [[0.375, 0.625], [0.5, 0.5]]
    recs = [
        {"step": 1, "expert_load": [[0.1, 0.9]]},
        {"step": 2, "val_loss": 1.0, "expert_load": [[0.4, 0.6]]},
        {"step": 3, "expert_load": []},  # dense-like record: skipped
    ]
    steps, loads = training_load(recs)
    assert steps == [1, 2] and loads.shape == (1, 2, 2)
    assert loads[0, 1].tolist() == pytest.approx([0.9, 0.6])  # expert 1 over steps
    assert training_load([{"step": 1, "expert_load": []}])[0] == []


def test_specialisation_table_escapes_and_owned_tokens() -> None:
    prof = [ExpertProfile(0, 0, 0.5, [("|", 0.4, 1.0), ("\n", 0.3, 0.95)]),
            ExpertProfile(0, 1, 0.5, [(" ", 0.9, 0.5)])]  # fmt: skip
    md = specialisation_table(prof).splitlines()
    assert len(md) == 4
    # every row keeps 4 cells: the '|' token is escaped, the newline shown as \n
    assert all(row.replace("\\|", "").count("|") == 5 for row in md)
    assert "`\\|` 40%/100%" in md[2] and "`\\n` 30%/95%" in md[2]
    assert "`␣` 90%/50%" in md[3]
    # token 0 always goes to expert 0, token 1 is split, token 2 is too rare to count
    counts = [torch.tensor([[100.0, 0.0], [50.0, 50.0], [5.0, 0.0]])]
    owned = owned_tokens(counts, lambda ids: "abc"[ids[0]], top_k=1, min_count=20)
    assert owned == [[["a"], []]]


def test_report_files_and_numbers(runs: dict[str, list[Path]], tmp_path: Path) -> None:
    from aiprime import cli

    out = tmp_path / "report"
    all_runs = [*runs["moe"], *runs["dense"]]
    r = CliRunner().invoke(
        cli.app, ["moe", "report", *map(str, all_runs), "--out", str(out), "--prefix", "x_"]
    )
    assert r.exit_code == 0, r.output
    rep = json.loads((out / "x_report.json").read_text())
    assert [g["n"] for g in rep["groups"]] == [2, 1]
    moe_g, dense_g = rep["groups"]
    vals = [[x for x in read_metrics(d) if "val_loss" in x][-1]["val_loss"] for d in runs["moe"]]
    assert moe_g["val_loss_mean"] == pytest.approx(statistics.fmean(vals))
    assert moe_g["val_loss_std"] == pytest.approx(statistics.stdev(vals))
    assert dense_g["val_loss_std"] is None and "dense" in dense_g["label"]
    assert moe_g["params_total"] > moe_g["params_active"] > 0
    assert dense_g["params_total"] == dense_g["params_active"]

    # plots: the loss chart, and for each MoE run (not the dense one) both heatmaps
    names = {"x_loss.png", "x_expert_load_moe_s1.png", "x_expert_load_moe_s2.png",
             "x_expert_load_training_moe_s1.png", "x_expert_load_training_moe_s2.png"}  # fmt: skip
    assert names <= set(rep["files"])
    assert not any("dense" in f for f in rep["files"])
    import matplotlib.image as mpimg

    for n in names:
        assert (out / n).read_bytes()[:8] == PNG_MAGIC
        h, w = mpimg.imread(out / n).shape[:2]
        assert h > 100 and w > 100

    # the smoke model: one MoE layer of 4 experts, loads sum to one
    for e in rep["moe_runs"]:
        assert len(e["load"]) == 1 and len(e["load"][0]) == 4
        assert sum(e["load"][0]) == pytest.approx(1.0)
    md = (out / "x_report.md").read_text()
    mean_std = f"{moe_g['val_loss_mean']:.4f} ± {moe_g['val_loss_std']:.4f}"
    assert mean_std in md
    assert "![loss curves](x_loss.png)" in md
    rows = [ln for ln in md.splitlines() if ln.startswith("| 0 | ")]  # layer-0 expert rows
    assert len(rows) == 2 * 4  # two MoE runs x four experts
    assert "moe" in r.output and "± " in r.output


def test_report_without_matplotlib_says_how_to_install(
    runs: dict[str, list[Path]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ImportError, match=r"aiprime\[plots\]"):
        write_report(runs["dense"], tmp_path / "r")


def test_speed_command_times_every_config(tmp_path: Path) -> None:
    from aiprime import cli

    smoke = REPO / "configs" / "moe" / "smoke.toml"
    dense = tmp_path / "smoke_dense.toml"
    dense.write_text(smoke.read_text().replace("moe_every = 2", "moe_every = 0"))
    out = tmp_path / "speed.json"
    args = ["moe", "speed", str(smoke), str(dense), "--steps", "1", "--rounds", "2",
            "--warmup", "0", "--json", str(out)]  # fmt: skip
    r = CliRunner().invoke(cli.app, args)
    assert r.exit_code == 0, r.output
    res = {x["name"]: x for x in json.loads(out.read_text())}
    assert set(res) == {"smoke", "smoke_dense"}
    assert res["smoke"]["tokens_per_step"] == 8 * 16  # batch_size x block_size
    assert res["smoke"]["params_total"] > res["smoke"]["params_active"]
    assert res["smoke_dense"]["params_total"] == res["smoke_dense"]["params_active"]
    assert all(x["wall_tokens_per_s"] > 0 and x["cpu_tokens_per_s"] > 0 for x in res.values())
