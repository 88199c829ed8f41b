"""HTTP search service and its web page (FastAPI): the app factory, its start-up, and the pages.

Every route asks one QueryService (query/service.py) for its Searcher: opened at startup, before
the port opens, when an index exists (else on the first request after one is published; 503
until then), and asked on every request whether CURRENT moved (one small file read), so a build
published later is served without a restart, on a local data root and an object store alike.
The status of every error is decided in http/errors.py. Images are only ever served from the
content-addressed store, by a validated media_id, streamed in chunks through storage.

The concerns, a module each: api.py (the /api/* routes), clip_back.py (clip-retrieval's routes),
guard.py (the API key off loopback), admission.py (queue depth and size limits), metrics.py
(/metrics, Prometheus).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from pathlib import Path

from fastapi import Depends, FastAPI
from fastapi.responses import HTMLResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool

from ..errors import NoIndexError, UnknownModelVersionError
from ..options import ServeOptions
from ..query.knn import Residency, Shard
from ..query.service import QueryService
from ..store import storage
from ..store.catalog import BuildInfo
from . import api, errors
from .admission import EncodeGate, add_limits_and_counts
from .guard import guard_api
from .metrics import Metrics

STATIC_DIR = Path(__file__).parent / "static"


def create_app(
    data_dir: storage.Location | str | None = None,
    model_version: str | None = None,
    max_upload_bytes: int = ServeOptions().max_upload_bytes,
    *,
    cors_origins: Sequence[str] = ServeOptions.cors_origin,
    allow_url_queries: bool = ServeOptions.allow_url_queries,
    serve_images: bool = ServeOptions.serve_images,
    precision: str = ServeOptions.precision,
    api_key: str | None = ServeOptions.api_key,
    queue_depth: int = ServeOptions.queue_depth,
    mmap: bool = ServeOptions.mmap,
    max_index_memory: str | int = ServeOptions.max_index_memory,
    remote_shards: Callable[[BuildInfo, int], Shard] | None = None,
) -> FastAPI:
    """The service; api_key None means anonymous (bind it to loopback, see guard.check_bind). The image
    index is read into RAM, or mapped (`mmap`, or over `max_index_memory`); a build kept in shards
    is searched here, or through `remote_shards(build, shard)` (Ray Serve's handles, ray_serve.py)."""
    root = storage.resolved(data_dir)
    metrics = Metrics()
    residency = Residency(mmap, max_index_memory, remote_shards)
    service = QueryService(root, model_version, precision=precision, observe=metrics.observe_phase, residency=residency)
    encode_slot = Depends(EncodeGate(queue_depth, metrics))

    @contextlib.asynccontextmanager
    async def load_before_listening(_app: FastAPI):
        """Open the served Searcher (model and index) before the server takes connections, so the
        first query is as fast as the next; with no index yet, or a store that gives up, queries
        answer 503 until there is one (and the store answers)."""
        with contextlib.suppress(NoIndexError, UnknownModelVersionError, storage.StoreError):
            await run_in_threadpool(service.searcher)
        yield

    app = FastAPI(
        title="rayclip",
        summary="Text→image and image→image search over a rayclip gold build.",
        dependencies=[Depends(guard_api)],
        lifespan=load_before_listening,
    )
    app.state.api_key = api_key
    app.state.service = service
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    add_limits_and_counts(app, metrics, max_upload_bytes)
    errors.install(app)
    _add_pages(app, metrics, service)
    app.include_router(api.router(service, root, encode_slot, max_upload_bytes))
    _add_clip_back(app, service, encode_slot, max_upload_bytes, cors_origins, allow_url_queries, serve_images)
    return app


def _add_pages(app: FastAPI, metrics: Metrics, service: QueryService) -> None:
    """The web page, the status page, /healthz and /metrics."""

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def page() -> HTMLResponse:
        return HTMLResponse((STATIC_DIR / "index.html").read_text(encoding="utf-8"))

    @app.get("/healthz")
    def healthz() -> dict:
        """Up: when served by `rayclip serve`, the port opened after the model and index loaded."""
        return {"ok": True}

    @app.get("/status", response_class=HTMLResponse, include_in_schema=False)
    def status_page() -> HTMLResponse:
        return HTMLResponse((STATIC_DIR / "status.html").read_text(encoding="utf-8"))

    @app.get("/metrics", include_in_schema=False)
    def prometheus_metrics() -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST

        return Response(metrics.exposition(service.cached()), media_type=CONTENT_TYPE_LATEST)


def _add_clip_back(
    app: FastAPI,
    service: QueryService,
    encode_slot,
    max_upload_bytes: int,
    cors_origins: Sequence[str],
    allow_url_queries: bool,
    serve_images: bool,
) -> None:
    """clip-retrieval's back-end routes (clip_back.py), and CORS so that its front, served from
    another origin, may call them."""
    from fastapi.middleware.cors import CORSMiddleware

    from . import clip_back

    routes = clip_back.router(
        service,  # the same Searchers as /api/*: one model and index in memory per model_version
        max_image_bytes=max_upload_bytes,
        allow_url_queries=allow_url_queries,
        serve_images=serve_images,
    )
    # The app-wide key guard covers these routes too (guard.guard_api); the queue bounds their encodes.
    app.include_router(routes, dependencies=[encode_slot])
    if cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(cors_origins),
            allow_methods=["GET", "POST"],
            allow_headers=["*"],
            expose_headers=[clip_back.BUILD_HEADER, clip_back.IGNORED_HEADER],
        )
