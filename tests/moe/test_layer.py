"""MoELayer forward and gradients against the naive reference, for every router mode."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from aiprime.moe import MoEConfig, MoELayer, update_bias_balancers

from .reference import naive_forward

BASE = MoEConfig(d_model=16, d_ff=8, n_experts=4, top_k=2, aux_loss_weight=0.0, z_loss_weight=0.0)

MODES = {
    "switch_k1": dict(top_k=1),
    "mixtral_k2": dict(top_k=2),
    "k2_no_renorm": dict(renormalize=False),
    "sigmoid_k3": dict(top_k=3, score_func="sigmoid"),
    "capacity_drop": dict(capacity_factor_train=0.5),
    "capacity_huge": dict(capacity_factor_train=100.0),
    "expert_choice": dict(router="expert_choice"),
    "expert_choice_cf2": dict(router="expert_choice", capacity_factor_train=2.0),
    "shared_gelu": dict(n_shared_experts=2, activation="gelu"),
    "fine_grained": dict(d_ff=4, n_experts=16, top_k=4),
    "odd_dims_fallback": dict(d_model=5, d_ff=3),
}


def _make(seed: int = 0, **overrides: object) -> MoELayer:
    torch.manual_seed(seed)
    layer = MoELayer(dataclasses.replace(BASE, **overrides))  # type: ignore[arg-type]
    with torch.no_grad():  # a sharper router than the default init makes routing decisive
        layer.router.gate.weight.normal_(0.0, 0.5)
    return layer


def _check(layer: MoELayer, x: torch.Tensor, atol: float = 1e-5) -> None:
    x1 = x.clone().requires_grad_(True)
    x2 = x.clone().requires_grad_(True)
    y, _ = layer(x1)
    g = torch.randn_like(y)
    (y * g).sum().backward()
    got = {n: p.grad.clone() for n, p in layer.named_parameters() if p.grad is not None}
    layer.zero_grad()
    ref = naive_forward(layer, x2)
    torch.testing.assert_close(y, ref, atol=atol, rtol=1e-4)
    (ref * g).sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad, atol=atol, rtol=1e-4)
    for name, p in layer.named_parameters():
        if p.grad is None:
            assert name not in got
            continue
        torch.testing.assert_close(got[name], p.grad, atol=atol, rtol=1e-4, msg=name)


@pytest.mark.parametrize("mode", sorted(MODES))
def test_matches_reference(mode: str) -> None:
    layer = _make(**MODES[mode])  # type: ignore[arg-type]
    x = torch.randn(2, 13, layer.config.d_model)
    _check(layer, x)


def test_eval_uses_eval_capacity() -> None:
    layer = _make(capacity_factor_train=0.25, capacity_factor_eval=None)
    x = torch.randn(24, 16)
    _, st = layer(x)
    assert float(st.dropped_fraction) > 0
    layer.eval()
    _, st = layer(x)
    assert float(st.dropped_fraction) == 0.0
    _check(layer, x)


@pytest.mark.parametrize("mode", ["switch_k1", "mixtral_k2", "expert_choice", "capacity_drop"])
def test_single_token(mode: str) -> None:
    layer = _make(**MODES[mode])  # type: ignore[arg-type]
    _check(layer, torch.randn(1, 16))


@pytest.mark.parametrize("cf", [None, 0.5])
def test_all_tokens_to_one_expert(cf: float | None) -> None:
    layer = _make(top_k=1, capacity_factor_train=cf)
    with torch.no_grad():  # expert 2 always wins: the others are empty
        layer.router.gate.weight.zero_()
        layer.router.gate.weight[2, 0] = 10.0
    x = torch.randn(12, 16)
    x[:, 0] = x[:, 0].abs() + 1.0
    _check(layer, x)
    _, st = layer(x)
    assert st.routed_per_expert.tolist() == [0, 0, 12, 0]
    assert int(st.dead_experts) == 3
    assert float(st.load_imbalance) == pytest.approx(4.0)
    if cf is None:
        assert st.tokens_per_expert.tolist() == [0, 0, 12, 0]
    else:  # capacity ceil(0.5 * 12 / 4) = 2, the rest pass through the residual as zeros
        assert st.tokens_per_expert.tolist() == [0, 0, 2, 0]
        assert float(st.dropped_fraction) == pytest.approx(10 / 12)
        y, _ = layer(x)
        assert torch.count_nonzero(y.abs().sum(-1)) == 2


def test_bias_balancing_matches_reference_and_updates() -> None:
    layer = _make(bias_balancing=True, bias_update_rate=0.5)
    x = torch.randn(20, 16)
    layer(x)
    assert update_bias_balancers(layer) == 1
    assert layer.balancer is not None and layer.balancer.bias.abs().sum() > 0
    _check(layer, x)


def test_stats_and_losses() -> None:
    layer = _make(aux_loss_weight=0.1, z_loss_weight=0.01)
    y, st = layer(torch.randn(3, 7, 16))
    assert y.shape == (3, 7, 16)
    assert int(st.routed_per_expert.sum()) == 21 * 2
    expected = 0.1 * st.balance_loss + 0.01 * st.z_loss
    torch.testing.assert_close(st.aux_loss, expected)
    assert st.aux_loss.requires_grad
    st.aux_loss.backward()
    assert layer.router.gate.weight.grad is not None
    d = st.to_dict("moe/")
    for key in ("moe/load_imbalance", "moe/load_cv", "moe/router_entropy", "moe/dropped_fraction"):
        assert key in d and isinstance(d[key], float)
    assert 1.0 <= d["moe/load_imbalance"] <= 4.0


def test_bfloat16_close_to_float32() -> None:
    layer = _make()
    x = torch.randn(32, 16)
    y32, _ = layer(x)
    layer16 = _make().to(torch.bfloat16)
    y16, _ = layer16(x.to(torch.bfloat16))
    assert y16.dtype == torch.bfloat16
    # routing can flip on near ties in bf16; compare the tokens whose routing agrees
    r32, _ = layer.route(x)
    r16, _ = layer16.route(x.to(torch.bfloat16))
    same = (r32.indices.sort(-1).values == r16.indices.sort(-1).values).all(-1)
    assert same.float().mean() > 0.8
    torch.testing.assert_close(y16.float()[same], y32[same], atol=0.1, rtol=0.05)
    y16.float().sum().backward()
    assert layer16.experts.w_in.grad is not None
    assert layer16.experts.w_in.grad.dtype == torch.bfloat16


def test_torch_compile_dropless() -> None:
    layer = _make()
    x = torch.randn(16, 16)
    compiled = torch.compile(layer, backend="aot_eager")
    y, _ = compiled(x)
    ref, _ = layer(x)
    torch.testing.assert_close(y, ref)


def test_config_validation_and_fine_grained() -> None:
    cfg = MoEConfig.fine_grained(d_model=32, dense_d_ff=64, n_experts=4, top_k=2, granularity=4)
    assert (cfg.n_experts, cfg.top_k, cfg.d_ff) == (16, 8, 16)
    assert cfg.top_k * cfg.d_ff == 2 * 64  # same active FLOPs as 4 experts of 64, top-2
    for bad in (
        dict(top_k=5),
        dict(router="hash"),
        dict(capacity_factor_train=0.0),
        dict(router="expert_choice", bias_balancing=True),
    ):
        with pytest.raises(ValueError):
            dataclasses.replace(BASE, **bad)  # type: ignore[arg-type]


def _grads(layer: MoELayer, xs: list[torch.Tensor], schedule: str) -> list[torch.Tensor]:
    """Gradients of every parameter and input under a call pattern:
    ``steps``: fwd+bwd three times; ``overlap``: two forwards whose graphs are alive
    together, then both backwards; ``twice``: the layer applied twice in one graph."""
    layer.zero_grad(set_to_none=True)
    ins = [x.clone().requires_grad_(True) for x in xs]
    g = torch.linspace(-1, 1, xs[0].numel()).view_as(xs[0])
    if schedule == "steps":
        for x in ins:
            (layer(x)[0] * g).sum().backward()
    elif schedule == "overlap":
        ys = [layer(x)[0] for x in ins[:2]]
        for y in ys:
            (y * g).sum().backward()
    else:
        y, _ = layer(ins[0])
        (layer(y + ins[1])[0] * g).sum().backward()
    out = [p.grad.clone() for p in layer.parameters() if p.grad is not None]
    return out + [x.grad.clone() for x in ins if x.grad is not None]


@pytest.mark.parametrize("mode", ["mixtral_k2", "fine_grained", "capacity_drop", "late_gates"])
@pytest.mark.parametrize("schedule", ["steps", "overlap", "twice"])
def test_cpu_workspace_never_changes_gradients(mode: str, schedule: str) -> None:
    overrides = dict(d_ff=32) if mode == "late_gates" else MODES[mode]  # f > d: gates in combine
    layer = _make(**overrides)  # type: ignore[arg-type]
    plain = copy.deepcopy(layer)
    plain.experts.workspace = None
    torch.manual_seed(1)
    xs = [torch.randn(12, 16) for _ in range(3)]
    got, ref = _grads(layer, xs, schedule), _grads(plain, xs, schedule)
    assert len(got) == len(ref)
    for a, b in zip(got, ref, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_cpu_workspace_reuses_free_buffers_only() -> None:
    from aiprime.moe.workspace import Workspace

    ws = Workspace()
    like = torch.empty(0)
    p = ws.take((4, 8), like).data_ptr()
    assert ws.take((4, 8), like).data_ptr() == p  # nothing holds it any more: reused
    x = torch.randn(4, 8, requires_grad=True)
    y = x * ws.take((4, 8), like)  # autograd saves it
    assert ws.take((4, 8), like).data_ptr() != p
    del y
    assert ws.take((4, 8), like).data_ptr() == p  # the graph is gone: free again
    view = ws.take((4, 8), like)[:2]
    assert ws.take((4, 8), like).data_ptr() != p  # a live view holds it
    del view
    kept = [ws.take((4, 8), like)]  # held from Python only (e.g. a hook that stored it)
    assert ws.take((4, 8), like).data_ptr() != kept[0].data_ptr() == p
    assert ws.take((4, 16), like).shape == (4, 16)  # another shape: another buffer
    assert ws.nbytes() == 4 * (32 + 32 + 64)
    # a model's steps reuse the same buffers. Two layers share the pool: the gathered
    # inputs [N·k, d] and SwiGLU outputs [N·k, f] of both are alive until the backward (4
    # buffers); the gradients [N·k, d] and [N·k, 2f] (one shape here) come one at a time
    # and share a fifth
    layers = [_make(d_model=16, d_ff=8, n_experts=16, top_k=4) for _ in range(2)]
    ws = Workspace()
    for layer in layers:
        layer.experts.workspace = ws
    x = torch.randn(12, 16)
    ptrs = []
    for _ in range(3):
        h = x.clone().requires_grad_(True)
        for layer in layers:
            h = h + layer(h)[0]
        h.sum().backward()
        ptrs.append(sorted(e[0].data_ptr() for pool in ws._local.pools.values() for e in pool))
    assert len(ptrs[0]) == 5 and ptrs[0] == ptrs[1] == ptrs[2]
    assert copy.deepcopy(layers[0]).experts.workspace is ws


def test_cpu_workspace_across_inference_mode_and_training() -> None:
    # buffers made under inference_mode are inference tensors, which training cannot write
    layer = _make(**MODES["fine_grained"])  # type: ignore[arg-type]
    x = torch.randn(12, 16)
    with torch.inference_mode():
        expected, _ = layer(x)
    y, _ = layer(x.clone().requires_grad_(True))
    y.sum().backward()
    with torch.inference_mode():
        again, _ = layer(x)
    torch.testing.assert_close(y.detach(), expected)
    torch.testing.assert_close(again, expected)
