"""Three tiny domain collections on the fake embedder, declared as routing experts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

DOMAIN_DOCS = {
    "cooking": [
        ("c1", "Knead the bread dough and let the yeast rise before baking in the oven."),
        ("c2", "Simmer the tomato sauce with garlic, basil and olive oil for the pasta."),
        ("c3", "Whisk eggs with sugar and flour to bake a sponge cake in the oven."),
    ],
    "astronomy": [
        ("a1", "The telescope observed a distant galaxy and its spiral arms of stars."),
        ("a2", "Planets orbit the star; the comet crossed the orbit of the outer planet."),
        ("a3", "A supernova is the explosion of a massive star at the end of its life."),
    ],
    "football": [
        ("f1", "The striker scored a goal after the midfielder passed the ball forward."),
        ("f2", "The goalkeeper saved the penalty kick and the referee blew the whistle."),
        ("f3", "The coach changed the team formation for the second half of the match."),
    ],
}

LABELLED = [
    ("bake bread in the oven with yeast", "cooking"),
    ("pasta sauce with garlic and basil", "cooking"),
    ("sugar eggs flour cake", "cooking"),
    ("oven baking dough", "cooking"),
    ("galaxy seen through a telescope", "astronomy"),
    ("comet orbit around the star", "astronomy"),
    ("supernova explosion of a star", "astronomy"),
    ("planets and stars in the galaxy", "astronomy"),
    ("striker scored a goal", "football"),
    ("goalkeeper saved the penalty", "football"),
    ("coach team formation match", "football"),
    ("referee whistle ball kick", "football"),
]


@pytest.fixture
def domain_home(home: Path, tmp_path: Path, fake_cls) -> Path:
    """A data directory with one collection per domain and a config declaring them."""
    from aiprime.config import load_settings
    from aiprime.rag.kb import KnowledgeBase

    emb = fake_cls()
    for name, docs in DOMAIN_DOCS.items():
        f = tmp_path / "corpora" / f"{name}.jsonl"
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text("".join(json.dumps({"_id": i, "text": t}) + "\n" for i, t in docs))
        kb = KnowledgeBase(load_settings(home), collection=name, embedder=emb, reranker=None)
        kb.ingest([f])
    experts = "\n".join(
        f'[[routing.experts]]\nname = "{n}"\ncollection = "{n}"\nmode = "hybrid"\nrerank = []\n'
        for n in DOMAIN_DOCS
    )
    (home / "config.toml").write_text(
        f"[routing]\nfallback_threshold = 0.4\nepochs = 200\n\n{experts}"
    )
    return home


@pytest.fixture
def labels_file(tmp_path: Path) -> Path:
    f = tmp_path / "labels.jsonl"
    f.write_text("".join(json.dumps({"query": q, "expert": e}) + "\n" for q, e in LABELLED))
    return f
