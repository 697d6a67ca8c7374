"""Train-split-only check of the router's class weighting (docs/routing.md): 4-fold
cross-validation over the domain experiment's *train* queries, per-domain recall of the
unweighted and the class-balanced router. Touches no test query.

    python benchmarks/routing_class_weight_cv.py --home out/routehome
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> None:
    import numpy as np

    from aiprime.config import load_settings
    from aiprime.routing.domains import DOMAINS, load_queries
    from aiprime.routing.pipeline import RoutedSearch
    from aiprime.routing.router import QueryRouter

    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--home", type=Path, default=Path("out/routehome"))
    p.add_argument("--folds", type=int, default=4)
    p.add_argument("--out", type=Path, default=Path("out/routing/class_weight_cv.json"))
    a = p.parse_args()
    s = load_settings(a.home)
    rs = RoutedSearch(s)
    train = load_queries(a.home / "queries.jsonl", "train")
    x = rs.features([q.query for q in train])
    y = np.array([rs.names.index(q.domain) for q in train])
    fold = np.array(
        [int(hashlib.sha256(q.qid.encode()).hexdigest()[:8], 16) % a.folds for q in train]
    )
    out = {}
    for cw in ("none", "balanced"):
        pred = np.empty_like(y)
        for f in range(a.folds):
            r = QueryRouter.from_settings(rs.names, x.shape[1], s.routing)
            tr = fold != f
            r.fit(
                x[tr],
                y[tr],
                class_weight=cw,
                epochs=s.routing.epochs,
                lr=s.routing.lr,
                weight_decay=s.routing.weight_decay,
            )
            pred[~tr] = r.probabilities(x[~tr]).argmax(1)
        out[cw] = {
            "accuracy": float((pred == y).mean()),
            "recall": {
                d: float((pred[y == i] == i).mean()) for i, d in enumerate(rs.names) if d in DOMAINS
            },
        }
        print(cw, json.dumps(out[cw]), flush=True)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
