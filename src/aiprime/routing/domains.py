"""The domain-expert data set: four collections and labelled queries, built reproducibly.

Collections: SciFact abstracts (the BEIR corpus as is), the fashion catalogue (one
document per product), Shakespeare passages (consecutive speeches, >= 100 words each) and
the project's own docs (paragraph groups of each ``docs/*.md`` section).

Queries, each labelled with its domain (the expert that should answer it) and judged:

* SciFact: the BEIR train / test queries and qrels, unchanged.
* Fashion: one attribute query per (gender, article type, colour) group, e.g. "white
  skirts for women"; every product of the group is relevant. Groups, not products, are
  split into train and test, so the same query text never appears in both.
* Shakespeare: the longest line (6-15 words, speaker removed) of a passage; that passage
  is relevant. Passages are split into train and test.
* Docs: the longest sentence (6-30 words) of a paragraph group; that group is relevant.
  Groups are split into train and test.

A split is a SHA-256 hash of the source's id, so no source document (or fashion group)
gives queries to both splits, and the construction needs no random state.
"""

from __future__ import annotations

import csv
import hashlib
import json
import re
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

DOMAINS = ("scifact", "fashion", "shakespeare", "docs")
TEST_FRACTION = 0.4
_SENT = re.compile(r"(?<=[.!?])\s+")


@dataclass
class LabelledQuery:
    qid: str
    query: str
    domain: str
    split: str
    qrels: dict[str, int] = field(default_factory=dict)


def split_of(key: str, test_fraction: float = TEST_FRACTION) -> str:
    """``"test"`` for a stable ``test_fraction`` of keys, else ``"train"``."""
    h = int(hashlib.sha256(key.encode()).hexdigest()[:8], 16)
    return "test" if h / 0xFFFFFFFF < test_fraction else "train"


def _every(items: list[LabelledQuery], cap: int | None) -> list[LabelledQuery]:
    """At most ``cap`` queries, spread evenly over the list (deterministic)."""
    if cap is None or len(items) <= cap:
        return items
    step = len(items) / cap
    return [items[int(i * step)] for i in range(cap)]


def fashion(csv_path: Path, cap: int | None = 400) -> tuple[list[dict], list[LabelledQuery]]:
    docs: list[dict] = []
    groups: dict[tuple[str, str, str], list[str]] = {}
    with csv_path.open(newline="") as f:
        for row in csv.DictReader(f):
            pid = f"fashion-{row['id']}"
            name = row["productDisplayName"].strip()
            text = (
                f"{name}. {row['gender']} {row['articleType']} in {row['baseColour']} "
                f"({row['masterCategory']}, {row['subCategory']}); season {row['season']}; "
                f"usage {row['usage']}."
            )
            docs.append({"_id": pid, "title": name, "text": text})
            key = (row["gender"], row["articleType"], row["baseColour"])
            if all(key):
                groups.setdefault(key, []).append(pid)
    queries: dict[str, list[LabelledQuery]] = {"train": [], "test": []}
    for (gender, article, colour), members in sorted(groups.items()):
        gkey = f"{gender}|{article}|{colour}"
        split = split_of(gkey)
        text = f"{colour.lower()} {article.lower()} for {gender.lower()}"
        qid = "fashion-q-" + hashlib.sha256(gkey.encode()).hexdigest()[:10]
        queries[split].append(LabelledQuery(qid, text, "fashion", split, dict.fromkeys(members, 1)))
    return docs, _every(queries["train"], cap) + _every(queries["test"], cap and cap // 2)


def _speeches(text: str) -> Iterable[list[str]]:
    for block in re.split(r"\n\s*\n", text):
        lines = [ln.strip() for ln in block.strip().split("\n") if ln.strip()]
        if len(lines) >= 2 and lines[0].endswith(":"):
            yield lines


def shakespeare(path: Path, cap: int | None = 400) -> tuple[list[dict], list[LabelledQuery]]:
    docs: list[dict] = []
    queries: dict[str, list[LabelledQuery]] = {"train": [], "test": []}
    buf: list[list[str]] = []
    words = 0

    def flush() -> None:
        nonlocal buf, words
        if not buf:
            return
        did = f"shakespeare-{len(docs)}"
        docs.append({"_id": did, "text": "\n\n".join("\n".join(s) for s in buf)})
        lines = [ln for s in buf for ln in s[1:] if 6 <= len(ln.split()) <= 15]
        if lines:
            best = max(lines, key=lambda ln: (len(ln.split()), ln))
            split = split_of(did)
            queries[split].append(LabelledQuery(f"{did}-q", best, "shakespeare", split, {did: 1}))
        buf, words = [], 0

    for speech in _speeches(path.read_text(encoding="utf-8")):
        buf.append(speech)
        words += sum(len(ln.split()) for ln in speech[1:])
        if words >= 100:
            flush()
    flush()
    return docs, _every(queries["train"], cap) + _every(queries["test"], cap and cap // 2)


def project_docs(docs_dir: Path) -> tuple[list[dict], list[LabelledQuery]]:
    docs: list[dict] = []
    queries: list[LabelledQuery] = []
    for md in sorted(docs_dir.glob("*.md")):
        if md.name == "routing.md":  # written by this experiment; kept out of its own data
            continue
        heading = md.stem
        paras: list[str] = []

        def flush(heading: str, paras: list[str], md: Path = md) -> None:
            groups: list[list[str]] = [[]]
            for p in paras:
                groups[-1].append(p)
                if sum(len(x.split()) for x in groups[-1]) >= 50:
                    groups.append([])
            for g in groups:
                body = "\n\n".join(g).strip()
                if len(body.split()) < 20:
                    continue
                did = f"docs-{md.stem}-{len(docs)}"
                docs.append({"_id": did, "title": f"{md.stem}: {heading}", "text": body})
                sents = [
                    s.strip()
                    for s in _SENT.split(body.replace("\n", " "))
                    if 6 <= len(s.split()) <= 30 and "|" not in s and "```" not in s
                ]
                if sents:
                    best = max(sents, key=lambda s: (len(s.split()), s))
                    split = split_of(did)
                    queries.append(LabelledQuery(f"{did}-q", best, "docs", split, {did: 1}))

        in_code = False
        for line in md.read_text(encoding="utf-8").split("\n\n"):
            stripped = line.strip()
            if stripped.count("```") % 2 == 1:
                in_code = not in_code
            if stripped.startswith("#") and not in_code:
                flush(heading, paras)
                heading, paras = stripped.lstrip("#").split("\n")[0].strip(), []
                rest = "\n".join(stripped.split("\n")[1:]).strip()
                if rest:
                    paras.append(rest)
            elif stripped:
                paras.append(stripped)
        flush(heading, paras)
    return docs, queries


def scifact(root: Path) -> list[LabelledQuery]:
    from aiprime.rag.beir import load_beir

    out: list[LabelledQuery] = []
    for split in ("train", "test"):
        data = load_beir(root, split)
        out += [
            LabelledQuery(f"scifact-{q}", t, "scifact", split, data.qrels[q])
            for q, t in data.queries.items()
        ]
    return out


def build_domain_data(shared: Path, docs_dir: Path, out_dir: Path) -> dict[str, object]:
    """Write ``corpora/{fashion,shakespeare,docs}.jsonl`` and ``queries.jsonl`` under
    ``out_dir``; returns the corpus paths per domain and query counts per split."""
    corpora = out_dir / "corpora"
    corpora.mkdir(parents=True, exist_ok=True)
    fdocs, fq = fashion(shared / "fashion" / "captions.csv")
    sdocs, sq = shakespeare(shared / "tinyshakespeare" / "input.txt")
    ddocs, dq = project_docs(docs_dir)
    paths: dict[str, str] = {"scifact": str((shared / "scifact" / "corpus.jsonl").resolve())}
    for name, docs in (("fashion", fdocs), ("shakespeare", sdocs), ("docs", ddocs)):
        p = corpora / f"{name}.jsonl"
        with p.open("w") as f:
            for d in docs:
                f.write(json.dumps(d) + "\n")
        paths[name] = str(p.resolve())
    queries = scifact(shared / "scifact") + fq + sq + dq
    with (out_dir / "queries.jsonl").open("w") as f:
        for q in queries:
            f.write(json.dumps(asdict(q)) + "\n")
    counts: dict[str, dict[str, int]] = {}
    for q in queries:
        counts.setdefault(q.domain, {"train": 0, "test": 0})[q.split] += 1
    docs_n = {"fashion": len(fdocs), "shakespeare": len(sdocs), "docs": len(ddocs)}
    return {"corpora": paths, "queries": counts, "documents": docs_n}


def load_queries(path: Path, split: str | None = None) -> list[LabelledQuery]:
    out = []
    with path.open() as f:
        for line in f:
            if line.strip():
                q = LabelledQuery(**json.loads(line))
                if split is None or q.split == split:
                    out.append(q)
    return out
