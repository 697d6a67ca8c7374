"""The ``aiprime`` CLI, end to end through typer's runner, on the fake embedder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from aiprime import cli


@pytest.fixture
def run(home: Path, monkeypatch: pytest.MonkeyPatch, fake_cls):
    """``run(*args)`` invokes the CLI with the fake embedder patched in everywhere."""
    import aiprime.embed
    import aiprime.embed.base
    import aiprime.rag.kb

    made: list = []

    def fake_loader(settings, cached: bool = True):
        emb = fake_cls()
        made.append(emb)
        return emb

    for mod in (aiprime.embed.base, aiprime.embed, aiprime.rag.kb):
        monkeypatch.setattr(mod, "load_embedder", fake_loader)
    runner = CliRunner()

    def _run(*args: str):
        return runner.invoke(cli.app, [str(a) for a in args], catch_exceptions=False)

    _run.embedders = made  # type: ignore[attr-defined]
    return _run


@pytest.fixture
def docs(tmp_path: Path) -> Path:
    d = tmp_path / "docs"
    d.mkdir()
    (d / "alpha.txt").write_text("The aardvark digs burrows at night.")
    (d / "beta.md").write_text("# Bees\n\nBees build honeycomb from wax.")
    (d / "broken.pdf").write_bytes(b"definitely not a pdf")
    (d / "empty.txt").write_text("")
    return d


def test_help() -> None:
    r = CliRunner().invoke(cli.app, ["--help"])
    assert r.exit_code == 0
    for cmd in ("ingest", "remove", "search", "sources", "info", "eval"):
        assert cmd in r.stdout


def test_ingest_summary_and_skipped_lines(run, docs: Path) -> None:
    r = run("ingest", docs)
    assert r.exit_code == 0, r.output
    assert "ingested 2 file(s), 0 unchanged, 2 failed; 2 chunks written" in r.stdout
    skipped = [ln for ln in r.stderr.splitlines() if ln.startswith("skipped ")]
    assert len(skipped) == 2, r.stderr
    assert any(f"skipped {docs.resolve() / 'broken.pdf'}: corrupt PDF" in ln for ln in skipped)
    assert any(f"skipped {docs.resolve() / 'empty.txt'}: empty file" in ln for ln in skipped)

    r2 = run("ingest", docs, "--json")
    assert r2.exit_code == 0
    d = json.loads(r2.stdout)
    assert d["files_unchanged"] == 2 and d["files_ingested"] == 0 and d["files_failed"] == 2


def test_ingest_nothing_usable_fails(run, docs: Path) -> None:
    r = run("ingest", docs / "broken.pdf", docs / "missing.txt")
    assert r.exit_code == 1
    assert r.stderr.count("skipped ") == 2


def test_search_json(run, docs: Path) -> None:
    run("ingest", docs)
    r = run("search", "aardvark burrows", "--json", "-k", "3", "--mode", "bm25")
    assert r.exit_code == 0, r.output
    hits = json.loads(r.stdout)
    assert hits and hits[0]["source"] == str((docs / "alpha.txt").resolve())
    assert isinstance(hits[0]["score"], float) and hits[0]["score"] > 0
    assert hits[0]["scores"]["bm25_rank"] == 1.0
    assert {"text", "chunk_index", "start", "end", "page", "doc_id"} <= set(hits[0])
    hybrid = json.loads(run("search", "honeycomb", "--json").stdout)  # default mode: hybrid
    assert hybrid[0]["source"].endswith("beta.md") and "dense" in hybrid[0]["scores"]


def test_search_text_output(run, docs: Path) -> None:
    run("ingest", docs)
    r = run("search", "honeycomb wax", "--mode", "bm25")
    assert r.exit_code == 0
    assert "1." in r.stdout and "Bees" in r.stdout and "beta.md" in r.stdout


def test_search_on_empty_store(run) -> None:
    r = run("search", "anything")
    assert r.exit_code == 0 and "no results" in r.stdout


def test_ask_on_empty_store_refuses() -> None:
    # nothing retrieved: the signal is NaN, shown as "n/a", never as "nan"
    from aiprime.rag.answer import NO_ANSWER, Answer

    a = Answer("q", NO_ANSWER, False, [], "extractive", signal="dense", confidence=float("nan"))
    assert cli._confidence_line(a) is None  # no threshold: nothing to show
    a.threshold = 0.485
    line = cli._confidence_line(a)
    assert line is not None and "n/a (nothing retrieved)" in line and "nan" not in line
    a.confidence = 0.61
    assert cli._confidence_line(a) == "extractive · dense 0.610 (threshold 0.485)"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["search", "q", "--mode", "fuzzy"], "--mode 'fuzzy': choose bm25, dense or hybrid"),
        (["search", "   "], "query is empty"),
        (["remove"], "give paths to remove, or --missing"),
    ],
)
def test_usage_errors(run, args: list[str], message: str) -> None:
    r = run(*args)
    assert r.exit_code != 0
    assert "error:" in r.stderr and message in r.stderr
    assert "Traceback" not in r.output


def test_bad_k_is_rejected(run) -> None:
    r = run("search", "q", "-k", "0")
    assert r.exit_code != 0


def test_remove_and_sources(run, docs: Path) -> None:
    run("ingest", docs)
    srcs = json.loads(run("sources", "--json").stdout)
    assert sorted(Path(s["source"]).name for s in srcs) == ["alpha.txt", "beta.md"]
    assert all(s["chunks"] == 1 and len(s["source_hash"]) == 64 for s in srcs)
    table = run("sources").stdout  # full paths even when stdout is not a terminal
    assert f"{(docs / 'alpha.txt').resolve()}\t1\t" in table
    assert str((docs / "beta.md").resolve()) in table

    r = run("remove", docs / "alpha.txt")
    assert r.exit_code == 0
    assert f"removed {(docs / 'alpha.txt').resolve()}" in r.stdout
    assert "nothing matched" in run("remove", docs / "alpha.txt").stdout
    assert [Path(s["source"]).name for s in json.loads(run("sources", "--json").stdout)] == [
        "beta.md"
    ]
    (docs / "beta.md").unlink()
    r = run("remove", "--missing")
    assert "beta.md" in r.stdout
    assert json.loads(run("sources", "--json").stdout) == []


def test_info_and_home_option(run, home: Path, tmp_path: Path, docs: Path) -> None:
    r = run("info")
    d = json.loads(r.stdout)
    assert d["settings"]["home"] == str(home) and d["collections"] == []
    other = tmp_path / ("a-long-directory-name-" * 6) / "other-home"  # > 80 columns
    run("--home", other, "-c", "notes", "ingest", docs / "alpha.txt")
    d2 = json.loads(run("--home", other, "info").stdout)
    assert d2["settings"]["home"] == str(other) and d2["collections"] == ["notes"]
    assert json.loads(run("info").stdout)["collections"] == []  # env home untouched


def test_model_mismatch_is_a_clear_error(run, docs: Path, monkeypatch, fake_cls) -> None:
    run("ingest", docs / "alpha.txt")
    import aiprime.rag.kb

    monkeypatch.setattr(
        aiprime.rag.kb, "load_embedder", lambda s, cached=True: fake_cls(model_id="other-model")
    )
    r = run("search", "aardvark")
    assert r.exit_code == 1
    assert "error:" in r.stderr and "other-model" in r.stderr and "fake-hash" in r.stderr


def test_eval_beir_writes_json(run, tmp_path: Path, make_beir) -> None:
    root = make_beir(tmp_path / "tiny")
    out = tmp_path / "results" / "beir.json"
    r = run("eval", "beir", root, "--retriever", "bm25", "--out", out)
    assert r.exit_code == 0, r.output
    assert "ndcg@10" in r.stdout and "wrote" in r.stdout
    res = json.loads(out.read_text())
    for key in ("ndcg@10", "recall@100", "mrr@10"):
        assert 0.0 <= res[key] <= 1.0
    assert res["ndcg@10"] > 0.6 and res["queries"] == 3 and res["retriever"] == "bm25"


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--retriever", "sparse"], "choose bm25, dense or hybrid"),
        (["--tune-on", "test"], "refusing to tune on the split being reported"),
        (["--split", "dev"], "dev.tsv: missing"),
    ],
)
def test_eval_beir_errors(run, tmp_path: Path, make_beir, extra: list[str], message: str) -> None:
    root = make_beir(tmp_path / "tiny")
    r = run("eval", "beir", root, *extra)
    assert r.exit_code == 1
    assert message in r.stderr
