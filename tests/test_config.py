"""Settings: defaults, environment, config.toml, explicit overrides and validation."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from aiprime.config import ChunkSettings, Settings, default_home, load_settings


def test_defaults(home: Path) -> None:
    s = load_settings()
    assert s.home == home
    assert s.collection == "default"
    assert s.chunk.size_tokens == 200 and s.chunk.overlap_tokens == 32
    assert s.embed.model == "all-MiniLM-L6-v2" and s.embed.backend == "onnx-int8"
    assert s.retrieve.mode == "hybrid" and s.retrieve.fusion == "mix"
    assert s.retrieve.dense_weight == 0.5
    assert s.store_dir == home / "store"
    assert s.cache_dir == home / "cache"
    assert s.models_dir == home / "models"


def test_default_home_without_env_is_platform_dir(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AIPRIME_HOME", raising=False)
    import platformdirs

    assert default_home() == Path(platformdirs.user_data_dir("aiprime"))


def test_aiprime_home_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AIPRIME_HOME", str(tmp_path / "envhome"))
    assert load_settings().home == tmp_path / "envhome"


def test_explicit_home_beats_env(home: Path, tmp_path: Path) -> None:
    other = tmp_path / "explicit"
    assert load_settings(other).home == other
    assert load_settings(str(other)).home == other


def test_ensure_dirs(home: Path) -> None:
    s = load_settings()
    s.ensure_dirs()
    for d in (s.home, s.store_dir, s.cache_dir, s.models_dir):
        assert d.is_dir()


def test_nested_env(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AIPRIME_CHUNK__SIZE_TOKENS", "120")
    monkeypatch.setenv("AIPRIME_RETRIEVE__MODE", "bm25")
    s = load_settings()
    assert s.chunk.size_tokens == 120
    assert s.chunk.overlap_tokens == 32
    assert s.retrieve.mode == "bm25"


def test_config_toml_in_home(home: Path) -> None:
    home.mkdir(parents=True)
    (home / "config.toml").write_text(
        'collection = "notes"\n[chunk]\nsize_tokens = 300\noverlap_tokens = 10\n'
        '[retrieve]\nfusion = "rrf"\n'
    )
    s = load_settings()
    assert s.collection == "notes"
    assert s.chunk.size_tokens == 300 and s.chunk.overlap_tokens == 10
    assert s.retrieve.fusion == "rrf"


def test_config_toml_of_explicit_home(home: Path, tmp_path: Path) -> None:
    """``--home H`` reads H/config.toml, not the one of $AIPRIME_HOME."""
    home.mkdir(parents=True)
    (home / "config.toml").write_text('collection = "from-env-home"\n')
    other = tmp_path / "explicit"
    other.mkdir()
    (other / "config.toml").write_text('collection = "from-explicit-home"\n')
    assert load_settings(other).collection == "from-explicit-home"
    assert load_settings().collection == "from-env-home"


def test_precedence_explicit_env_toml(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    home.mkdir(parents=True)
    (home / "config.toml").write_text(
        'collection = "toml"\n[chunk]\nsize_tokens = 300\noverlap_tokens = 10\n'
    )
    monkeypatch.setenv("AIPRIME_CHUNK__SIZE_TOKENS", "250")
    monkeypatch.setenv("AIPRIME_COLLECTION", "env")
    s = load_settings()
    assert s.collection == "env"  # env beats toml
    assert s.chunk.size_tokens == 250  # env beats toml for a nested field ...
    assert s.chunk.overlap_tokens == 10  # ... and the toml's sibling field survives
    s2 = load_settings(collection="explicit", chunk={"size_tokens": 100, "overlap_tokens": 5})
    assert s2.collection == "explicit"
    assert s2.chunk.size_tokens == 100


def test_aiprime_config_points_elsewhere(
    home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = tmp_path / "custom.toml"
    cfg.write_text('[embed]\nbackend = "torch"\n')
    monkeypatch.setenv("AIPRIME_CONFIG", str(cfg))
    assert load_settings().embed.backend == "torch"


def test_invalid_toml_is_a_clear_error(home: Path) -> None:
    home.mkdir(parents=True)
    (home / "config.toml").write_text("[chunk\nsize_tokens = 3\n")
    with pytest.raises(ValueError, match=r"config\.toml: invalid TOML"):
        load_settings()


@pytest.mark.parametrize(("size", "overlap"), [(100, 100), (100, 150), (16, 32)])
def test_overlap_not_smaller_than_size(size: int, overlap: int) -> None:
    with pytest.raises(
        ValidationError, match=r"overlap_tokens .* must be smaller than size_tokens"
    ):
        ChunkSettings(size_tokens=size, overlap_tokens=overlap)


def test_overlap_error_from_env(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AIPRIME_CHUNK__SIZE_TOKENS", "32")
    monkeypatch.setenv("AIPRIME_CHUNK__OVERLAP_TOKENS", "32")
    with pytest.raises(ValidationError, match="must be smaller than size_tokens"):
        load_settings()


@pytest.mark.parametrize(
    "bad",
    [
        {"chunk": {"size_tokens": 8}},
        {"embed": {"backend": "tensorflow"}},
        {"retrieve": {"dense_weight": 1.5}},
        {"retrieve": {"mode": "fuzzy"}},
    ],
)
def test_out_of_range_values_rejected(home: Path, bad: dict) -> None:
    with pytest.raises(ValidationError):
        Settings(**bad)
