"""``QueryRouter``: the MoE gate reused for queries; fallback, capacity, training, feedback,
persistence."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from aiprime.moe import AuxFreeBalancer, TopKRouter
from aiprime.routing.router import QueryRouter

NAMES = ["a", "b", "c"]


def clusters(n_per: int = 40, dim: int = 8, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Three well separated unit-norm clusters, label = cluster."""
    rng = np.random.default_rng(seed)
    centres = np.eye(dim, dtype=np.float32)[:3] * 3.0
    x = np.concatenate([c + 0.3 * rng.standard_normal((n_per, dim)) for c in centres])
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    y = np.repeat(np.arange(3), n_per)
    return x.astype(np.float32), y


def test_reuses_the_moe_router_and_balancer() -> None:
    r = QueryRouter(NAMES, 8)
    assert isinstance(r.gate, TopKRouter)
    assert isinstance(r.balancer, AuxFreeBalancer)
    assert r.gate.d_model == 9  # the feature plus the constant 1 that acts as a prior


def test_fit_learns_separable_labels_and_routes_top1() -> None:
    x, y = clusters()
    r = QueryRouter(NAMES, 8, fallback_threshold=0.5)
    rep = r.fit(x, y, epochs=200, lr=0.05)
    assert rep["train_accuracy"] == 1.0
    xt, yt = clusters(seed=1)
    routes = r.route(xt)
    assert [rt.experts[0] for rt in routes] == yt.tolist()
    assert not any(rt.fallback for rt in routes)
    assert all(len(rt.experts) == 1 and rt.weights == [1.0] for rt in routes)


def test_untrained_router_is_unsure_and_falls_back_to_all() -> None:
    r = QueryRouter(NAMES, 8, fallback_threshold=0.5)
    routes = r.route(clusters()[0][:5])
    assert all(rt.fallback and sorted(rt.experts) == [0, 1, 2] for rt in routes)
    assert not any(rt.fallback for rt in r.route(clusters()[0][:5], fallback=False))


def test_top_k_two_returns_two_distinct_experts_with_normalised_gates() -> None:
    x, y = clusters()
    r = QueryRouter(NAMES, 8, top_k=2, fallback_threshold=0.0)
    r.fit(x, y, epochs=100)
    for rt, label in zip(r.route(x), y, strict=True):
        assert len(set(rt.experts)) == 2 and rt.experts[0] == label
        assert sum(rt.weights) == pytest.approx(1.0)


def test_capacity_reroutes_overflow_to_the_next_best_expert() -> None:
    x, y = clusters()
    r = QueryRouter(NAMES, 8, fallback_threshold=0.0)
    r.fit(x, y, epochs=200)
    batch = x[y == 0][:12]  # all prefer expert 0
    free = r.route(batch)
    assert all(rt.experts == [0] for rt in free)
    capped = r.route(batch, capacity_factor=1.0)  # C = ceil(12 * 1 / 3) = 4
    loads = np.bincount([rt.experts[0] for rt in capped], minlength=3)
    assert loads.max() <= 4 and loads.sum() == 12
    assert [rt.experts[0] for rt in capped[:4]] == [0, 0, 0, 0]  # first come, first served
    assert all(rt.rerouted for rt in capped[4:])


def test_balance_loss_pulls_probability_off_the_majority_expert() -> None:
    """Identical features, 90/10 labels: the balance loss must lower the majority's mass."""
    x = np.ones((100, 4), dtype=np.float32) / 2.0
    y = np.array([0] * 90 + [1] * 10)
    p = {}
    for alpha in (0.0, 1.0):
        r = QueryRouter(["a", "b"], 4, aux_loss_weight=alpha, z_loss_weight=0.0)
        r.fit(x, y, epochs=300, lr=0.05, weight_decay=0.0)
        p[alpha] = float(r.probabilities(x[:1])[0, 0])
    assert p[0.0] == pytest.approx(0.9, abs=0.02)
    assert p[1.0] < p[0.0] - 0.05


def test_sample_weights_change_the_decision() -> None:
    x = np.ones((20, 4), dtype=np.float32)
    y = np.array([0] * 15 + [1] * 5)
    w = np.array([1.0] * 15 + [10.0] * 5)
    r = QueryRouter(["cheap", "expensive"], 4, aux_loss_weight=0.0)
    r.fit(x, y, epochs=200)
    assert r.route(x[:1])[0].experts == [0]
    r.fit(x, y, sample_weight=w, epochs=200)
    assert r.route(x[:1])[0].experts == [1]


def test_soft_targets_are_accepted() -> None:
    x, y = clusters()
    soft = np.eye(3, dtype=np.float32)[y] * 0.8 + 0.2 / 3
    r = QueryRouter(NAMES, 8)
    r.fit(x, soft, epochs=150)
    assert (r.probabilities(x).argmax(1) == y).mean() == 1.0


def test_fit_rejects_bad_targets() -> None:
    x, _ = clusters(n_per=2)
    r = QueryRouter(NAMES, 8)
    with pytest.raises(ValueError, match="expert ids"):
        r.fit(x, [5] * len(x))
    with pytest.raises(ValueError, match="targets"):
        r.fit(x, [0])
    with pytest.raises(ValueError, match="dim"):
        r.route(np.zeros((1, 3), dtype=np.float32))


def test_feedback_moves_the_router_towards_accepted_and_away_from_rejected() -> None:
    x, y = clusters()
    r = QueryRouter(NAMES, 8, fallback_threshold=0.0)
    r.fit(x, y, epochs=100)
    q = x[0]  # cluster 0
    p0 = r.probabilities(q)[0]
    r.feedback(q, "a", relevant=False, lr=0.5)
    p1 = r.probabilities(q)[0]
    assert p1[0] < p0[0]
    for _ in range(30):
        r.feedback(q, "c", relevant=True, lr=0.5)
    assert r.route(q)[0].experts == [2]
    assert r.meta["feedback"] == 31
    with pytest.raises(ValueError, match="unknown expert"):
        r.feedback(q, "zzz")


def test_bias_balancing_spreads_a_skewed_stream() -> None:
    """All queries look alike; the aux-free bias must stop one expert taking everything."""
    x = np.tile(np.array([[1.0, 0.2, 0.0, 0.0]], dtype=np.float32), (30, 1))
    off = QueryRouter(["a", "b"], 4, fallback_threshold=0.0, bias_update_rate=0.0)
    on = QueryRouter(["a", "b"], 4, fallback_threshold=0.0, bias_update_rate=0.02)
    for r in (off, on):
        r.fit(x, [0] * 30, epochs=20, lr=0.01)  # mild preference for expert a
    for _ in range(50):
        on.route(x)
    share = np.mean([rt.experts[0] == 0 for rt in on.route(x)])
    assert np.mean([rt.experts[0] == 0 for rt in off.route(x)]) == 1.0
    assert share < 1.0
    assert float(on.balancer.bias[0]) < float(on.balancer.bias[1])


def test_save_and_load_round_trip_without_pickle(tmp_path: Path) -> None:
    x, y = clusters()
    r = QueryRouter(NAMES, 8, top_k=2, fallback_threshold=0.3, capacity_factor=1.5)
    r.fit(x, y, epochs=50)
    r.meta["embedder"] = "fake"
    d = r.save(tmp_path / "router")
    assert sorted(p.name for p in d.iterdir()) == ["router.json", "router.safetensors"]
    cfg = json.loads((d / "router.json").read_text())
    assert cfg["experts"] == NAMES and cfg["top_k"] == 2 and cfg["meta"]["embedder"] == "fake"
    r2 = QueryRouter.load(d)
    np.testing.assert_allclose(r2.probabilities(x), r.probabilities(x), rtol=1e-6)
    assert r2.capacity_factor == 1.5 and r2.fallback_threshold == 0.3
    assert torch.equal(r2.balancer.bias, r.balancer.bias)
    with pytest.raises(FileNotFoundError):
        QueryRouter.load(tmp_path / "missing")


def test_same_seed_same_router() -> None:
    a, b = QueryRouter(NAMES, 8, seed=3), QueryRouter(NAMES, 8, seed=3)
    assert torch.equal(a.gate.gate.weight, b.gate.gate.weight)


def test_balanced_class_weight_recovers_a_rare_expert() -> None:
    """90 vs 10 overlapping examples: unweighted, the rare expert is mostly swallowed."""
    rng = np.random.default_rng(0)
    x = np.concatenate(
        [rng.normal(0.0, 1.0, (180, 4)), rng.normal(0.0, 1.0, (20, 4)) + np.array([1.0, 0, 0, 0])]
    ).astype(np.float32)
    y = np.array([0] * 180 + [1] * 20)
    recall = {}
    for cw in (None, "balanced"):
        r = QueryRouter(["common", "rare"], 4, aux_loss_weight=0.0)
        r.fit(x, y, class_weight=cw, epochs=200)
        pred = r.probabilities(x).argmax(1)
        recall[cw] = float((pred[y == 1] == 1).mean())
    assert recall[None] < 0.3
    assert recall["balanced"] > recall[None] + 0.3
    with pytest.raises(ValueError, match="class_weight"):
        QueryRouter(["a", "b"], 4).fit(x, y, class_weight="bogus", epochs=1)
