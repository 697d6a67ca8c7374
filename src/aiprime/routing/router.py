"""``QueryRouter``: the MoE token router, applied to whole queries.

One implementation, two uses: the gate is :class:`aiprime.moe.TopKRouter`, training adds
:func:`aiprime.moe.load_balancing_loss` and :func:`aiprime.moe.router_z_loss` exactly as an
MoE layer does, and online balancing is :class:`aiprime.moe.AuxFreeBalancer`. What is
specific to queries lives here:

* the input is a feature vector per query (its embedding) with a constant 1 appended, so
  the bias-free MoE gate can learn a prior over experts (how common each domain is);
* a *fallback*: when the top probability is below ``fallback_threshold`` the router is
  unsure and the query goes to every expert (a wrong expert returns nothing useful, while
  searching all costs only latency);
* per-expert *capacity* within a batch re-routes overflow to the next-best expert instead
  of dropping it, because a query, unlike a token, has no residual path;
* ``fit`` learns from labelled queries (hard labels, soft targets or weighted examples),
  ``feedback`` takes one online SGD step from a user's verdict on an expert's results.

State is a safetensors file plus a JSON file; nothing is pickled.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from torch import Tensor, nn

from aiprime.config import RoutingSettings
from aiprime.moe import AuxFreeBalancer, TopKRouter, load_balancing_loss, router_z_loss

STATE_FILE = "router.safetensors"
META_FILE = "router.json"
FORMAT_VERSION = 1

F = TypeVar("F", bound=Callable[..., Any])


def single_threaded(fn: F) -> F:
    """Run on one intra-op thread: the router's matrices are tiny (queries x ~385), and on
    a loaded machine torch's thread pool made a 200-epoch fit 50x slower (30 s vs 0.6 s)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        n = torch.get_num_threads()
        if n == 1:
            return fn(*args, **kwargs)
        torch.set_num_threads(1)
        try:
            return fn(*args, **kwargs)
        finally:
            torch.set_num_threads(n)

    return wrapper  # type: ignore[return-value]


@dataclass
class Route:
    """Where one query goes: expert ids (best first), their gates, and all probabilities."""

    experts: list[int]
    weights: list[float]
    probs: list[float]
    fallback: bool = False
    rerouted: bool = False  # moved off a full expert by the capacity limit


class QueryRouter(nn.Module):
    """A small learnable gate over query features, balanced like an MoE router."""

    def __init__(
        self,
        experts: Sequence[str],
        dim: int,
        *,
        top_k: int = 1,
        fallback_threshold: float = 0.5,
        capacity_factor: float | None = None,
        aux_loss_weight: float = 0.01,
        z_loss_weight: float = 1e-3,
        bias_update_rate: float = 0.0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if len(experts) < 1:
            raise ValueError("a router needs at least one expert")
        if len(set(experts)) != len(experts):
            raise ValueError(f"expert names must be unique, got {list(experts)}")
        self.experts = list(experts)
        self.dim = dim
        self.fallback_threshold = fallback_threshold
        self.capacity_factor = capacity_factor
        self.aux_loss_weight = aux_loss_weight
        self.z_loss_weight = z_loss_weight
        self.seed = seed
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.gate = TopKRouter(dim + 1, len(experts), top_k=min(top_k, len(experts)))
        self.balancer = AuxFreeBalancer(len(experts), bias_update_rate)
        self.meta: dict[str, Any] = {"updates": 0, "feedback": 0, "trained_on": 0}

    @classmethod
    def from_settings(
        cls, experts: Sequence[str], dim: int, rs: RoutingSettings, seed: int = 0
    ) -> QueryRouter:
        return cls(
            experts,
            dim,
            top_k=rs.top_k,
            fallback_threshold=rs.fallback_threshold,
            capacity_factor=rs.capacity_factor,
            aux_loss_weight=rs.aux_loss_weight,
            z_loss_weight=rs.z_loss_weight,
            bias_update_rate=rs.bias_update_rate,
            seed=seed,
        )

    @property
    def n_experts(self) -> int:
        return len(self.experts)

    @property
    def top_k(self) -> int:
        return self.gate.top_k

    def index(self, expert: str) -> int:
        try:
            return self.experts.index(expert)
        except ValueError:
            raise ValueError(f"unknown expert {expert!r}; experts: {self.experts}") from None

    def _x(self, features: np.ndarray | Tensor) -> Tensor:
        x = torch.as_tensor(np.asarray(features, dtype=np.float32))
        if x.ndim == 1:
            x = x[None, :]
        if x.shape[-1] != self.dim:
            raise ValueError(f"features have dim {x.shape[-1]}, the router expects {self.dim}")
        return torch.cat([x, torch.ones(x.shape[0], 1)], dim=1)

    # -- inference ------------------------------------------------------------------------

    @torch.no_grad()
    @single_threaded
    def probabilities(self, features: np.ndarray | Tensor) -> np.ndarray:
        """Router probabilities ``[N, E]`` (softmax of the gate logits, no balancing bias)."""
        self.eval()
        return self.gate(self._x(features)).scores.numpy()

    @torch.no_grad()
    @single_threaded
    def route(
        self,
        features: np.ndarray | Tensor,
        *,
        top_k: int | None = None,
        capacity_factor: float | None = None,
        fallback: bool = True,
    ) -> list[Route]:
        """Route a batch of queries.

        ``top_k`` overrides the configured k. With ``capacity_factor`` (or the configured
        one) each expert takes at most ``ceil(cf * N * k / E)`` assignments, counted
        slot-major (every query's first choice before any second choice) as in the MoE
        layers; an assignment over capacity moves to the query's next-best expert with
        room. Fallback queries go to every expert and are not capacity-limited.
        """
        self.eval()
        k = min(top_k or self.top_k, self.n_experts)
        x = self._x(features)
        use_bias = self.balancer.update_rate > 0
        out = self.gate(x, selection_bias=self.balancer.bias if use_bias else None)
        scores = out.scores
        ranking = torch.argsort(
            scores + (self.balancer.bias if use_bias else 0.0), dim=-1, descending=True
        )
        n = scores.shape[0]
        cf = capacity_factor if capacity_factor is not None else self.capacity_factor
        cap = math.inf if cf is None else max(1, math.ceil(cf * n * k / self.n_experts))
        unsure = [fallback and float(scores[i].max()) < self.fallback_threshold for i in range(n)]
        load = [0] * self.n_experts
        chosen: list[list[int]] = [[] for _ in range(n)]
        moved = [False] * n
        for slot in range(k):
            for i in range(n):
                if unsure[i]:
                    continue
                for rank, e in enumerate(ranking[i].tolist()):
                    if e in chosen[i]:
                        continue
                    if load[e] < cap:
                        chosen[i].append(e)
                        load[e] += 1
                        moved[i] = moved[i] or rank > slot
                        break
        routes: list[Route] = []
        counts = torch.zeros(self.n_experts)
        for i in range(n):
            p = scores[i].tolist()
            if unsure[i] or not chosen[i]:
                order = ranking[i].tolist()
                routes.append(Route(order, [p[e] for e in order], p, fallback=True))
                counts += 1.0
                continue
            w = [p[e] for e in chosen[i]]
            total = sum(w)
            w = [v / total for v in w] if total > 0 else w
            routes.append(Route(chosen[i], w, p, rerouted=moved[i]))
            counts[chosen[i]] += 1.0
        if use_bias:
            self.balancer.update(counts)
        return routes

    # -- learning -------------------------------------------------------------------------

    def _loss(
        self, x: Tensor, targets: Tensor, weights: Tensor | None
    ) -> tuple[Tensor, dict[str, float]]:
        out = self.gate(x)
        logp = torch.log_softmax(out.logits, dim=-1)
        if targets.dtype == torch.long:
            nll = -logp.gather(1, targets[:, None])[:, 0]
        else:
            nll = -(targets * logp).sum(dim=-1)
        task = (nll * weights).sum() / weights.sum() if weights is not None else nll.mean()
        bal = load_balancing_loss(out.scores, out.indices, normalized=True)
        z = router_z_loss(out.logits)
        loss = task + self.aux_loss_weight * bal + self.z_loss_weight * z
        parts = {
            "task": float(task.detach()),
            "balance": float(bal.detach()),
            "z": float(z.detach()),
        }
        return loss, parts

    @single_threaded
    def fit(
        self,
        features: np.ndarray | Tensor,
        targets: Sequence[int] | np.ndarray | Tensor,
        *,
        sample_weight: np.ndarray | None = None,
        class_weight: str | None = None,
        epochs: int = 300,
        lr: float = 0.05,
        weight_decay: float = 1e-3,
    ) -> dict[str, Any]:
        """Full-batch Adam on labelled queries: cross-entropy to the label (an expert id,
        or a distribution ``[N, E]``) + ``aux_loss_weight`` x balance + z-loss.

        ``class_weight="balanced"`` weighs each example by ``N / (classes * count(label))``:
        with 809 SciFact and 24 docs queries the unweighted gate sent 25 of 30 docs test
        queries to SciFact (docs/routing.md). The balance loss does not fix that, and
        should not: it evens the *load*, which is right for interchangeable experts but
        would fight the labels when one domain really is rarer. ``sample_weight`` (e.g. the
        nDCG at stake) multiplies in, so costly mistakes count more.
        """
        x = self._x(features)
        t = torch.as_tensor(np.asarray(targets))
        t = t.long() if t.ndim == 1 else t.float()
        if t.shape[0] != x.shape[0]:
            raise ValueError(f"{x.shape[0]} feature rows but {t.shape[0]} targets")
        if t.ndim == 1 and (int(t.min()) < 0 or int(t.max()) >= self.n_experts):
            raise ValueError(f"targets must be expert ids in [0, {self.n_experts})")
        w = None if sample_weight is None else torch.as_tensor(sample_weight, dtype=torch.float32)
        if class_weight == "balanced" and t.ndim == 1:
            counts = torch.bincount(t, minlength=self.n_experts).float()
            present = int((counts > 0).sum())
            cw = (t.shape[0] / (present * counts.clamp_min(1.0)))[t]
            w = cw if w is None else w * cw
        elif class_weight not in (None, "none", "balanced"):
            raise ValueError(f"class_weight {class_weight!r}: use 'balanced' or None")
        opt = torch.optim.Adam(self.gate.parameters(), lr=lr, weight_decay=weight_decay)
        self.train()
        history: list[dict[str, float]] = []
        for epoch in range(epochs):
            opt.zero_grad()
            loss, parts = self._loss(x, t, w)
            loss.backward()
            opt.step()
            if epoch == 0 or epoch == epochs - 1 or (epoch + 1) % 50 == 0:
                history.append({"epoch": epoch + 1, "loss": float(loss.detach()), **parts})
        self.eval()
        self.meta["updates"] = int(self.meta.get("updates", 0)) + epochs
        self.meta["trained_on"] = int(x.shape[0])
        acc = None
        if t.ndim == 1:
            pred = self.probabilities(np.asarray(features, dtype=np.float32)).argmax(axis=1)
            acc = float((pred == t.numpy()).mean())
        return {
            "examples": int(x.shape[0]),
            "epochs": epochs,
            "train_accuracy": acc,
            "history": history,
        }

    @single_threaded
    def feedback(
        self,
        features: np.ndarray | Tensor,
        expert: int | str,
        relevant: bool = True,
        lr: float = 0.1,
    ) -> float:
        """One online SGD step from a verdict on ``expert``'s results for one query.

        Relevant/accepted: raise ``log p(expert)``; not relevant: raise ``log(1 - p)``.
        Small steps from a stream of such verdicts are what let the router follow a drift
        in the query mix without retraining. Returns the loss before the step.
        """
        e = self.index(expert) if isinstance(expert, str) else int(expert)
        if not 0 <= e < self.n_experts:
            raise ValueError(f"expert id {e} out of range")
        x = self._x(features)
        self.train()
        out = self.gate(x)
        logp = torch.log_softmax(out.logits, dim=-1)[:, e]
        # accepted: -log p; rejected: -log(1 - p)
        p_e = logp.exp().clamp(max=1 - 1e-6)
        loss = -logp.mean() if relevant else -torch.log1p(-p_e).mean()
        loss = loss + self.z_loss_weight * router_z_loss(out.logits)
        self.gate.zero_grad()
        loss.backward()
        with torch.no_grad():
            for p in self.gate.parameters():
                if p.grad is not None:
                    p.sub_(lr * p.grad)
        self.eval()
        self.meta["feedback"] = int(self.meta.get("feedback", 0)) + 1
        return float(loss.detach())

    # -- persistence ----------------------------------------------------------------------

    def config(self) -> dict[str, Any]:
        return {
            "format": FORMAT_VERSION,
            "experts": self.experts,
            "dim": self.dim,
            "top_k": self.top_k,
            "fallback_threshold": self.fallback_threshold,
            "capacity_factor": self.capacity_factor,
            "aux_loss_weight": self.aux_loss_weight,
            "z_loss_weight": self.z_loss_weight,
            "bias_update_rate": self.balancer.update_rate,
            "seed": self.seed,
            "meta": self.meta,
        }

    def save(self, directory: str | Path) -> Path:
        """``router.safetensors`` (gate weights, balancing bias) + ``router.json``; the
        JSON is written last through a temporary file so a reader never sees a mismatch."""
        from safetensors.torch import save_file

        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous() for k, v in self.state_dict().items()}
        tmp = d / (STATE_FILE + ".tmp")
        save_file(state, str(tmp))
        tmp.replace(d / STATE_FILE)
        tmpj = d / (META_FILE + ".tmp")
        tmpj.write_text(json.dumps(self.config(), indent=2))
        tmpj.replace(d / META_FILE)
        return d

    @classmethod
    def load(cls, directory: str | Path) -> QueryRouter:
        from safetensors.torch import load_file

        d = Path(directory)
        if not (d / META_FILE).is_file() or not (d / STATE_FILE).is_file():
            raise FileNotFoundError(f"{d}: no trained router ({META_FILE}, {STATE_FILE})")
        cfg = json.loads((d / META_FILE).read_text())
        if cfg.get("format") != FORMAT_VERSION:
            raise ValueError(f"{d}: router format {cfg.get('format')}, expected {FORMAT_VERSION}")
        r = cls(
            cfg["experts"],
            int(cfg["dim"]),
            top_k=int(cfg["top_k"]),
            fallback_threshold=float(cfg["fallback_threshold"]),
            capacity_factor=cfg["capacity_factor"],
            aux_loss_weight=float(cfg["aux_loss_weight"]),
            z_loss_weight=float(cfg["z_loss_weight"]),
            bias_update_rate=float(cfg["bias_update_rate"]),
            seed=int(cfg.get("seed", 0)),
        )
        r.load_state_dict(load_file(str(d / STATE_FILE)))
        r.meta = dict(cfg.get("meta", {}))
        r.eval()
        return r
