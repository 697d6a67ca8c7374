"""``aiprime route ...`` end to end through typer's runner, on the fake embedder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from aiprime import cli


@pytest.fixture
def run(domain_home: Path, cli_run):
    """``aiprime --home DOMAIN_HOME ...`` on the fake embedder (``cli_run`` in conftest)."""
    return lambda *args: cli_run("--home", domain_home, *args)


def test_route_commands_are_registered() -> None:
    r = CliRunner().invoke(cli.app, ["route", "--help"])
    assert r.exit_code == 0
    for cmd in ("experts", "train", "query", "feedback", "eval"):
        assert cmd in r.stdout


def test_train_query_feedback_round_trip(run, labels_file: Path, domain_home: Path) -> None:
    r = run("route", "experts", "--json")
    assert r.exit_code == 0, r.output
    info = json.loads(r.stdout)
    assert [e["name"] for e in info["experts"]] == ["cooking", "astronomy", "football"]
    assert info["router"] is None

    r = run("route", "query", "the striker scored the goal", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["fallback"] is True  # no router yet: every expert

    r = run("route", "train", labels_file)
    assert r.exit_code == 0, r.output
    assert "train accuracy 1.000" in r.stdout
    assert (domain_home / "models" / "router" / "router.safetensors").is_file()

    r = run("route", "query", "the striker scored the goal", "-k", "2", "--json")
    out = json.loads(r.stdout)
    assert out["experts"] == ["football"] and not out["fallback"]
    assert {h["expert"] for h in out["hits"]} == {"football"}

    r = run("route", "query", "anything", "--expert", "cooking")
    assert r.exit_code == 0 and "cooking" in r.stdout

    r = run(
        "route",
        "feedback",
        "the striker scored the goal",
        "--expert",
        "football",
        "--not-relevant",
        "--json",
    )
    assert r.exit_code == 0, r.output
    fb = json.loads(r.stdout)
    assert fb["prob_after"] < fb["prob_before"] and fb["feedback_total"] == 1


def test_errors_are_reported_not_raised(run, tmp_path: Path) -> None:
    r = run("route", "feedback", "q", "--expert", "nope")
    assert r.exit_code == 1 and "unknown expert" in r.output
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"query": "q"}\n')
    r = run("route", "train", bad)
    assert r.exit_code == 1 and "'expert'" in r.output
    r = run("route", "query", "q", "--expert", "nope")
    assert r.exit_code == 1 and "unknown expert" in r.output


def test_no_experts_declared(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    r = CliRunner().invoke(cli.app, ["--home", str(home), "route", "experts"])
    assert r.exit_code == 1 and "no experts declared" in r.output


def test_demo_runs_without_shared_data(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fake_cls, home: Path
) -> None:
    import aiprime.embed
    import aiprime.embed.base
    import aiprime.rag.kb
    from aiprime.routing.demo import run_demo

    for mod in (aiprime.embed.base, aiprime.embed, aiprime.rag.kb):
        monkeypatch.setattr(mod, "load_embedder", lambda s, cached=True: fake_cls())
    runner = CliRunner()
    codes: list[int] = []

    def run(*args: str) -> None:
        r = runner.invoke(cli.app, list(args), catch_exceptions=False)
        codes.append(r.exit_code)

    class Quiet:
        def print(self, *a: object, **k: object) -> None:
            pass

    h = run_demo(run, Quiet(), None, home=tmp_path / "demo")
    assert codes and all(c == 0 for c in codes)
    assert (h / "models" / "router" / "router.json").is_file()


def test_route_ask_answers_with_the_routed_expert(run, labels_file: Path) -> None:
    assert run("route", "train", labels_file).exit_code == 0
    r = run("route", "ask", "how long should the bread dough rise with yeast?", "--json")
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["expert"] == "cooking" and out["answered"]
    assert {c["doc_id"] for c in out["citations"]} <= {"c1", "c2", "c3"}
    assert "[1]" in out["text"]
    r = run("route", "ask", "anything", "--expert", "nosuch")
    assert r.exit_code == 1 and "unknown expert 'nosuch'" in r.output
