"""One typed settings object for the whole toolkit.

Precedence (highest first): explicit arguments, ``AIPRIME_*`` environment variables,
``$AIPRIME_HOME/config.toml``, defaults. Nested fields use ``__`` in the environment,
e.g. ``AIPRIME_CHUNK__SIZE_TOKENS=200``.
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Any, Literal

import platformdirs
from pydantic import BaseModel, Field, field_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

DEFAULT_EMBED_MODEL = "all-MiniLM-L6-v2"


def default_home() -> Path:
    """Data directory: ``$AIPRIME_HOME`` or the platform's user data directory."""
    env = os.environ.get("AIPRIME_HOME")
    return Path(env).expanduser() if env else Path(platformdirs.user_data_dir("aiprime"))


class ChunkSettings(BaseModel):
    size_tokens: int = Field(
        200, ge=16, le=4096, description="Target chunk length in model tokens."
    )
    overlap_tokens: int = Field(32, ge=0, description="Tokens shared by consecutive chunks.")

    @field_validator("overlap_tokens")
    @classmethod
    def _overlap_smaller(cls, v: int, info: Any) -> int:
        size = info.data.get("size_tokens", 200)
        if v >= size:
            raise ValueError(f"overlap_tokens ({v}) must be smaller than size_tokens ({size})")
        return v


class EmbedSettings(BaseModel):
    model: str = Field(DEFAULT_EMBED_MODEL, description="Name, local path or HF-cache id.")
    backend: Literal["torch", "onnx", "onnx-int8"] = "onnx-int8"
    batch_size: int = Field(64, ge=1, description="Most texts in one model call.")
    # ONNX backends: most tokens in one call. Small batches keep a batch's activations in
    # a core's cache: 512 is 1.2x faster than 64 texts of ~200 tokens (docs/results.md).
    batch_tokens: int = Field(512, ge=1, description="Most tokens in one ONNX model call.")
    max_seq_length: int = Field(256, ge=8)
    threads: int = Field(0, ge=0, description="CPU threads; 0 means all cores.")


class RetrieveSettings(BaseModel):
    mode: Literal["bm25", "dense", "hybrid"] = "hybrid"
    fusion: Literal["rrf", "mix"] = "mix"
    rrf_k: int = Field(60, ge=1)
    # Weight of the dense score in the normalized mix; 0.5 is a neutral prior, the
    # tuned value (on a *train* split) is written by `aiprime eval tune`.
    dense_weight: float = Field(0.5, ge=0.0, le=1.0)
    candidates: int = Field(100, ge=1, description="Depth of each retriever before fusion.")


class StoreSettings(BaseModel):
    # How stale a long-lived reader (the service) may be, in seconds, before it sees a
    # writer's commits; 0 checks on every query.
    read_consistency_s: float = Field(1.0, ge=0.0)
    # From this many chunks an IVF-HNSW-SQ index serves dense search. On SciFact (11k
    # chunks) it halves dense latency (13.1 -> 5.9 ms) at unchanged nDCG@10 (docs/results.md).
    ann_min_rows: int = Field(10_000, ge=1)


RerankStage = Literal["lr", "cross-encoder", "mmr"]


class RerankSettings(BaseModel):
    # None: every trained stage found under models_dir (lr, then cross-encoder), so a
    # model trained once is used afterwards; [] turns re-ranking off.
    stack: list[RerankStage] | None = None
    depth: int = Field(100, ge=1, description="Fused candidates handed to the first stage.")
    lr_model: Path | None = Field(None, description="Default: models_dir/rerank/lr.json.")
    cross_encoder: str | None = Field(
        None, description="Local dir or HF-cache id; default: models_dir/cross-encoder."
    )
    ce_top_k: int = Field(20, ge=1, description="Candidates the cross-encoder rescores.")
    ce_max_length: int = Field(256, ge=16)
    ce_batch_size: int = Field(32, ge=1)
    # "auto": torch on a GPU, else ONNX Runtime fp32 (same scores as torch, 2.7x faster on
    # CPU); "onnx-int8" is 5.8x faster at -0.0004 to -0.004 nDCG@10 on SciFact
    # (docs/results.md).
    ce_backend: Literal["auto", "torch", "onnx", "onnx-int8"] = "auto"
    mmr_lambda: float = Field(0.7, ge=0.0, le=1.0, description="1 = relevance only.")
    mmr_top_k: int = Field(10, ge=1, description="Results MMR selects; the rest follow.")


class AnswerSettings(BaseModel):
    """Grounded answers (``aiprime ask``): owned by ``aiprime.rag.answer``."""

    top_chunks: int = Field(5, ge=1, description="Re-ranked chunks the answer may cite.")
    max_sentences: int = Field(4, ge=1, description="Sentences in an extractive answer.")
    llm: str | None = Field(None, description="e.g. 'openai:gpt-4o-mini'; None = extractive.")


class ServeSettings(BaseModel):
    """The HTTP service (``aiprime serve``): owned by ``aiprime.server``."""

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    api_keys_file: Path | None = Field(
        None, description="Hashed API keys (JSON); default: home/serve/api_keys.json."
    )
    # Without keys the service refuses to start unless this is set *and* it listens on
    # loopback only: an open port must never serve unauthenticated writes.
    allow_no_auth: bool = False
    max_request_bytes: int = Field(64 * 1024 * 1024, ge=1024, description="Whole request body.")
    max_upload_bytes: int = Field(32 * 1024 * 1024, ge=1, description="One uploaded file.")
    max_files: int = Field(64, ge=1, description="Files in one ingest request.")
    max_image_pixels: int = Field(
        40_000_000, ge=1, description="Larger images are refused (decompression bombs)."
    )
    max_query_chars: int = Field(2000, ge=1)
    max_k: int = Field(100, ge=1)
    ingest_group_files: int = Field(
        16, ge=1, description="Files committed per step of a job (its progress granularity)."
    )
    # Cross-origin requests are refused unless an origin is listed here.
    cors_origins: list[str] = Field(default_factory=list)
    public_metrics: bool = Field(False, description="Serve /metrics without an API key.")
    resume_jobs: bool = Field(True, description="Resume interrupted ingest jobs at start-up.")


class MultimodalSettings(BaseModel):
    """Dual-encoder training and cross-modal search: owned by ``aiprime.multimodal``."""

    collection: str = Field("images", description="Store collection that holds images.")
    model: Path | None = Field(
        None, description="Trained dual encoder used by index/search; default models_dir/mm."
    )
    batch_size: int = Field(64, ge=1, description="Images embedded per batch when indexing.")
    # PIL's own default (89M) still decodes ~270 MB bombs; 40M pixels is a 6,300^2 photo.
    max_image_pixels: int = Field(40_000_000, ge=1024, description="Larger images are refused.")
    index_captions: bool = Field(True, description="Also index captions as text rows.")


class ExpertSettings(BaseModel):
    """One routing expert: a named pipeline over one collection (``aiprime.routing``)."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_\-]{0,63}$")
    collection: str = Field(description="Store collection the expert searches.")
    description: str = ""
    home: Path | None = Field(
        None, description="Another data directory holding the collection (read-only use)."
    )
    mode: Literal["bm25", "dense", "hybrid"] | None = Field(
        None, description="Retriever; None = [retrieve].mode."
    )
    rerank: list[RerankStage] | None = Field(
        None, description="Re-ranking stages; None = the collection's default, [] = none."
    )
    dense_weight: float | None = Field(None, ge=0.0, le=1.0)
    answer_model: str | None = Field(None, description="e.g. 'openai:gpt-4o-mini'.")
    cost: float = Field(1.0, gt=0.0, description="Relative cost, for reports.")


class RoutingSettings(BaseModel):
    """Query routing among expert pipelines: owned by ``aiprime.routing``."""

    experts: list[ExpertSettings] = Field(default_factory=list)
    top_k: int = Field(1, ge=1, description="Experts a query is sent to.")
    # Below this top probability the router is unsure and every expert is searched.
    fallback_threshold: float = Field(0.5, ge=0.0, le=1.0)
    # Per-expert capacity in a batch, ceil(cf * N * top_k / E); None = unlimited.
    capacity_factor: float | None = Field(None, gt=0.0)
    fusion_rrf_k: int = Field(60, ge=1, description="RRF constant when experts are fused.")
    lr: float = Field(0.05, gt=0.0, description="Adam learning rate of offline training.")
    epochs: int = Field(300, ge=1)
    weight_decay: float = Field(1e-3, ge=0.0)
    # Weigh labelled queries by inverse domain frequency, so a rare domain is not
    # swallowed by a common one; "none" fits the raw label mix.
    class_weight: Literal["balanced", "none"] = "balanced"
    aux_loss_weight: float = Field(0.01, ge=0.0, description="Switch balance loss weight.")
    z_loss_weight: float = Field(1e-3, ge=0.0)
    online_lr: float = Field(0.1, gt=0.0, description="SGD step of one feedback update.")
    bias_update_rate: float = Field(0.0, ge=0.0, description="Aux-free bias step; 0 = off.")
    router_dir: Path | None = Field(None, description="Default: models_dir/router.")


class Settings(BaseSettings):
    """Everything configurable, validated once."""

    model_config = SettingsConfigDict(
        env_prefix="AIPRIME_", env_nested_delimiter="__", extra="ignore"
    )

    home: Path = Field(default_factory=default_home)
    collection: str = "default"
    chunk: ChunkSettings = Field(default_factory=ChunkSettings)
    embed: EmbedSettings = Field(default_factory=EmbedSettings)
    retrieve: RetrieveSettings = Field(default_factory=RetrieveSettings)
    store: StoreSettings = Field(default_factory=StoreSettings)
    rerank: RerankSettings = Field(default_factory=RerankSettings)
    answer: AnswerSettings = Field(default_factory=AnswerSettings)
    serve: ServeSettings = Field(default_factory=ServeSettings)
    mm: MultimodalSettings = Field(default_factory=MultimodalSettings)
    routing: RoutingSettings = Field(default_factory=RoutingSettings)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The config file lives in the data directory actually used: an explicit ``home``
        # (e.g. ``--home``) must find its own config.toml, not $AIPRIME_HOME's.
        explicit_home = getattr(init_settings, "init_kwargs", {}).get("home")
        return (init_settings, env_settings, _TomlSource(settings_cls, explicit_home))

    @property
    def store_dir(self) -> Path:
        return self.home / "store"

    @property
    def cache_dir(self) -> Path:
        return self.home / "cache"

    @property
    def models_dir(self) -> Path:
        return self.home / "models"

    def ensure_dirs(self) -> None:
        for d in (self.home, self.store_dir, self.cache_dir, self.models_dir):
            d.mkdir(parents=True, exist_ok=True)


class _TomlSource(PydanticBaseSettingsSource):
    """Reads ``config.toml`` from the data directory (or ``$AIPRIME_CONFIG``)."""

    def __init__(self, settings_cls: type[BaseSettings], home: str | Path | None = None) -> None:
        super().__init__(settings_cls)
        self._home = Path(home).expanduser() if home is not None else None

    def _path(self) -> Path:
        explicit = os.environ.get("AIPRIME_CONFIG")
        if explicit:
            return Path(explicit)
        return (self._home or default_home()) / "config.toml"

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        path = self._path()
        if not path.is_file():
            return {}
        try:
            with path.open("rb") as f:
                return tomllib.load(f)
        except tomllib.TOMLDecodeError as e:
            raise ValueError(f"{path}: invalid TOML: {e}") from e


def load_settings(home: str | Path | None = None, **overrides: Any) -> Settings:
    """Build settings; ``home`` (e.g. from ``--home``) wins over the environment."""
    if home is not None:
        overrides["home"] = Path(home).expanduser()
    return Settings(**overrides)
