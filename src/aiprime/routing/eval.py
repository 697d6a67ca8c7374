"""The routing experiments of docs/routing.md: domain experts, cost/quality, drift.

Every router here is trained on train-split queries only; test queries are only scored
(the drift stream is the exception by design: it measures *online* learning, so each
query is scored before the router learns from its feedback, i.e. prequentially).
"""

from __future__ import annotations

import json
import math
import random
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from aiprime.config import load_settings
from aiprime.plots import pyplot, save
from aiprime.routing.domains import DOMAINS, LabelledQuery, load_queries
from aiprime.routing.router import QueryRouter
from aiprime.store import Hit

Ranked = list[tuple[str, str]]  # (domain, doc_id), best first


def ndcg_per_query(ranked: dict[str, Ranked], qrels: dict[str, dict[str, int]]) -> dict[str, float]:
    """nDCG@10 per query with pytrec_eval; documents are keyed ``domain:doc_id`` so equal
    ids from two collections never collide."""
    import pytrec_eval

    run: dict[str, dict[str, float]] = {}
    for q, items in ranked.items():
        seen: dict[str, float] = {}
        for dom, did in items:
            key = f"{dom}:{did}"
            if key not in seen:
                seen[key] = -float(len(seen))  # rank order, no ties
        run[q] = dict(list(seen.items())[:100])
    ev = pytrec_eval.RelevanceEvaluator(qrels, {"ndcg_cut.10"})
    per = ev.evaluate({q: run.get(q, {}) for q in qrels})
    return {q: per.get(q, {}).get("ndcg_cut_10", 0.0) for q in qrels}


def _latency(ms: Sequence[float]) -> dict[str, float]:
    s = sorted(ms)
    return {
        "mean_ms": statistics.fmean(s),
        "p50_ms": s[len(s) // 2],
        "p95_ms": s[min(len(s) - 1, int(0.95 * len(s)))],
    }


# -- 1. domain experts -------------------------------------------------------------------


def domain_experiment(
    home: Path, queries_path: Path, out_dir: Path, limit: int | None = None, seed: int = 0
) -> dict[str, Any]:
    """Routing accuracy, nDCG@10 and latency: routed vs one merged index vs search-all+fuse
    (and oracle routing as the ceiling), on the test split of every domain."""
    from aiprime.rag.kb import KnowledgeBase
    from aiprime.routing.pipeline import RoutedSearch

    base = load_settings(home)
    train = load_queries(queries_path, "train")
    test = load_queries(queries_path, "test")
    if limit is not None:
        test = [q for d in DOMAINS for q in [x for x in test if x.domain == d][:limit]]
    # two routers: the configured one (class-balanced labels) and the unweighted ablation
    variants = {"routed": "balanced", "routed_unweighted": "none"}
    searches: dict[str, RoutedSearch] = {}
    routing: dict[str, Any] = {}
    embedder = None
    for name, cw in variants.items():
        cfg = base.model_copy(
            update={"routing": base.routing.model_copy(update={"class_weight": cw})}
        )
        rs = RoutedSearch(cfg, embedder=embedder)
        embedder = rs.embedder.inner  # one model; each RoutedSearch its own query memo
        t0 = time.perf_counter()
        report = rs.train(
            [q.query for q in train], [q.domain for q in train], seed=seed, save=False
        )
        train_s = time.perf_counter() - t0
        assert rs.router is not None
        rs.router.save(out_dir / f"router_domains_{name}")
        searches[name] = rs
        routing[name] = _routing_stats(rs, test, report, train_s)
    rs = searches["routed"]
    # the merged index embeds its query itself (no memo), like a plain KnowledgeBase
    merged = KnowledgeBase(base, collection="merged", embedder=rs.embedder.inner, reranker=None)
    source_domain: dict[str, str] = {}
    for e in rs.experts:
        for src in e.kb.sources():
            source_domain[src] = e.name

    systems = ("routed", "routed_unweighted", "oracle", "merged", "search_all", "search_all_gated")
    ranked: dict[str, dict[str, Ranked]] = {s: {} for s in systems}
    latency: dict[str, list[float]] = {s: [] for s in systems}
    route_ms: dict[str, list[float]] = {"routed": [], "routed_unweighted": []}
    experts_called: dict[str, list[int]] = {"routed": [], "routed_unweighted": []}
    qrels = {q.qid: {f"{q.domain}:{d}": r for d, r in q.qrels.items()} for q in test}

    def since(t: float) -> float:
        return 1000 * (time.perf_counter() - t)

    def start() -> float:
        """Every timed system embeds its query: forget vectors remembered by another."""
        for r in searches.values():
            r.embedder.forget()
        return time.perf_counter()

    for q in test:
        for name in variants:
            t = start()
            res = searches[name].search(q.query, k=100)
            latency[name].append(since(t))
            route_ms[name].append(res.ms["route"])
            experts_called[name].append(len(res.experts))
            ranked[name][q.qid] = [(h.expert, h.hit.doc_id) for h in res.hits]
        t = start()
        res = rs.search(q.query, k=100, experts=[q.domain])
        latency["oracle"].append(since(t))
        ranked["oracle"][q.qid] = [(h.expert, h.hit.doc_id) for h in res.hits]
        t = start()
        hits: list[Hit] = merged.search(q.query, k=100, rerank=False)
        latency["merged"].append(since(t))
        ranked["merged"][q.qid] = [(source_domain.get(h.source, "?"), h.doc_id) for h in hits]
        for system, gated in (("search_all", False), ("search_all_gated", True)):
            t = start()
            res = rs.search_all(q.query, k=100, gated=gated)
            latency[system].append(since(t))
            ranked[system][q.qid] = [(h.expert, h.hit.doc_id) for h in res.hits]
    results: dict[str, Any] = {}
    for s in systems:
        per = ndcg_per_query(ranked[s], qrels)
        by_dom = {d: float(np.mean([per[q.qid] for q in test if q.domain == d])) for d in DOMAINS}
        results[s] = {
            "ndcg@10": float(np.mean(list(per.values()))),
            "ndcg@10_macro": float(np.mean(list(by_dom.values()))),
            "ndcg@10_by_domain": by_dom,
            **_latency(latency[s]),
        }
    for name in variants:
        results[name]["experts_per_query"] = float(np.mean(experts_called[name]))
        results[name]["route_mean_ms"] = float(np.mean(route_ms[name]))
    out = {
        "experiment": "domains",
        "home": str(home),
        "train_queries": {d: sum(q.domain == d for q in train) for d in DOMAINS},
        "test_queries": {d: sum(q.domain == d for q in test) for d in DOMAINS},
        "router": routing["routed"],
        "router_unweighted": routing["routed_unweighted"],
        "systems": results,
        "chunks": {e.name: e.kb.store.count() for e in rs.experts}
        | {"merged": merged.store.count()},
        "note": "every system embeds its query once (routed: for the gate, reused by the "
        "expert); all run hybrid retrieval without re-ranking; systems run one after "
        "another for each query on a shared, loaded CPU",
    }
    _write(out_dir / "domains.json", out)
    return out


def _routing_stats(
    rs: Any, test: list[LabelledQuery], report: dict[str, Any], train_s: float
) -> dict[str, Any]:
    x = rs.features([q.query for q in test])
    routes = rs.router.route(x)
    probs = rs.router.probabilities(x)
    names = rs.names
    argmax = [names[int(i)] for i in probs.argmax(axis=1)]
    pairs = list(zip(argmax, test, strict=True))
    return {
        "train_seconds": train_s,
        "train_accuracy": report["train_accuracy"],
        "accuracy_top1": float(np.mean([a == q.domain for a, q in pairs])),
        "accuracy_by_domain": {
            d: float(np.mean([a == q.domain for a, q in pairs if q.domain == d])) for d in DOMAINS
        },
        "fallback_rate": float(np.mean([r.fallback for r in routes])),
        "served_by_right_expert": float(
            np.mean(
                [
                    q.domain in [names[i] for i in r.experts]
                    for q, r in zip(test, routes, strict=True)
                ]
            )
        ),
        "confusion": {
            d: {e: sum(1 for a, q in pairs if q.domain == d and a == e) for e in names}
            for d in DOMAINS
        },
    }


# -- 2. cost / quality -------------------------------------------------------------------

SIGNALS = ("cheap_top1", "cheap_gap2", "cheap_gap10", "dense_top1", "dense_gap2", "overlap10")


def cheap_signals(row: dict[str, Any]) -> list[float]:
    """What the cheap retrievers already know about a query: score level and margins of
    BM25 and dense, and how much their top-10 documents agree (a query-performance
    predictor that costs two cheap searches, no cross-encoder)."""
    c = row["cheap_top"] + [0.0] * 10
    d = row["dense_top"] + [0.0] * 10
    top_c = list(row["cheap_run"])[:10]
    top_d = list(row["dense_run"])[:10]
    overlap = len(set(top_c) & set(top_d)) / 10.0
    return [c[0], c[0] - c[1], c[0] - c[9], d[0], d[0] - d[1], overlap]


def _curve(
    order: np.ndarray, cheap: np.ndarray, exp: np.ndarray, fractions: np.ndarray
) -> list[float]:
    """Mean nDCG when the first ``f * N`` queries of ``order`` go to the expensive expert."""
    out = []
    n = len(cheap)
    for f in fractions:
        m = round(float(f) * n)
        use = np.zeros(n, dtype=bool)
        use[order[:m]] = True
        out.append(float(np.where(use, exp, cheap).mean()))
    return out


def cost_experiment(
    rows_path: Path, home: Path, out_dir: Path, seed: int = 0, epochs: int = 300
) -> dict[str, Any]:
    """Train a 2-expert router on held-out train queries (label: did the expensive expert
    beat the cheap one; weight: by how much) and trace nDCG@10 against the fraction sent
    to the expensive expert on test, beside always-cheap, always-expensive, random and
    oracle routing."""
    from aiprime.embed import load_embedder
    from aiprime.routing.costdata import read_rows

    rows = list(read_rows(rows_path))
    train = [r for r in rows if r["split"] == "train"]
    test = [r for r in rows if r["split"] == "test"]
    if not train or not test:
        raise ValueError(f"{rows_path}: needs rows of both splits (collect them first)")
    emb = load_embedder(load_settings(home))

    def arrays(rs: list[dict[str, Any]]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        x = np.asarray(emb.encode([r["query"] for r in rs]), dtype=np.float32)
        s = np.asarray([cheap_signals(r) for r in rs], dtype=np.float32)
        c = np.asarray([r["cheap_ndcg"] for r in rs])
        e = np.asarray([r["expensive_ndcg"] for r in rs])
        return x, s, c, e

    xtr, str_, ctr, etr = arrays(train)
    xte, ste, cte, ete = arrays(test)
    mu, sd = str_.mean(axis=0), str_.std(axis=0) + 1e-6  # train statistics only
    gain = etr - ctr
    y = (gain > 0).astype(np.int64)
    w = np.abs(gain) + 0.05  # ties still teach "cheap is enough", large gains count more
    variants = {
        "embedding": (xtr, xte),
        "embedding+signals": (
            np.hstack([xtr, (str_ - mu) / sd]),
            np.hstack([xte, (ste - mu) / sd]),
        ),
    }
    fractions = np.round(np.linspace(0.0, 1.0, 21), 3)
    curves: dict[str, list[float]] = {}
    points: dict[str, dict[str, float]] = {}
    ms_cheap = float(np.mean([r["cheap_ms"] for r in test]))
    ms_exp = float(np.mean([r["expensive_ms"] for r in test]))
    ms_dense = float(np.mean([r["dense_ms"] for r in test]))
    for name, (a, b) in variants.items():
        router = QueryRouter(
            ["cheap", "expensive"],
            a.shape[1],
            top_k=1,
            fallback_threshold=0.0,
            aux_loss_weight=0.0,
            seed=seed,
        )
        router.fit(a, y, sample_weight=w, epochs=epochs, lr=0.05, weight_decay=1e-2)
        p = router.probabilities(b)[:, 1]
        curves[name] = _curve(np.argsort(-p, kind="stable"), cte, ete, fractions)
        use = p > 0.5
        extra = ms_cheap + ms_dense if name != "embedding" else 0.0
        points[name] = {
            "fraction_expensive": float(use.mean()),
            "ndcg@10": float(np.where(use, ete, cte).mean()),
            "mean_ms": float(extra + np.where(use, ms_exp, ms_cheap).mean()),
        }
        router.save(out_dir / f"router_cost_{name.replace('+', '_')}")
    curves["oracle"] = _curve(np.argsort(-(ete - cte), kind="stable"), cte, ete, fractions)
    curves["random"] = [float(cte.mean() + f * (ete.mean() - cte.mean())) for f in fractions]
    out = {
        "experiment": "cost",
        "rows": str(rows_path),
        "train_queries": len(train),
        "test_queries": len(test),
        "train_expensive_better": float(y.mean()),
        "test_expensive_better": float((ete > cte).mean()),
        "always_cheap": {"ndcg@10": float(cte.mean()), "mean_ms": ms_cheap},
        "always_expensive": {"ndcg@10": float(ete.mean()), "mean_ms": ms_exp},
        "fractions": fractions.tolist(),
        "curves": curves,
        "auc": {k: float(np.mean(v)) for k, v in curves.items()},
        "router_points": points,
        "signals": list(SIGNALS),
    }
    _write(out_dir / "cost.json", out)
    return out


# -- 3. drift ------------------------------------------------------------------------------

PHASE_A = {"scifact": 0.8, "docs": 0.1, "fashion": 0.05, "shakespeare": 0.05}
PHASE_B = {"scifact": 0.1, "docs": 0.0, "fashion": 0.45, "shakespeare": 0.45}


def _stream(
    pools: dict[str, list[LabelledQuery]], mix: dict[str, float], n: int, rng: random.Random
) -> list[LabelledQuery]:
    out = []
    for _ in range(n):
        d = rng.choices(list(mix), weights=list(mix.values()))[0]
        if not pools[d]:
            d = max(pools, key=lambda k: len(pools[k]) * mix[k])
        out.append(pools[d].pop())
    return out


def drift_experiment(
    home: Path,
    queries_path: Path,
    out_dir: Path,
    n_per_phase: int = 600,
    window: int = 50,
    seed: int = 0,
) -> dict[str, Any]:
    """A stream whose mix moves from SciFact/docs to fashion/Shakespeare halfway.

    The router starts trained on train-split SciFact and docs queries only (the new domains
    have experts but no labelled queries yet). Simulated users accept a result of the
    right expert when it was searched (top-1 or fallback) and reject the chosen expert's
    results otherwise; with online learning on, each verdict is one
    :meth:`QueryRouter.feedback` step. Accuracy is measured before the update.
    """
    from aiprime.routing.pipeline import RoutedSearch

    settings = load_settings(home)
    rs = RoutedSearch(settings)
    rng = random.Random(seed)
    train = [q for q in load_queries(queries_path, "train") if q.domain in ("scifact", "docs")]
    start = train[:: max(1, len(train) // 250)]
    used = {q.qid for q in start}
    pools: dict[str, list[LabelledQuery]] = {d: [] for d in DOMAINS}
    for q in load_queries(queries_path):
        if q.qid not in used:
            pools[q.domain].append(q)
    for p in pools.values():
        rng.shuffle(p)
    stream = _stream(pools, PHASE_A, n_per_phase, rng) + _stream(pools, PHASE_B, n_per_phase, rng)
    xs = rs.features([q.query for q in stream])
    x0 = rs.features([q.query for q in start])
    names = rs.names
    runs: dict[str, Any] = {}
    for mode in ("off", "on"):
        router = rs.new_router(seed)
        router.fit(
            x0,
            [router.index(q.domain) for q in start],
            epochs=settings.routing.epochs,
            lr=settings.routing.lr,
            weight_decay=settings.routing.weight_decay,
            class_weight=settings.routing.class_weight,
        )
        correct: list[bool] = []
        fallback: list[bool] = []
        load: list[list[float]] = []
        for i, q in enumerate(stream):
            r = router.route(xs[i])[0]
            chosen = [names[e] for e in r.experts]
            correct.append(names[int(np.argmax(r.probs))] == q.domain)
            fallback.append(r.fallback)
            load.append([1.0 / len(chosen) if n in chosen else 0.0 for n in names])
            if mode == "on":
                if q.domain in chosen:
                    router.feedback(xs[i], q.domain, True, lr=settings.routing.online_lr)
                else:
                    for e in chosen:
                        router.feedback(xs[i], e, False, lr=settings.routing.online_lr)
        nwin = math.ceil(len(stream) / window)
        runs[mode] = {
            "accuracy": [
                float(np.mean(correct[w * window : (w + 1) * window])) for w in range(nwin)
            ],
            "fallback": [
                float(np.mean(fallback[w * window : (w + 1) * window])) for w in range(nwin)
            ],
            "load": {
                n: [
                    float(np.mean([ld[j] for ld in load[w * window : (w + 1) * window]]))
                    for w in range(nwin)
                ]
                for j, n in enumerate(names)
            },
            "accuracy_phase_a": float(np.mean(correct[:n_per_phase])),
            "accuracy_phase_b": float(np.mean(correct[n_per_phase:])),
            "accuracy_last_window": float(np.mean(correct[-window:])),
        }
    truth = {
        n: [
            float(np.mean([q.domain == n for q in stream[w * window : (w + 1) * window]]))
            for w in range(math.ceil(len(stream) / window))
        ]
        for n in names
    }
    out = {
        "experiment": "drift",
        "window": window,
        "n_per_phase": n_per_phase,
        "phase_a": PHASE_A,
        "phase_b": PHASE_B,
        "initial_training_queries": len(start),
        "true_mix": truth,
        "runs": runs,
    }
    _write(out_dir / "drift.json", out)
    return out


# -- plots -----------------------------------------------------------------------------------


def _write(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2))


def plot_cost(res: dict[str, Any], path: Path) -> Path:
    plt = pyplot("the routing evaluation plots")

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    f = res["fractions"]
    styles = {"embedding": "-o", "embedding+signals": "-s", "oracle": ":", "random": "--"}
    for name, ys in res["curves"].items():
        ax.plot(
            f,
            ys,
            styles.get(name, "-"),
            ms=3,
            label=f"router: {name}" if name.startswith("embedding") else name,
        )
    ax.scatter(
        [0], [res["always_cheap"]["ndcg@10"]], color="k", zorder=5, label="always cheap (BM25)"
    )
    ax.scatter(
        [1],
        [res["always_expensive"]["ndcg@10"]],
        color="r",
        zorder=5,
        label="always expensive (hybrid+CE)",
    )
    for name, pt in res["router_points"].items():
        ax.scatter([pt["fraction_expensive"]], [pt["ndcg@10"]], marker="*", s=120, zorder=6)
        ax.annotate(
            f"{name} @ p>0.5",
            (pt["fraction_expensive"], pt["ndcg@10"]),
            fontsize=7,
            xytext=(4, -10),
            textcoords="offset points",
        )
    ax.set_xlabel("fraction of test queries sent to the expensive expert")
    ax.set_ylabel("nDCG@10 (SciFact test)")
    ax.set_title("Cost/quality routing on SciFact")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    return save(fig, path, dpi=120)


def plot_drift(res: dict[str, Any], path: Path) -> Path:
    plt = pyplot("the routing evaluation plots")

    w = res["window"]
    fig, axes = plt.subplots(3, 1, figsize=(7, 8), sharex=True)
    n = len(res["runs"]["on"]["accuracy"])
    t = [(i + 1) * w for i in range(n)]
    ax = axes[0]
    for mode, style in (("on", "-o"), ("off", "-x")):
        ax.plot(t, res["runs"][mode]["accuracy"], style, ms=3, label=f"online learning {mode}")
    ax.axvline(res["n_per_phase"], color="gray", ls="--", lw=1)
    ax.set_ylabel(f"routing accuracy\n(window {w})")
    ax.set_ylim(-0.02, 1.02)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    for ax, mode in ((axes[1], "on"), (axes[2], "off")):
        for name, ys in res["runs"][mode]["load"].items():
            line = ax.plot(t, ys, "-", label=f"{name} load")[0]
            ax.plot(t, res["true_mix"][name], ":", color=line.get_color())
        ax.axvline(res["n_per_phase"], color="gray", ls="--", lw=1)
        ax.set_ylabel(f"expert load, online {mode}\n(dotted: true mix)")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7, ncol=4)
    axes[2].set_xlabel("queries in the stream (mix shifts at the dashed line)")
    fig.tight_layout()
    return save(fig, path, dpi=120)


def plot_domains(res: dict[str, Any], path: Path) -> Path:
    plt = pyplot("the routing evaluation plots")

    systems = list(res["systems"])
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.4), gridspec_kw={"width_ratios": [3, 2]})
    width = 0.8 / len(systems)
    for i, s in enumerate(systems):
        vals = [res["systems"][s]["ndcg@10_by_domain"][d] for d in DOMAINS]
        a1.bar(np.arange(len(DOMAINS)) + i * width, vals, width, label=s)
    a1.set_xticks(np.arange(len(DOMAINS)) + 0.4 - width / 2, DOMAINS)
    a1.set_ylabel("nDCG@10 (test)")
    a1.set_ylim(0, 1.25)
    a1.legend(fontsize=7, ncol=3, loc="upper center")
    a1.grid(axis="y", alpha=0.3)
    a2.bar(systems, [res["systems"][s]["p50_ms"] for s in systems])
    a2.set_ylabel("median latency per query (ms)")
    a2.tick_params(axis="x", labelrotation=35, labelsize=8)
    a2.grid(axis="y", alpha=0.3)
    fig.suptitle(f"Domain experts: router accuracy {res['router']['accuracy_top1']:.3f}")
    fig.tight_layout()
    return save(fig, path, dpi=120)
