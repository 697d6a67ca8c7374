"""The aiprime HTTP service: a thin FastAPI layer over ``KnowledgeBase``.

Endpoints are plain (sync) functions: FastAPI runs them on its thread pool, so a search
never blocks the event loop, and the store's MVCC lets searches run while the one ingest
worker writes. Everything a client sends is validated by pydantic or by
``aiprime.server.security`` before it reaches the knowledge base; bad input is a 4xx
naming the field, never a 500.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import functools
import json
import logging
import math
import mimetypes
import shutil
import threading
import urllib.parse
from collections.abc import Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

from fastapi import (
    Depends,
    FastAPI,
    File,
    Form,
    HTTPException,
    Query,
    Request,
    Response,
    UploadFile,
)
from fastapi import (
    Path as PathParam,
)
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    generate_latest,
)
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from aiprime.config import Settings
from aiprime.rag.ingest import IngestReport
from aiprime.rag.kb import KnowledgeBase, list_collections
from aiprime.rag.loaders import LoadError
from aiprime.routing.experts import RoutingError
from aiprime.server.jobs import Job, JobManager
from aiprime.server.middleware import BodyLimit, Metrics, SecurityHeaders, error_body
from aiprime.server.multimodal import MultimodalBackend, load_multimodal, unavailable_reason
from aiprime.server.security import (
    ApiKeys,
    ContentError,
    SecurityError,
    check_content,
    inside,
    is_loopback,
    kind_of,
    safe_filename,
)
from aiprime.store import Hit, StoreError
from aiprime.store.base import check_collection_name
from aiprime.store.lance import LanceStore

if TYPE_CHECKING:
    from aiprime.routing.pipeline import RoutedSearch

log = logging.getLogger("aiprime.server")

STATIC = Path(__file__).parent / "static"
COLLECTION = r"^[A-Za-z0-9][A-Za-z0-9_\-]{0,63}$"
EXPERT = COLLECTION  # as ExpertSettings.name
KbFactory = Callable[[Settings, str], KnowledgeBase]


# -- request and response models ----------------------------------------------------------


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SearchRequest(_Strict):
    query: str = Field(..., min_length=1, max_length=10_000, description="Text query.")
    collection: str = Field("default", pattern=COLLECTION)
    k: int = Field(10, ge=1, le=1000, description="Results to return (up to serve.max_k).")
    mode: Literal["bm25", "dense", "hybrid"] | None = Field(
        None, description="Retriever; default: the configured one (hybrid)."
    )
    modality: Literal["any", "text", "image"] = Field(
        "any", description="'image' searches the image collection by text (multimodal)."
    )
    rerank: bool = True


class AskRequest(_Strict):
    question: str = Field(..., min_length=1, max_length=10_000)
    collection: str = Field("default", pattern=COLLECTION)
    stream: bool = Field(False, description="Server-sent events: text pieces, then the answer.")


class CollectionCreate(_Strict):
    name: str = Field(..., pattern=COLLECTION, description="1-64 letters, digits, '_', '-'.")


class HitOut(BaseModel):
    score: float
    source: str
    file: str | None = Field(None, description="Uploaded file name, or None.")
    url: str | None = Field(None, description="Where the uploaded file is served.")
    doc_id: str
    title: str
    text: str
    start: int
    end: int
    page: int
    modality: str
    scores: dict[str, float] = Field(default_factory=dict)


class SearchResponse(BaseModel):
    query: str
    collection: str
    modality: str
    hits: list[HitOut]


class CollectionOut(BaseModel):
    name: str
    kind: Literal["text", "images"] = "text"
    chunks: int
    sources: int


class JobOut(BaseModel):
    id: str
    collection: str
    status: str
    files: list[str]
    files_total: int
    files_done: int
    files_ingested: int
    files_unchanged: int
    chunks_written: int
    progress: float
    attempts: int
    errors: list[str]
    error: str | None
    created_at: float
    started_at: float | None
    finished_at: float | None


class RouteSearchRequest(_Strict):
    query: str = Field(..., min_length=1, max_length=10_000, description="Text query.")
    k: int = Field(10, ge=1, le=1000, description="Results to return (up to serve.max_k).")
    top_k: int | None = Field(
        None, ge=1, le=64, description="Experts to send the query to; default routing.top_k."
    )


class RouteFeedbackRequest(_Strict):
    query: str = Field(..., min_length=1, max_length=10_000)
    expert: str = Field(..., pattern=EXPERT, description="A declared expert's name.")
    relevant: bool = Field(True, description="Were the expert's results relevant (accepted)?")


class ExpertOut(BaseModel):
    name: str
    collection: str
    description: str
    mode: str
    rerank: list[str] | None = Field(None, description="None: the collection's default stack.")
    cost: float
    chunks: int = Field(..., description="-1 when the collection cannot be read.")


class RouterOut(BaseModel):
    path: str
    trained_on: int | None = Field(None, description="Labelled queries of the last training.")
    feedback: int = Field(0, description="Online feedback updates so far.")
    embedder: str | None = None


class ExpertsResponse(BaseModel):
    experts: list[ExpertOut]
    router_loaded: bool = Field(
        ..., description="False: no router yet, every query goes to every expert."
    )
    router: RouterOut | None


class RoutedHitOut(HitOut):
    expert: str = Field(..., description="The expert that found the hit.")
    expert_score: float = Field(..., description="The hit's score within its expert.")


class RouteSearchResponse(BaseModel):
    query: str
    experts: list[str] = Field(..., description="The experts the query was sent to.")
    probs: dict[str, float] = Field(..., description="The router's probability per expert.")
    fallback: bool = Field(..., description="The router was unsure (or untrained): all experts.")
    ms: dict[str, float]
    hits: list[RoutedHitOut]


class RouteFeedbackResponse(BaseModel):
    query: str
    expert: str
    relevant: bool
    loss: float
    prob_before: float
    prob_after: float
    feedback_total: int
    saved: str = Field(..., description="The router's directory.")


def _finite(x: float) -> float:
    return x if math.isfinite(x) else 0.0


# -- the service object -------------------------------------------------------------------


def default_kb_factory() -> KbFactory:
    """Knowledge bases that share one embedder and one re-ranking stack (both are heavy)."""
    lock = threading.Lock()
    shared: dict[str, Any] = {}

    def make(settings: Settings, collection: str) -> KnowledgeBase:
        with lock:
            if "embedder" not in shared:
                from aiprime.embed import load_embedder
                from aiprime.rag.rerank.stack import build_stack

                shared["embedder"] = load_embedder(settings)
                shared["reranker"] = build_stack(settings, None, shared["embedder"])
        return KnowledgeBase(
            settings,
            collection=collection,
            embedder=shared["embedder"],
            reranker=shared["reranker"],
        )

    return make


class Service:
    """State behind the routes: knowledge bases per collection, jobs, keys, metrics."""

    def __init__(
        self,
        settings: Settings,
        kb_factory: KbFactory,
        keys: ApiKeys,
        multimodal: MultimodalBackend | None,
    ) -> None:
        self.settings = settings
        self.serve = settings.serve
        self.kb_factory = kb_factory
        self.keys = keys
        self.mm = multimodal
        self.mm_reason: str | None = None
        self.root = settings.home / "serve"
        self.uploads = self.root / "uploads"
        self._kbs: dict[str, KnowledgeBase] = {}
        self._lock = threading.Lock()
        self.ready = threading.Event()
        self.warmup_error: str | None = None
        self.registry = CollectorRegistry()
        self.files_ingested = Counter(
            "aiprime_ingest_files", "Files ingested by jobs.", registry=self.registry
        )
        self.chunks_written = Counter(
            "aiprime_ingest_chunks", "Chunks written by jobs.", registry=self.registry
        )
        self.jobs_gauge = Gauge(
            "aiprime_ingest_jobs", "Ingest jobs by status.", ["status"], registry=self.registry
        )
        self.jobs = JobManager(
            self.root / "jobs", self.uploads, self._ingest, self.serve.ingest_group_files
        )
        self._routed: RoutedSearch | None = None
        self._routed_lock = threading.Lock()  # building it
        self._feedback_lock = threading.Lock()  # one router update (and save) at a time

    # -- knowledge bases ------------------------------------------------------------
    def exists(self, collection: str) -> bool:
        return collection in list_collections(self.settings)

    def kb(self, collection: str) -> KnowledgeBase:
        with self._lock:
            kb = self._kbs.get(collection)
            if kb is None:
                kb = self.kb_factory(self.settings, collection)
                # Resolve the lazy parts once, here, rather than racing in request threads.
                kb.store  # noqa: B018
                kb.retriever  # noqa: B018
                kb.reranker  # noqa: B018
                self._kbs[collection] = kb
            return kb

    def require(self, collection: str) -> KnowledgeBase:
        if not self.exists(collection):
            raise HTTPException(404, f"collection {collection!r} does not exist")
        kb: KnowledgeBase = _kb_call(lambda: self.kb(collection))  # e.g. another model: 409
        return kb

    def forget(self, collection: str) -> None:
        with self._lock:
            self._kbs.pop(collection, None)

    def warm_up(self) -> None:
        """Load the embedder (and re-ranker) before the first query needs them."""
        try:
            kb = self.kb(self.settings.collection)
            kb.embedder  # noqa: B018
            self.ready.set()
        except Exception as e:  # reported by /readyz, not fatal: the error may be fixable
            log.exception("warm-up failed")
            self.warmup_error = f"{type(e).__name__}: {e}"

    # -- query routing ---------------------------------------------------------------
    def routed(self) -> RoutedSearch:
        """The routed search over ``routing.experts``, built once, on first use, with the
        knowledge bases' embedder; the saved router (``models/router``) when there is one."""
        if not self.settings.routing.experts:
            raise HTTPException(
                409,
                "no routing experts configured: declare [[routing.experts]] entries "
                "(routing.experts: name, collection) in config.toml",
            )
        with self._routed_lock:
            if self._routed is None:
                from aiprime.routing.pipeline import RoutedSearch

                embedder = self.kb(self.settings.collection).embedder
                rs: RoutedSearch = _kb_call(lambda: RoutedSearch.open(self.settings, embedder))
                for e in rs.experts:  # resolve the lazy parts here, not racing in requests
                    _kb_call(functools.partial(_resolve, e.kb))
                self._routed = rs
            return self._routed

    def route_feedback(self, query: str, expert: str, relevant: bool) -> dict[str, Any]:
        """One online router update, saved. Serialised; copy-on-write, so that searches
        running meanwhile route with the old router, never a half-updated one."""
        rs = self.routed()
        if expert not in rs.by_name:
            raise HTTPException(422, f"expert: unknown expert {expert!r}; experts: {rs.names}")
        with self._feedback_lock:
            shadow = copy.copy(rs)  # shares experts and embedder, not the router
            shadow.router = copy.deepcopy(rs.router)
            out: dict[str, Any] = _kb_call(lambda: shadow.feedback(query, expert, relevant))
            rs.router = shadow.router
        out["saved"] = str(rs.router_dir)
        return out

    # -- ingest (job worker thread) -------------------------------------------------
    def _ingest(self, collection: str, paths: list[Path]) -> IngestReport:
        images = [p for p in paths if kind_of(p.name) == "image"]
        docs = [p for p in paths if p not in images]
        report = IngestReport()
        if docs:
            report = self.kb(collection).ingest(docs)
        if images:
            if self.mm is None:
                report.errors.extend(LoadError(p.name, self.mm_missing) for p in images)
            else:
                r = self.mm.index_images(collection, images)
                report.files_seen += r.files_seen
                report.files_ingested += r.files_ingested
                report.files_unchanged += r.files_unchanged
                report.chunks_written += r.chunks_written
                report.errors.extend(r.errors)
        self.files_ingested.inc(report.files_ingested)
        self.chunks_written.inc(report.chunks_written)
        return report

    # -- presentation ---------------------------------------------------------------
    @property
    def mm_missing(self) -> str:
        return "multimodal search is not available on this server: " + (
            self.mm_reason or "disabled"
        )

    def locate(self, source: str) -> tuple[str, str] | None:
        """(collection folder, file name) of an uploaded file, None for other sources."""
        root = str(self.uploads.resolve()) + "/"
        if not source.startswith(root):
            return None
        parts = source[len(root) :].split("/")
        return (parts[0], parts[1]) if len(parts) == 2 else None

    def describe(self, source: str) -> dict[str, str | None]:
        """How a source is shown: uploads by file name, with the URL that serves them."""
        loc = self.locate(source)
        if loc is None:
            return {"source": source, "file": None, "url": None}
        coll, name = loc
        return {
            "source": name,
            "file": name,
            "url": f"/v1/collections/{coll}/files/{urllib.parse.quote(name)}",
        }

    def hit_out(self, h: Hit) -> HitOut:
        return HitOut(
            score=_finite(h.score),
            **self.describe(h.source),
            doc_id=h.doc_id,
            title=h.title,
            text=h.text,
            start=h.start,
            end=h.end,
            page=h.page,
            modality=h.modality,
            scores={k: _finite(v) for k, v in h.scores.items()},
        )


def auth(request: Request) -> str | None:
    """The API key's id; 401 without a valid key (unless serving without keys is allowed)."""
    svc: Service = request.app.state.service
    if len(svc.keys) == 0 and svc.serve.allow_no_auth:
        return None
    header = request.headers.get("authorization", "")
    key = header[7:].strip() if header.lower().startswith("bearer ") else None
    key = key or request.headers.get("x-api-key")
    key_id = svc.keys.verify(key)
    if key_id is None:
        raise HTTPException(
            401,
            "missing or invalid API key (send 'Authorization: Bearer <key>')",
            headers={"WWW-Authenticate": "Bearer"},
        )
    return key_id


Auth = Annotated[str | None, Depends(auth)]
Coll = Annotated[str, PathParam(pattern=COLLECTION, description="Collection name.")]
JobId = Annotated[str, PathParam(pattern=r"^[0-9a-f]{32}$", description="Job id.")]


# -- app factory --------------------------------------------------------------------------


def create_app(
    settings: Settings,
    kb_factory: KbFactory | None = None,
    *,
    multimodal: MultimodalBackend | Literal["auto"] | None = "auto",
    start_worker: bool = True,
) -> FastAPI:
    """Build the app. Refuses (``SecurityError``) to serve without API keys unless
    ``serve.allow_no_auth`` is set and ``serve.host`` is a loopback address."""
    settings.ensure_dirs()
    serve = settings.serve
    keys = ApiKeys(serve.api_keys_file or settings.home / "serve" / "api_keys.json")
    if len(keys) == 0:
        if not serve.allow_no_auth:
            raise SecurityError(
                f"no API keys in {keys.path}: create one with `aiprime serve add-key NAME`, "
                "or pass --allow-no-auth to serve on loopback without authentication"
            )
        if not is_loopback(serve.host):
            raise SecurityError(
                f"--allow-no-auth is only allowed on a loopback address, not {serve.host!r}"
            )
    mm = load_multimodal(settings) if multimodal == "auto" else multimodal
    svc = Service(settings, kb_factory or default_kb_factory(), keys, mm)
    if multimodal == "auto":
        svc.mm_reason = unavailable_reason(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> Any:
        resumed = svc.jobs.load(resume=serve.resume_jobs)
        if resumed:
            log.info("resuming %d interrupted ingest job(s)", len(resumed))
        if start_worker:
            svc.jobs.start()
        threading.Thread(target=svc.warm_up, name="aiprime-warmup", daemon=True).start()
        yield
        svc.jobs.stop()

    app = FastAPI(
        title="aiprime",
        version="0.1.0",
        description="Retrieval, cited answers and multimodal search over an embedded store. "
        "Send `Authorization: Bearer <key>` (or `X-API-Key`) on /v1 routes.",
        lifespan=lifespan,
    )
    app.state.service = svc

    # Added innermost first. Outermost, Metrics and SecurityHeaders also see the 413s that
    # BodyLimit sends before anything parses the body.
    app.add_middleware(BodyLimit, limit=serve.max_request_bytes)
    if serve.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=serve.cors_origins,
            allow_methods=["GET", "POST", "DELETE"],
            allow_headers=["Authorization", "X-API-Key", "Content-Type"],
        )
    app.add_middleware(SecurityHeaders)
    app.add_middleware(Metrics, registry=svc.registry)

    _install_error_handlers(app)

    # -- probes and metrics -----------------------------------------------------------
    @app.get("/healthz", tags=["ops"])
    def healthz() -> dict[str, str]:
        """Liveness: the process answers."""
        return {"status": "ok"}

    @app.get("/readyz", tags=["ops"], responses={503: {"description": "Not ready yet."}})
    def readyz() -> JSONResponse:
        """Readiness: the embedder is loaded and the ingest worker runs."""
        checks = {
            "embedder": svc.ready.is_set(),
            "ingest_worker": svc.jobs.alive or not start_worker,
            "store_writable": _writable(settings.store_dir),
        }
        ok = all(checks.values())
        body: dict[str, Any] = {"status": "ready" if ok else "not ready", "checks": checks}
        if svc.warmup_error:
            body["error"] = svc.warmup_error
        return JSONResponse(body, status_code=200 if ok else 503)

    @app.get("/metrics", tags=["ops"], response_class=Response)
    def metrics(request: Request) -> Response:
        """Prometheus text format (needs a key unless serve.public_metrics)."""
        if not serve.public_metrics:
            auth(request)
        for status, n in svc.jobs.counts().items():
            svc.jobs_gauge.labels(status).set(n)
        return Response(generate_latest(svc.registry), media_type=CONTENT_TYPE_LATEST)

    # -- web page ---------------------------------------------------------------------
    @app.get("/", include_in_schema=False)
    def index() -> FileResponse:
        return FileResponse(STATIC / "index.html", media_type="text/html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/v1/info", tags=["ops"])
    def info(_: Auth) -> dict[str, Any]:
        """What the web page needs to know: default collection, limits, multimodal."""
        return {
            "collection": settings.collection,
            "image_collection": settings.mm.collection,
            "multimodal": svc.mm is not None,
            "max_k": serve.max_k,
            "max_upload_bytes": serve.max_upload_bytes,
            "max_files": serve.max_files,
            "ask": hasattr(KnowledgeBase, "ask_stream"),
        }

    # -- collections ------------------------------------------------------------------
    @app.get("/v1/collections", tags=["collections"])
    def collections(_: Auth) -> dict[str, list[CollectionOut]]:
        """Every collection with its size; ``kind`` 'images' is the multimodal one."""
        out = []
        for name in list_collections(settings):
            kind = "images" if name == settings.mm.collection else "text"
            try:  # counts need no embedder: any model's collection is listed
                store = LanceStore(settings.store_dir, name)
                out.append(
                    CollectionOut(
                        name=name, kind=kind, chunks=store.count(), sources=len(store.sources())
                    )
                )
            except (StoreError, ValueError, OSError):
                out.append(CollectionOut(name=name, kind=kind, chunks=-1, sources=-1))
        return {"collections": out}

    @app.post(
        "/v1/collections",
        tags=["collections"],
        status_code=201,
        responses={409: {"description": "Exists already."}},
    )
    def create_collection(body: CollectionCreate, _: Auth) -> CollectionOut:
        name = check_collection_name(body.name)
        if svc.exists(name):
            raise HTTPException(409, f"collection {name!r} exists already")
        kb = svc.kb(name)
        ensure = getattr(kb.store, "_ensure_table", None)  # LanceStore: table + meta file
        if ensure is None:
            raise HTTPException(501, "this store backend cannot create empty collections")
        with kb.store.write_lock():
            ensure()
        return CollectionOut(name=name, chunks=0, sources=0)

    @app.delete(
        "/v1/collections/{name}",
        tags=["collections"],
        status_code=204,
        responses={
            404: {"description": "No such collection."},
            409: {"description": "Ingest jobs are running on it."},
        },
    )
    def delete_collection(name: Coll, _: Auth) -> Response:
        if not svc.exists(name):
            raise HTTPException(404, f"collection {name!r} does not exist")
        if svc.jobs.active(name):
            raise HTTPException(409, f"collection {name!r} has ingest jobs queued or running")
        with LanceStore(settings.store_dir, name).write_lock():
            _drop_collection(settings, name)
        svc.forget(name)
        shutil.rmtree(svc.uploads / name, ignore_errors=True)
        return Response(status_code=204)

    @app.get("/v1/collections/{name}/sources", tags=["collections"])
    def collection_sources(name: Coll, _: Auth) -> dict[str, Any]:
        kb = svc.require(name)
        return {
            "collection": name,
            "sources": [
                {
                    **svc.describe(s),
                    "chunks": i.chunks,
                    "sha256": i.source_hash,
                    "ingested_at": i.ingested_at,
                }
                for s, i in sorted(kb.sources().items())
            ],
        }

    @app.get(
        "/v1/collections/{name}/files/{filename}",
        tags=["collections"],
        response_class=Response,
        responses={404: {"description": "No such file."}},
    )
    def collection_file(name: Coll, filename: str, _: Auth) -> Response:
        """An uploaded file's bytes: text as text/plain (never rendered as HTML), images
        with their own type, everything as an attachment-safe, nosniff response."""
        try:
            safe = safe_filename(filename)
            path = inside(svc.uploads / name, safe)
            kind = kind_of(safe)
        except ValueError as e:
            raise HTTPException(400, f"filename: {e}") from e
        if safe != filename or not path.is_file():
            raise HTTPException(404, f"no uploaded file {filename!r} in {name!r}")
        if kind == "image":
            media = mimetypes.guess_type(safe)[0] or "application/octet-stream"
        elif kind == "pdf":
            media = "application/pdf"
        else:
            media = "text/plain; charset=utf-8"
        return FileResponse(
            path, media_type=media, headers={"Content-Disposition": f'inline; filename="{safe}"'}
        )

    # -- search -----------------------------------------------------------------------
    @app.post("/v1/search", tags=["search"], response_model=SearchResponse)
    def search(body: SearchRequest, _: Auth) -> SearchResponse:
        """Text query over a collection; ``modality='image'`` searches images by text."""
        _check_query("query", body.query, serve.max_query_chars)
        if body.k > serve.max_k:
            raise HTTPException(422, f"k: at most {serve.max_k}")
        if body.modality == "image":
            mm = svc.mm
            if mm is None:
                raise HTTPException(501, svc.mm_missing)
            hits = _kb_call(lambda: mm.search_text(body.query, body.k))
            coll = settings.mm.collection
        else:
            kb = svc.require(body.collection)
            where = "modality = 'text'" if body.modality == "text" else None
            hits = _search(kb, body.query, body.k, body.mode, where, body.rerank)
            coll = body.collection
        return SearchResponse(
            query=body.query,
            collection=coll,
            modality=body.modality,
            hits=[svc.hit_out(h) for h in hits],
        )

    @app.post(
        "/v1/search/image",
        tags=["search"],
        response_model=SearchResponse,
        responses={501: {"description": "Multimodal search is not available."}},
    )
    def search_image(
        _: Auth,
        image: Annotated[UploadFile, File(description="PNG, JPEG, GIF, BMP or WebP.")],
        k: Annotated[int, Form(ge=1, le=1000)] = 10,
    ) -> SearchResponse:
        """Query by image: the nearest images (and, if indexed, captions)."""
        if k > serve.max_k:
            raise HTTPException(422, f"k: at most {serve.max_k}")
        data = _read_upload(image, serve.max_upload_bytes)
        name = _upload_name(image, default="query.png")
        if kind_of(name) != "image":
            raise HTTPException(415, f"image: {name!r} is not an image file")
        _check(name, data, image.content_type, serve.max_image_pixels)
        mm = svc.mm
        if mm is None:
            raise HTTPException(501, svc.mm_missing)
        hits = _kb_call(lambda: mm.search_image(data, Path(name).suffix, k))
        coll = settings.mm.collection
        return SearchResponse(
            query=f"image:{name}",
            collection=coll,
            modality="image",
            hits=[svc.hit_out(h) for h in hits],
        )

    # -- query routing ----------------------------------------------------------------
    @app.get("/v1/route/experts", tags=["routing"], response_model=ExpertsResponse)
    def route_experts(_: Auth) -> ExpertsResponse:
        """The experts declared in ``routing.experts`` (none: an empty list) and whether a
        router is loaded (without one every query goes to every expert)."""
        if not settings.routing.experts:
            return ExpertsResponse(experts=[], router_loaded=False, router=None)
        rs = svc.routed()
        out = []
        for e in rs.experts:
            try:
                chunks = e.kb.store.count()
            except (StoreError, ValueError, OSError):
                chunks = -1
            out.append(
                ExpertOut(
                    name=e.name,
                    collection=e.spec.collection,
                    description=e.spec.description,
                    mode=e.spec.mode or e.settings.retrieve.mode,
                    rerank=None if e.spec.rerank is None else list(e.spec.rerank),
                    cost=e.spec.cost,
                    chunks=chunks,
                )
            )
        router = rs.router
        return ExpertsResponse(
            experts=out,
            router_loaded=router is not None,
            router=None
            if router is None
            else RouterOut(
                path=str(rs.router_dir),
                trained_on=router.meta.get("trained_on"),
                feedback=int(router.meta.get("feedback", 0)),
                embedder=router.meta.get("embedder"),
            ),
        )

    @app.post(
        "/v1/route/search",
        tags=["routing"],
        response_model=RouteSearchResponse,
        responses={409: {"description": "No experts configured, or the router does not fit."}},
    )
    def route_search(body: RouteSearchRequest, _: Auth) -> RouteSearchResponse:
        """Route the query to its expert(s) and fuse their hits; with the router's
        probabilities and whether it fell back to every expert."""
        _check_query("query", body.query, serve.max_query_chars)
        if body.k > serve.max_k:
            raise HTTPException(422, f"k: at most {serve.max_k}")
        rs = svc.routed()
        if body.top_k is not None and body.top_k > len(rs.names):
            raise HTTPException(422, f"top_k: at most {len(rs.names)} (the number of experts)")
        res = _kb_call(lambda: rs.search(body.query, body.k, top_k=body.top_k))
        return RouteSearchResponse(
            query=res.query,
            experts=res.experts,
            probs={n: _finite(p) for n, p in res.probs.items()},
            fallback=res.fallback,
            ms={n: _finite(v) for n, v in res.ms.items()},
            hits=[
                RoutedHitOut(
                    **svc.hit_out(h.hit).model_dump(exclude={"score"}),
                    score=_finite(h.score),
                    expert=h.expert,
                    expert_score=_finite(h.hit.score),
                )
                for h in res.hits
            ],
        )

    @app.post(
        "/v1/route/feedback",
        tags=["routing"],
        response_model=RouteFeedbackResponse,
        responses={409: {"description": "No experts configured, or the router does not fit."}},
    )
    def route_feedback(body: RouteFeedbackRequest, _: Auth) -> RouteFeedbackResponse:
        """A verdict on an expert's results for a query: one online update of the router
        (created on first feedback), saved to ``models/router``."""
        _check_query("query", body.query, serve.max_query_chars)
        out = svc.route_feedback(body.query, body.expert, body.relevant)
        return RouteFeedbackResponse(
            query=body.query,
            expert=out["expert"],
            relevant=out["relevant"],
            loss=_finite(out["loss"]),
            prob_before=_finite(out["prob_before"]),
            prob_after=_finite(out["prob_after"]),
            feedback_total=out["feedback_total"],
            saved=out["saved"],
        )

    # -- ingest -----------------------------------------------------------------------
    @app.post(
        "/v1/ingest",
        tags=["ingest"],
        status_code=202,
        response_model=JobOut,
        responses={
            200: {"description": "Finished (wait=true)."},
            413: {"description": "Too large."},
            415: {"description": "Content does not match its type."},
        },
    )
    async def ingest(
        _: Auth,
        files: Annotated[
            list[UploadFile], File(description="Text, Markdown, HTML, JSONL, PDF or image files.")
        ],
        collection: Annotated[str, Form(pattern=COLLECTION)] = "default",
        wait: Annotated[bool, Query(description="Block until the job ends.")] = False,
    ) -> JSONResponse:
        """Upload files and ingest them in a background job (its id is returned)."""
        job = await run_in_threadpool(stage, files, collection)
        if wait:  # poll without holding a worker thread: waiting uploads never starve searches
            done = job
            for _tick in range(6000):  # up to 10 minutes
                done = svc.jobs.get(job.id) or job
                if done.status in ("done", "failed"):
                    return JSONResponse(done.to_dict(), status_code=200)
                await asyncio.sleep(0.1)
            return JSONResponse(done.to_dict(), status_code=202)
        return JSONResponse(
            job.to_dict(), status_code=202, headers={"Location": f"/v1/jobs/{job.id}"}
        )

    def stage(files: list[UploadFile], collection: str) -> Job:
        """Validate every file, then stage them and record the job (all or nothing)."""
        if not files:
            raise HTTPException(422, "files: at least one file is required")
        if len(files) > serve.max_files:
            raise HTTPException(413, f"files: at most {serve.max_files} per request")
        staged: list[tuple[str, bytes]] = []
        seen: set[str] = set()
        for f in files:
            name = _upload_name(f)
            if name in seen:
                raise HTTPException(400, f"files: {name!r} appears twice in this request")
            seen.add(name)
            data = _read_upload(f, serve.max_upload_bytes)
            kind = _check(name, data, f.content_type, serve.max_image_pixels)
            if kind == "image" and svc.mm is None:
                raise HTTPException(501, f"files: {name!r} is an image; {svc.mm_missing}")
            staged.append((name, data))
        job_id = svc.jobs.new_id()
        folder = svc.jobs.staging(job_id)
        folder.mkdir(parents=True)
        for name, data in staged:
            inside(folder, name).write_bytes(data)
        return svc.jobs.submit(job_id, collection, [n for n, _ in staged])

    @app.get("/v1/jobs", tags=["ingest"])
    def jobs(_: Auth, limit: Annotated[int, Query(ge=1, le=1000)] = 100) -> dict[str, list[JobOut]]:
        return {"jobs": [JobOut(**j.to_dict()) for j in svc.jobs.list(limit)]}

    @app.get(
        "/v1/jobs/{job_id}",
        tags=["ingest"],
        response_model=JobOut,
        responses={404: {"description": "No such job."}},
    )
    def job(job_id: JobId, _: Auth) -> dict[str, Any]:
        return _job_or_404(svc.jobs.get(job_id), job_id).to_dict()

    @app.post(
        "/v1/jobs/{job_id}/resume",
        tags=["ingest"],
        response_model=JobOut,
        status_code=202,
        responses={404: {"description": "No such job."}, 409: {"description": "Not failed."}},
    )
    def resume_job(job_id: JobId, _: Auth) -> dict[str, Any]:
        """Re-run a failed job; files already committed are skipped (no duplicates)."""
        _job_or_404(svc.jobs.get(job_id), job_id)
        try:
            return svc.jobs.resume(job_id).to_dict()
        except ValueError as e:
            raise HTTPException(409, str(e)) from e

    # -- ask --------------------------------------------------------------------------
    @app.post(
        "/v1/ask",
        tags=["ask"],
        responses={
            200: {"content": {"text/event-stream": {}}},
            501: {"description": "Answers are not available."},
        },
    )
    def ask(body: AskRequest, request: Request, _: Auth) -> Response:
        """A cited answer; with ``stream`` (or ``Accept: text/event-stream``) as server-sent
        events: ``delta`` events with text pieces, one ``answer`` event, then ``done``."""
        _check_query("question", body.question, serve.max_query_chars)
        kb = svc.require(body.collection)
        if not hasattr(kb, "ask_stream"):
            raise HTTPException(501, "cited answers are not available in this version")
        stream = body.stream or "text/event-stream" in request.headers.get("accept", "")
        if not stream:
            answer = _kb_call(lambda: kb.ask(body.question))
            return JSONResponse(_answer_out(svc, body.collection, answer))
        pieces = _kb_call(lambda: iter(kb.ask_stream(body.question)))
        first = _kb_call(lambda: next(pieces, None))  # errors before the stream: a 4xx
        return StreamingResponse(
            _sse(svc, body.collection, first, pieces),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    return app


# -- helpers -------------------------------------------------------------------------------


def _writable(path: Path) -> bool:
    import os

    return path.is_dir() and os.access(path, os.W_OK)


def _check_query(field: str, text: str, limit: int) -> None:
    if not text.strip():
        raise HTTPException(422, f"{field}: must contain non-space characters")
    if len(text) > limit:
        raise HTTPException(422, f"{field}: at most {limit} characters, got {len(text)}")
    if "\x00" in text:
        raise HTTPException(422, f"{field}: must not contain NUL characters")


def _kb_call(fn: Callable[[], Any]) -> Any:
    """Map the knowledge base's user-facing errors to 4xx; anything else is a real 500."""
    try:
        return fn()
    except (StoreError, RoutingError) as e:  # e.g. a saved router for other experts
        raise HTTPException(409, str(e)) from e
    except ValueError as e:
        raise HTTPException(400, str(e)) from e
    except FileNotFoundError as e:
        raise HTTPException(503, str(e)) from e


def _resolve(kb: KnowledgeBase) -> None:
    kb.store  # noqa: B018
    kb.retriever  # noqa: B018
    kb.reranker  # noqa: B018


def _search(
    kb: KnowledgeBase, query: str, k: int, mode: Any, where: str | None, rerank: bool
) -> list[Hit]:
    if kb.store.count() == 0:
        return []  # a new collection has no full-text index yet
    return list(_kb_call(lambda: kb.search(query, k=k, mode=mode, where=where, rerank=rerank)))


def _upload_name(f: UploadFile, default: str | None = None) -> str:
    raw = f.filename or default or ""
    try:
        name = safe_filename(raw)
        kind_of(name)
    except ValueError as e:
        status = 415 if "unsupported file type" in str(e) else 400
        raise HTTPException(status, f"files: {e}") from e
    return name


def _read_upload(f: UploadFile, limit: int) -> bytes:
    data = f.file.read(limit + 1)
    if len(data) > limit:
        raise HTTPException(413, f"files: {f.filename!r} is larger than {limit} bytes")
    return data


def _check(name: str, data: bytes, declared: str | None, max_pixels: int) -> str:
    try:
        return check_content(name, data, declared, max_pixels)
    except ContentError as e:
        raise HTTPException(e.status, f"files: {e}") from e


def _job_or_404(job: Job | None, job_id: str) -> Job:
    if job is None:
        raise HTTPException(404, f"no job {job_id!r}")
    return job


def _answer_out(svc: Service, collection: str, answer: Any) -> dict[str, Any]:
    d: dict[str, Any] = dict(answer.to_dict())
    cites = []
    for c in d.get("citations", []) or []:
        c = dict(c)
        c.update(svc.describe(str(c.get("source", ""))))
        if isinstance(c.get("score"), float):
            c["score"] = _finite(c["score"])
        cites.append(c)
    d["citations"] = cites
    d["collection"] = collection
    return d


def _event(name: str, data: Any) -> str:
    return f"event: {name}\ndata: {json.dumps(data)}\n\n"


def _sse(svc: Service, collection: str, first: Any, rest: Iterator[Any]) -> Iterator[str]:
    def pieces() -> Iterator[Any]:
        if first is not None:
            yield first
        yield from rest

    try:
        for p in pieces():
            if isinstance(p, str):
                yield _event("delta", {"text": p})
            else:
                yield _event("answer", _answer_out(svc, collection, p))
    except Exception as e:  # the status line is sent: report in-band, then end
        log.exception("ask stream failed")
        yield _event("error", {"message": f"{type(e).__name__}: {e}"})
    yield _event("done", {})


def _drop_collection(settings: Settings, name: str) -> None:
    import lancedb

    db = lancedb.connect(str(settings.store_dir))
    # A meta file without a table leaves only the meta file to remove.
    with contextlib.suppress(ValueError, FileNotFoundError):
        db.drop_table(name)
    (settings.store_dir / f"{name}.meta.json").unlink(missing_ok=True)


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        fields = []
        for err in exc.errors():
            loc = ".".join(str(p) for p in err.get("loc", ()) if p not in ("body",))
            fields.append({"field": loc or "body", "problem": str(err.get("msg", "invalid"))})
        message = "; ".join(f"{f['field']}: {f['problem']}" for f in fields) or "invalid request"
        return JSONResponse(error_body(422, message, fields), status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(
            error_body(exc.status_code, str(exc.detail)),
            status_code=exc.status_code,
            headers=exc.headers,
        )

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return JSONResponse(
            error_body(500, "internal error (logged on the server)"), status_code=500
        )
