"""The MoE/dense language model, its trainer (exact resume, NaN stop) and the CLI."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from aiprime.moe import MoELayer
from aiprime.moe.experts import DenseFFN
from aiprime.moe.lm import (
    GPT,
    CharTokenizer,
    ModelConfig,
    MoESettings,
    NonFiniteLossError,
    TextData,
    load_config,
    load_for_inference,
    train,
)
from aiprime.moe.lm.train import TrainConfig, lr_at, read_metrics

from .lm_common import TEXT, one_thread  # noqa: F401 (autouse fixture)

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "configs" / "moe"


def tiny(moe_every: int = 1, **kw: object) -> ModelConfig:
    return ModelConfig(
        vocab_size=20,
        block_size=16,
        n_layer=2,
        n_head=2,
        d_model=16,
        d_ff=32,
        moe_every=moe_every,
        moe=MoESettings(n_experts=4, top_k=2, d_ff=16),
        **kw,  # type: ignore[arg-type]
    )


@pytest.fixture
def smoke(tmp_path: Path) -> TrainConfig:
    """The shipped smoke config, reading a text written here."""
    text = tmp_path / "input.txt"
    text.write_text(TEXT, encoding="utf-8")
    cfg = load_config(CONFIGS / "smoke.toml")
    cfg.data.path = str(text)
    return cfg


def test_forward_shapes_and_causality() -> None:
    torch.manual_seed(0)
    model = GPT(tiny(moe_every=1)).eval()
    idx = torch.randint(20, (3, 12))
    out = model(idx, idx)
    assert out.logits.shape == (3, 12, 20)
    assert out.loss is not None and out.loss.ndim == 0
    assert len(out.stats) == 2 and out.aux_loss.ndim == 0 and float(out.aux_loss.detach()) > 0
    changed = idx.clone()
    changed[:, 7] = (changed[:, 7] + 1) % 20
    logits2 = model(changed).logits
    torch.testing.assert_close(logits2[:, :7], out.logits[:, :7], rtol=0, atol=1e-5)
    assert not torch.allclose(logits2[:, 7:], out.logits[:, 7:])


def test_moe_every_layout_and_dense_model() -> None:
    model = GPT(replace(tiny(moe_every=2), n_layer=4))
    kinds = [type(b.ffn) for b in model.blocks]  # type: ignore[union-attr]
    assert kinds == [DenseFFN, MoELayer, DenseFFN, MoELayer]
    dense = GPT(tiny(moe_every=0))
    out = dense(torch.randint(20, (2, 5)))
    assert out.stats == [] and float(out.aux_loss.detach()) == 0.0 and out.loss is None
    with pytest.raises(ValueError, match="not causal"):
        replace(tiny(), moe=MoESettings(router="expert_choice"))


def test_shipped_configs_param_accounting() -> None:
    def build(name: str) -> GPT:
        cfg = load_config(CONFIGS / f"{name}.toml")
        return GPT(replace(cfg.model, vocab_size=65))

    dense, moe, total = (
        build(n).param_counts()
        for n in ("shakespeare_dense", "shakespeare_moe", "shakespeare_dense_total")
    )
    assert moe.router > 0 and dense.router == 0
    # Same active parameters per token (the router is the only extra), 4x the FFN in total.
    assert moe.active - moe.router == dense.active == dense.total
    assert moe.total == total.total == total.active
    assert moe.total > 2.5 * dense.total


def test_generate_length_and_greedy_determinism() -> None:
    torch.manual_seed(0)
    model = GPT(tiny()).train()
    idx = torch.randint(20, (2, 5))
    a = model.generate(idx, 20, top_k=1, generator=torch.Generator().manual_seed(1))
    b = model.generate(idx, 20, top_k=1, generator=torch.Generator().manual_seed(2))
    assert a.shape == (2, 25) and torch.equal(a[:, :5], idx)
    assert torch.equal(a, b)  # greedy: the sampling RNG does not matter
    assert model.training  # mode restored
    c = model.generate(idx, 20, temperature=1.0, top_k=3, generator=torch.Generator())
    assert c.shape == (2, 25) and int(c.max()) < 20


def test_tokenizer_and_split(tmp_path: Path) -> None:
    tok = CharTokenizer.from_text("hello")
    assert tok.decode(tok.encode("hole")) == "hole" and tok.vocab_size == 4
    with pytest.raises(ValueError, match="not in the vocabulary"):
        tok.encode("z")
    p = tmp_path / "t.txt"
    p.write_text("abcdefghij" * 10)
    data = TextData(p)
    assert len(data.train) == 90 and len(data.val) == 10
    assert data.tokenizer.decode(data.val.tolist()) == "abcdefghij"


def _rank_file(tmp_path: Path) -> Path:
    """A tiny byte-level BPE in tiktoken's ``.tiktoken`` format: the 256 bytes plus a few
    merges, so BPE can be tested offline (the named encodings are downloaded)."""
    import base64

    merges = [b"th", b"the", b" t", b" the", b"ea", b"ak"]
    tokens = [bytes([b]) for b in range(256)] + merges
    lines = [f"{base64.b64encode(t).decode()} {r}" for r, t in enumerate(tokens)]
    path = tmp_path / "tiny.tiktoken"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_bpe_is_optional(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    p = tmp_path / "t.txt"
    p.write_text("hello world")
    try:
        import tiktoken
    except ImportError:
        with pytest.raises(ImportError, match="tiktoken"):
            TextData(p, "bpe")
        return

    def offline(name: str) -> None:
        raise ConnectionError("no network")

    monkeypatch.setattr(tiktoken, "get_encoding", offline)
    with pytest.raises(ValueError, match=r"\.tiktoken rank file"):
        TextData(p, "bpe", 0.5)  # a clear message, not a traceback from requests


def test_bpe_rank_file_trains_and_round_trips(smoke: TrainConfig, tmp_path: Path) -> None:
    pytest.importorskip("tiktoken")
    from aiprime.moe.lm.data import BPETokenizer, tokenizer_from_json

    ranks = _rank_file(tmp_path)
    tok = BPETokenizer(str(ranks))
    assert tok.vocab_size == 262
    assert tok.encode(" the") == [259] and tok.encode("the") == [257]
    assert tok.decode(tok.encode(TEXT)) == TEXT
    # the checkpointed form carries the ranks, so it does not need the file any more
    saved = tok.to_json()
    ranks.unlink()
    again = tokenizer_from_json(json.loads(json.dumps(saved)))
    assert again.encode(TEXT) == tok.encode(TEXT)

    _rank_file(tmp_path)
    cfg_file = tmp_path / "bpe.toml"
    text = (CONFIGS / "smoke.toml").read_text()
    text = text.replace('path = ""', f"path = {json.dumps(smoke.data.path)}")
    text = text.replace('tokenizer = "char"', 'tokenizer = "bpe"\nbpe_encoding = "tiny.tiktoken"')
    cfg_file.write_text(text)
    cfg = load_config(cfg_file)  # the rank file resolves next to the config
    assert cfg.data.bpe_encoding == str(ranks.resolve())
    cfg.train.max_steps = 2
    train(cfg, tmp_path / "run")
    model, tok2 = load_for_inference(tmp_path / "run")
    assert model.config.vocab_size == 262 and tok2.encode(" the") == [259]
    out = model.generate(torch.tensor([tok2.encode("First")]), 5, top_k=1)
    assert out.shape == (1, len(tok2.encode("First")) + 5)


def test_config_rejects_unknown_keys(tmp_path: Path) -> None:
    p = tmp_path / "c.toml"
    p.write_text("[model]\nn_layers = 3\n")
    with pytest.raises(ValueError, match="n_layers"):
        load_config(p)
    p.write_text("[model.moe]\nn_expert = 3\n")
    with pytest.raises(ValueError, match="n_expert"):
        load_config(p)


def test_lr_schedule() -> None:
    o = TrainConfig().optim
    o = replace(o, lr=1.0, min_lr=0.1, warmup_steps=10)
    assert lr_at(0, o, 100) == pytest.approx(0.1)
    assert lr_at(9, o, 100) == pytest.approx(1.0)
    assert lr_at(55, o, 100) == pytest.approx(0.55)
    assert lr_at(100, o, 100) == pytest.approx(0.1) == lr_at(500, o, 100)


def test_training_decreases_loss(smoke: TrainConfig, tmp_path: Path) -> None:
    smoke.train.max_steps = 40
    smoke.train.eval_interval = 20
    smoke.train.ckpt_interval = 40
    res = train(smoke, tmp_path / "run")
    recs = read_metrics(tmp_path / "run")
    vals = [r["val_loss"] for r in recs if "val_loss" in r]
    assert res.step == 40 and len(vals) == 2
    assert recs[-1]["train_loss"] < recs[0]["train_loss"] - 0.5
    assert vals[-1] < math.log(smoke.model.vocab_size)  # better than uniform
    load = recs[-1]["expert_load"]
    assert len(load) == 1 and len(load[0]) == 4 and sum(load[0]) == pytest.approx(1.0)


def _comparable(recs: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in recs]


def test_resume_is_bit_for_bit(smoke: TrainConfig, tmp_path: Path) -> None:
    straight, split = tmp_path / "straight", tmp_path / "split"
    train(smoke, straight)
    first = train(smoke, split, stop_at=3)
    assert first.step == 3
    train(smoke, split, resume=True)
    assert _comparable(read_metrics(straight)) == _comparable(read_metrics(split))
    assert [r["step"] for r in read_metrics(split)] == [1, 2, 3, 4, 5, 6]
    for name in ("model.safetensors", "optimizer.safetensors"):
        a = load_file(str(straight / "checkpoint" / name))
        b = load_file(str(split / "checkpoint" / name))
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), (name, k)
    with pytest.raises(FileExistsError, match="--resume"):
        train(smoke, straight)


def test_nan_loss_stops_and_keeps_last_good_checkpoint(
    smoke: TrainConfig, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_forward = GPT.forward
    calls = {"train": 0}

    def poisoned(self: GPT, idx: torch.Tensor, targets: torch.Tensor | None = None):  # type: ignore[no-untyped-def]
        out = real_forward(self, idx, targets)
        if self.training:
            calls["train"] += 1
            if calls["train"] == 5 and out.loss is not None:
                out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(GPT, "forward", poisoned)
    run = tmp_path / "run"
    with pytest.raises(NonFiniteLossError, match="step 5") as ei:
        train(smoke, run)
    assert ei.value.step == 5 and ei.value.checkpoint_step == 4
    assert "last good checkpoint (step 4)" in str(ei.value)
    state = json.loads((run / "checkpoint" / "state.json").read_text())
    assert state["step"] == 4
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint", "config.json", "metrics.jsonl"]
    # The kept checkpoint resumes (with the poison gone) to the end.
    monkeypatch.setattr(GPT, "forward", real_forward)
    assert train(smoke, run, resume=True).step == 6


def test_checkpoint_is_safetensors_and_json_only(smoke: TrainConfig, tmp_path: Path) -> None:
    train(smoke, tmp_path / "run")
    ckpt = tmp_path / "run" / "checkpoint"
    names = sorted(p.name for p in ckpt.iterdir())
    assert names == ["model.safetensors", "optimizer.safetensors", "state.json", "tokenizer.json"]
    for p in ckpt.iterdir():
        if p.suffix == ".json":
            json.loads(p.read_text())
        else:
            assert load_file(str(p))
    model, tok = load_for_inference(tmp_path / "run")
    assert not model.training and tok.vocab_size == model.config.vocab_size


def test_cli_train_resume_generate(smoke: TrainConfig, tmp_path: Path) -> None:
    from aiprime import cli

    cfg_file = tmp_path / "smoke.toml"
    text = (CONFIGS / "smoke.toml").read_text()
    cfg_file.write_text(text.replace('path = ""', f"path = {json.dumps(smoke.data.path)}"))
    run = tmp_path / "run"
    runner = CliRunner()
    r = runner.invoke(
        cli.app, ["moe", "train", "--config", str(cfg_file), "--out", str(run), "--max-steps", "2"]
    )
    assert r.exit_code == 0, r.output
    r = runner.invoke(cli.app, ["moe", "train", "--config", str(cfg_file), "--out", str(run)])
    assert r.exit_code == 1 and "--resume" in r.output
    r = runner.invoke(
        cli.app, ["moe", "train", "--config", str(cfg_file), "--out", str(run), "--resume"]
    )
    assert r.exit_code == 0, r.output
    assert read_metrics(run)[-1]["step"] == 6
    r = runner.invoke(
        cli.app,
        [
            "moe",
            "generate",
            str(run),
            "--prompt",
            "First",
            "--max-new-tokens",
            "30",
            "--top-k",
            "1",
        ],
    )
    assert r.exit_code == 0, r.output
    assert r.output.startswith("First") and len(r.output.rstrip("\n")) >= 30


def test_cli_steps_fits_the_schedule(smoke: TrainConfig, tmp_path: Path) -> None:
    """--steps shortens the run *and* the LR schedule (unlike --max-steps)."""
    from aiprime import cli

    cfg_file = tmp_path / "smoke.toml"
    text = (CONFIGS / "smoke.toml").read_text()
    cfg_file.write_text(text.replace('path = ""', f"path = {json.dumps(smoke.data.path)}"))
    run = tmp_path / "run"
    args = ["moe", "train", "--config", str(cfg_file), "--out", str(run), "--steps", "4"]
    r = CliRunner().invoke(cli.app, args)
    assert r.exit_code == 0, r.output
    recs = read_metrics(run)
    assert recs[-1]["step"] == 4
    assert json.loads((run / "config.json").read_text())["train"]["max_steps"] == 4
    o = smoke.optim
    assert recs[-1]["lr"] == pytest.approx(lr_at(3, o, 4))  # the 4-step schedule, not 6
    assert lr_at(3, o, 4) != pytest.approx(lr_at(3, o, 6))
    r = CliRunner().invoke(cli.app, [*args[:-1], "0", "--out", str(tmp_path / "r0")])
    assert r.exit_code == 1 and "--steps" in r.output


def test_inspect_and_compare(smoke: TrainConfig, tmp_path: Path) -> None:
    from aiprime import cli
    from aiprime.moe.lm.inspect import expert_profiles, expert_token_counts

    runs = []
    for seed in (1, 2):
        smoke.train.seed = seed
        train(smoke, tmp_path / f"s{seed}")
        runs.append(tmp_path / f"s{seed}")
    model, tok = load_for_inference(runs[0])
    ids = torch.tensor(tok.encode(TEXT[:200]))
    counts = expert_token_counts(model, ids)
    n_used = (len(ids) // model.config.block_size) * model.config.block_size
    assert len(counts) == 1 and counts[0].shape == (tok.vocab_size, 4)
    assert int(counts[0].sum()) == n_used * 2  # top-2: two experts per token position
    profiles = expert_profiles(counts, tok.decode, top_k=2, top=3)
    assert len(profiles) == 4 and sum(p.load for p in profiles) == pytest.approx(1.0)
    assert all(0 < pc <= 1.0 + 1e-6 for p in profiles for _, _, pc in p.top)

    runner = CliRunner()
    r = runner.invoke(cli.app, ["moe", "inspect", str(runs[0]), "--json", str(tmp_path / "e.json")])
    assert r.exit_code == 0, r.output
    assert len(json.loads((tmp_path / "e.json").read_text())) == 4
    out = tmp_path / "cmp.json"
    r = runner.invoke(cli.app, ["moe", "compare", *map(str, runs), "--json", str(out)])
    assert r.exit_code == 0, r.output
    cmp = json.loads(out.read_text())
    assert len(cmp["runs"]) == 2 and len(cmp["groups"]) == 1
    g = cmp["groups"][0]
    assert g["runs"] == 2 and g["val_loss_std"] is not None and g["val_loss_std"] > 0


def _ddp_check(tmp_path: Path, out: str, *extra: str, timeout: int) -> str:
    """Run ``aiprime.moe.lm.ddp_check`` on 2 gloo processes; its stdout."""
    text = tmp_path / "input.txt"
    text.write_text(TEXT, encoding="utf-8")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
        "-m", "aiprime.moe.lm.ddp_check", "--config", str(CONFIGS / "smoke.toml"),
        "--text", str(text), "--out", str(tmp_path / out), *extra,
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    if proc.returncode != 0 and "DDP OK" in proc.stdout:
        # the check passed but gloo can abort while tearing down TCP pairs: retry once
        shutil.rmtree(tmp_path / out)
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


@pytest.mark.skipif(not torch.distributed.is_available(), reason="no torch.distributed")
def test_data_parallel_two_processes_resume_exactly(tmp_path: Path) -> None:
    assert "DDP OK world=2" in _ddp_check(tmp_path, "ddp", timeout=240)


@pytest.mark.skipif(not torch.distributed.is_available(), reason="no torch.distributed")
def test_expert_parallel_two_processes_match_data_parallel(tmp_path: Path) -> None:
    """EP training (experts sharded over 2 processes) resumes exactly, equals DP training
    up to float order, and checkpoints the full single-process layout (ddp_check asserts)."""
    stdout = _ddp_check(tmp_path, "ep", "--expert-parallel", timeout=300)
    assert "EP-LM OK world=2" in stdout
    model, _ = load_for_inference(tmp_path / "ep" / "straight")  # loads in one process
    moe = [m for m in model.modules() if isinstance(m, MoELayer)]
    assert moe and all(m.experts.n_experts == 4 for m in moe)


def test_expert_parallel_optimizer_state_shards_and_names(smoke: TrainConfig) -> None:
    from aiprime.moe.lm.expert_parallel import (
        expert_param_names,
        optimizer_param_names,
        shard_optimizer_state,
    )
    from aiprime.moe.lm.train import make_optimizer

    model = GPT(replace(smoke.model, vocab_size=20))
    names = expert_param_names(model)
    assert names == ["blocks.1.ffn.experts.w_in", "blocks.1.ffn.experts.w_out"]  # moe_every=2
    opt = make_optimizer(model, smoke.optim)
    out = model(torch.randint(20, (2, 8)), torch.randint(20, (2, 8)))
    (out.loss + out.aux_loss).backward()
    opt.step()
    pid_names = optimizer_param_names(opt, model)
    assert sorted(pid_names.values()) == sorted(n for n, _ in model.named_parameters())
    osd = opt.state_dict()
    half = shard_optimizer_state(osd, pid_names, names, rank=1, world=2)
    for pid, name in pid_names.items():
        full, part = osd["state"][pid]["exp_avg"], half["state"][pid]["exp_avg"]
        if name in names:  # rank 1 of 2 holds experts 2..3 of the 4
            assert part.shape[0] == 2 and torch.equal(part, full[2:])
        else:
            assert part is full
        assert torch.equal(half["state"][pid]["step"], osd["state"][pid]["step"])


def test_device_is_checked(smoke: TrainConfig, tmp_path: Path) -> None:
    smoke.train.device = "tpu"
    with pytest.raises(ValueError, match="'cpu' or 'cuda'"):
        train(smoke, tmp_path / "a")
    if not torch.cuda.is_available():
        smoke.train.device = "cuda"
        with pytest.raises(ValueError, match="CUDA is not available"):
            train(smoke, tmp_path / "b")
