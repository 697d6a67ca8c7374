"""Shared fixtures for the RAG, store, embed, config and CLI tests.

Most tests use ``FakeEmbedder``: a hashed bag of words, fast and deterministic. Only the
tests that need real semantics use all-MiniLM-L6-v2, exported to ONNX once per session.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import re
from collections.abc import Sequence
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("LANCE_LOG", "error")

import numpy as np
import pytest
from typer.testing import CliRunner

REPO_ROOT = Path(__file__).resolve().parents[1]
_WORD = re.compile(r"\w+", re.UNICODE)


class FakeEmbedder:
    """Hashed bag of words, L2-normalised; counts how often and how much it encodes.

    ``count_tokens`` counts whitespace-separated words, so it is additive over pieces.
    """

    def __init__(self, dim: int = 32, model_id: str = "fake-hash", delay_s: float = 0.0) -> None:
        self.dim = dim
        self.model_id = model_id
        self.delay_s = delay_s
        self.calls = 0
        self.texts_encoded = 0
        self.seen: list[str] = []

    def _vec(self, text: str) -> np.ndarray:
        v = np.zeros(self.dim, dtype=np.float32)
        for w in _WORD.findall(text.lower()):
            h = int.from_bytes(hashlib.blake2b(w.encode(), digest_size=8).digest(), "little")
            v[h % self.dim] += 1.0 if (h >> 32) & 1 else -1.0
        n = float(np.linalg.norm(v))
        if n == 0.0:
            v[0] = 1.0
            return v
        return v / n

    def encode(
        self, texts: Sequence[str], batch_size: int | None = None, show_progress: bool = False
    ) -> np.ndarray:
        self.calls += 1
        self.texts_encoded += len(texts)
        self.seen.extend(texts)
        if self.delay_s:
            import time

            time.sleep(self.delay_s)
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        return np.stack([self._vec(t) for t in texts]).astype(np.float32)

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        return [len(t.split()) for t in texts]


@pytest.fixture
def fake_embedder() -> FakeEmbedder:
    return FakeEmbedder()


@pytest.fixture
def fake_cls() -> type[FakeEmbedder]:
    return FakeEmbedder


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh data directory; AIPRIME_* variables from the caller's shell are cleared."""
    for k in list(os.environ):
        if k.startswith("AIPRIME_"):
            monkeypatch.delenv(k)
    h = tmp_path / "home"
    monkeypatch.setenv("AIPRIME_HOME", str(h))
    return h


@pytest.fixture
def make_kb(home: Path):
    """``make_kb(embedder=None, **settings)``: a KnowledgeBase on the fake embedder."""
    from aiprime.config import load_settings
    from aiprime.rag.kb import KnowledgeBase

    def _make(embedder=None, **overrides):
        s = load_settings(home, **overrides)
        return KnowledgeBase(s, embedder=embedder or FakeEmbedder())

    return _make


@pytest.fixture
def cli_run(home: Path, monkeypatch: pytest.MonkeyPatch, fake_cls):
    import aiprime.embed
    import aiprime.embed.base
    import aiprime.rag.kb
    from aiprime import cli

    def fake_loader(settings, cached: bool = True):
        return fake_cls()

    for mod in (aiprime.embed.base, aiprime.embed, aiprime.rag.kb):
        monkeypatch.setattr(mod, "load_embedder", fake_loader)
    runner = CliRunner()
    return lambda *a: runner.invoke(cli.app, [str(x) for x in a], catch_exceptions=False)


# -- the real model, once per session ----------------------------------------------------


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    from aiprime.embed import resolve_model_path

    return resolve_model_path("all-MiniLM-L6-v2")


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Shared ONNX export directory, so each export happens once per session."""
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def minilm_onnx(minilm_dir: Path, models_dir: Path):
    from aiprime.embed.onnx import OnnxEmbedder

    return OnnxEmbedder.from_pretrained(
        minilm_dir, export_dir=models_dir / "onnx", quantize=False, threads=2
    )


@pytest.fixture(scope="session")
def minilm_tokens(minilm_dir: Path):
    """The real MiniLM token counter (tokenizer only, no model)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(minilm_dir))

    def count(texts: Sequence[str]) -> list[int]:
        enc = tok(list(texts), add_special_tokens=False, verbose=False)["input_ids"]
        return [len(x) for x in enc]

    return count


# -- a tiny BEIR dataset -----------------------------------------------------------------


def write_beir(root: Path, split_rows: dict[str, list[tuple[str, str, int]]] | None = None) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    corpus = [
        ("d1", "Photosynthesis", "Plants convert sunlight into chemical energy in chloroplasts."),
        ("d2", "Volcanoes", "Magma rises through the crust and erupts as lava."),
        ("d3", "Tides", "The moon's gravity pulls the oceans, causing tides."),
        ("d4", "Vaccines", "Vaccines train the immune system to recognise pathogens."),
        ("d5", "Glaciers", "Glaciers carve valleys as compacted snow slowly flows downhill."),
    ]
    with (root / "corpus.jsonl").open("w") as f:
        for i, t, x in corpus:
            f.write(json.dumps({"_id": i, "title": t, "text": x}) + "\n")
    queries = {
        "q1": "how do plants turn sunlight into energy",
        "q2": "what causes lava eruptions",
        "q3": "why do oceans have tides",
        "q4": "how does the immune system learn from vaccines",
        "q5": "how do glaciers shape valleys",
    }
    with (root / "queries.jsonl").open("w") as f:
        for q, t in queries.items():
            f.write(json.dumps({"_id": q, "text": t}) + "\n")
    rows = split_rows or {
        "test": [("q1", "d1", 1), ("q2", "d2", 1), ("q3", "d3", 1)],
        "train": [("q4", "d4", 1), ("q5", "d5", 1)],
    }
    (root / "qrels").mkdir(exist_ok=True)
    for split, rs in rows.items():
        with (root / "qrels" / f"{split}.tsv").open("w", newline="") as f:
            w = csv.writer(f, delimiter="\t")
            w.writerow(["query-id", "corpus-id", "score"])
            w.writerows(rs)
    return root


@pytest.fixture
def make_beir():
    """``make_beir(root)`` writes a 5-document BEIR folder (test: q1-q3, train: q4-q5)."""
    return write_beir


# -- routing: three tiny domain collections declared as experts (tests/routing_data.py) --


@pytest.fixture
def domain_home(home: Path, tmp_path: Path, fake_cls) -> Path:
    """A data directory with one collection per domain and a config declaring them."""
    from routing_data import DOMAIN_DOCS  # imported here: worker processes load this file

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
    from routing_data import LABELLED

    f = tmp_path / "labels.jsonl"
    f.write_text("".join(json.dumps({"query": q, "expert": e}) + "\n" for q, e in LABELLED))
    return f
