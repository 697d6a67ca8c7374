"""Features of (query, candidate) pairs for the learned re-ranker.

Everything is computed from the hit list of one query alone (retriever scores and ranks,
text overlap, position), so the same code serves training and search without the store.
"""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Sequence

import numpy as np

from aiprime.store import Hit

_WORD = re.compile(r"[a-z0-9]+")
STOPWORDS = frozenset(
    """a about above after again against all am an and any are as at be because been before
    being below between both but by can could did do does doing down during each few for from
    further had has have having he her here hers him his how i if in into is it its itself just
    me more most my no nor not of off on once only or other our out over own same she should so
    some such than that the their them then there these they this those through to too under
    until up very was we were what when where which while who whom why will with would you your
    """.split()  # noqa: SIM905
)
_SUFFIXES = (
    ("ational", "ate"), ("ization", "ize"), ("fulness", "ful"), ("iveness", "ive"),
    ("ousness", "ous"), ("ations", "ate"), ("ation", "ate"), ("ments", ""), ("ment", ""),
    ("ities", ""), ("ity", ""), ("ness", ""), ("ings", ""), ("ing", ""), ("ies", "y"),
    ("sses", "ss"), ("edly", ""), ("ed", ""), ("ly", ""), ("s", ""),
)  # fmt: skip


def stem(word: str) -> str:
    """A tiny suffix stripper (no stemming library is installed): enough to match
    'cells'/'cell' or 'regulated'/'regulating', which is all the overlap features need."""
    if len(word) <= 3 or word.isdigit():
        return word
    for suf, rep in _SUFFIXES:
        if word.endswith(suf) and len(word) - len(suf) + len(rep) >= 3:
            if suf == "s" and word.endswith(("ss", "us", "is")):
                break
            word = word[: len(word) - len(suf)] + rep
            break
    # A final 'e' goes too (Porter's step 5), so 'gene'/'genes', 'regulate'/'regulated'
    # and 'box'/'boxes' meet.
    return word[:-1] if word.endswith("e") and len(word) > 3 else word


def terms(text: str) -> list[str]:
    """Lower-cased, stop-word-free, stemmed tokens."""
    return [stem(w) for w in _WORD.findall(text.lower()) if w not in STOPWORDS]


FEATURES: tuple[str, ...] = (
    "dense",
    "dense_norm",
    "dense_z",
    "dense_log_rank",
    "has_dense",
    "bm25",
    "bm25_norm",
    "bm25_z",
    "bm25_log_rank",
    "has_bm25",
    "fused",
    "fused_log_rank",
    "query_overlap",
    "query_overlap_any",
    "bigram_overlap",
    "title_overlap",
    "chunk_log_index",
    "first_chunk",
    "log_length",
    "doc_chunks_in_list",
    "best_of_doc",
    "doc_best_fused",
)


def _norm(values: np.ndarray, present: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Min-max and z-score over the hits that have the score; 0 where it is missing."""
    mm = np.zeros_like(values)
    z = np.zeros_like(values)
    if present.any():
        v = values[present]
        lo, hi = float(v.min()), float(v.max())
        mm[present] = (v - lo) / (hi - lo) if hi - lo > 1e-12 else 1.0
        sd = float(v.std())
        z[present] = (v - v.mean()) / sd if sd > 1e-12 else 0.0
    return mm, z


def featurize(query: str, hits: Sequence[Hit], depth: int | None = None) -> np.ndarray:
    """One row of ``FEATURES`` per hit. A retriever that did not return a hit gives it
    score 0 and rank ``depth + 1``, so "missing" sits just below the last rank seen."""
    n = len(hits)
    out = np.zeros((n, len(FEATURES)), dtype=np.float64)
    if n == 0:
        return out
    depth = depth or n
    q_terms = set(terms(query))
    q_list = terms(query)
    q_bigrams = set(itertools.pairwise(q_list))
    col = {name: i for i, name in enumerate(FEATURES)}
    for name in ("dense", "bm25"):
        present = np.array([name in h.scores for h in hits])
        raw = np.array([h.scores.get(name, 0.0) for h in hits], dtype=np.float64)
        rank = np.array([h.scores.get(f"{name}_rank", depth + 1.0) for h in hits])
        mm, z = _norm(raw, present)
        out[:, col[name]] = raw
        out[:, col[f"{name}_norm"]] = mm
        out[:, col[f"{name}_z"]] = z
        out[:, col[f"{name}_log_rank"]] = np.log(rank)
        out[:, col[f"has_{name}"]] = present
    fused = np.array([h.score for h in hits], dtype=np.float64)
    out[:, col["fused"]] = fused
    out[:, col["fused_log_rank"]] = np.log(np.arange(1, n + 1))
    doc_count: dict[str, int] = {}
    doc_best: dict[str, float] = {}
    for h in hits:
        doc_count[h.doc_id] = doc_count.get(h.doc_id, 0) + 1
        doc_best[h.doc_id] = max(doc_best.get(h.doc_id, -math.inf), h.score)
    for i, h in enumerate(hits):
        toks = terms(h.text)
        t_set = set(toks)
        if q_terms:
            hit = q_terms & (t_set | set(terms(h.title)))
            out[i, col["query_overlap"]] = len(hit) / len(q_terms)
            out[i, col["query_overlap_any"]] = float(bool(hit))
            out[i, col["title_overlap"]] = len(q_terms & set(terms(h.title))) / len(q_terms)
        if q_bigrams:
            bigrams = set(itertools.pairwise(toks))
            out[i, col["bigram_overlap"]] = len(q_bigrams & bigrams) / len(q_bigrams)
        out[i, col["chunk_log_index"]] = math.log1p(max(h.chunk_index, 0))
        out[i, col["first_chunk"]] = float(h.chunk_index == 0)
        out[i, col["log_length"]] = math.log1p(len(h.text))
        out[i, col["doc_chunks_in_list"]] = math.log(doc_count[h.doc_id])
        out[i, col["best_of_doc"]] = float(h.score >= doc_best[h.doc_id])
        out[i, col["doc_best_fused"]] = doc_best[h.doc_id]
    return out
