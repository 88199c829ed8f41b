"""HTTP search service and its web page (FastAPI).

Every route asks one QueryService (query/service.py) for its Searcher: opened at startup, before
the port opens, when an index exists (else on the first request after one is published; 503
until then), and asked on every request whether CURRENT moved (one small file read), so a build
published later is served without a restart, on a local data root and an object store alike.
Results name the build they came from; the status of every error is decided in http/errors.py.
Images are only ever served from the content-addressed store, by a validated media_id, streamed
in chunks through storage.

Off loopback: an API key guards /api/* and /metrics (`require_api_key`), queries that encode
are admitted only while fewer than `queue_depth` are in flight (503 + Retry-After beyond), and
bodies and query strings have hard size limits. /metrics speaks Prometheus.
"""

from __future__ import annotations

import contextlib
import functools
import hmac
import ipaddress
import re
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Annotated, Literal

from fastapi import Depends, FastAPI, File, HTTPException, Query, Request, UploadFile
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from pydantic import Field, model_validator
from starlette.concurrency import run_in_threadpool

from ..errors import NoIndexError, UnknownModelVersionError, UserError
from ..images import ImageTooLargeError, decode_base64
from ..options import DEFAULT_COLLAPSE, SEARCH_OVER, SearchOptions, ServeOptions
from ..query.knn import Residency, Shard
from ..query.searcher import Searcher, SearchResults, Term, summary
from ..query.service import QueryService
from ..store import catalog, storage
from ..store.catalog import BuildInfo
from ..store.storage import Location
from . import errors
from .errors import Body

STATIC_DIR = Path(__file__).parent / "static"
API_KEY_ENV = "RAYCLIP_API_KEY"
KEY_COOKIE = "rayclip_api_key"  # set by the page (static/auth.js) for image requests only
DEFAULT_QUEUE_DEPTH = ServeOptions.queue_depth  # queries encoding or waiting to encode at once; the next gets a 503
RETRY_AFTER_S = 1
MAX_QUERY_STRING_BYTES = 4096
CLIP_BACK_PATHS = ("/knn-service", "/metadata", "/indices-list")  # clip-retrieval's routes (clip_back.py)
MULTIPART_OVERHEAD_BYTES = 64 << 10  # a body may exceed the largest upload by this much (form headers)
MAX_QUERY_CHARS = 1000
# /api/* takes no model_version: the server's operator names the one served; a client can name one on /knn-service.
SERVED_BY = "`rayclip serve --model-version` when the server starts (or indice_name on /knn-service)"
MAX_K = 200
MEDIA_ID = r"^[0-9a-f]{64}$"
IMAGE_CACHE = "private, max-age=31536000, immutable"  # its name is the hash of its bytes; private: it may be keyed
# Module level: with postponed annotations FastAPI must be able to resolve the alias by name.
TopK = Annotated[int, Query(ge=1, le=MAX_K, description="number of results")]
Collapse = Annotated[
    float | None, Query(ge=-1, le=1, description="fold results within this cosine of a higher one (e.g. 0.96)")
]
Where = Annotated[str | None, Query(max_length=1000, description="filter, e.g. width >= 512 AND caption LIKE '%dog%'")]
Over = Annotated[Literal[SEARCH_OVER], Query(description="search the image index or the caption index")]


class QueryTerm(Body):
    """Exactly one of text, media_id (its stored vector) or image (base64 bytes), with a weight."""

    text: str | None = Field(None, min_length=1, max_length=MAX_QUERY_CHARS)
    media_id: str | None = Field(None, pattern=MEDIA_ID)
    image: str | None = Field(None, description="base64-encoded image bytes")
    weight: float = Field(1.0, ge=-100, le=100)

    @model_validator(mode="after")
    def one_kind(self) -> QueryTerm:
        if sum(v is not None for v in (self.text, self.media_id, self.image)) != 1:
            raise ValueError("each term needs exactly one of text, media_id or image")
        return self


class CombinedQuery(Body):
    terms: list[QueryTerm] = Field(min_length=1, max_length=16)
    k: int = Field(SearchOptions.k, ge=1, le=MAX_K)
    where: str | None = Field(None, max_length=1000)
    collapse: float | None = Field(None, ge=-1, le=1)
    over: Literal[SEARCH_OVER] = SearchOptions.over


CONTENT_TYPES = {
    "jpg": "image/jpeg",
    "png": "image/png",
    "webp": "image/webp",
    "gif": "image/gif",
    "bmp": "image/bmp",
    "tiff": "image/tiff",
}


class _Metrics:
    """The service's Prometheus metrics, in a registry of its own (one per app)."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        self.requests = Counter(
            "rayclip_requests", "HTTP requests answered", ["endpoint", "status"], registry=self.registry
        )
        self.query_seconds = Histogram(
            "rayclip_query_phase_seconds",
            "Seconds per query phase: encode (the model), search (FAISS), join (the mapping)",
            ["phase"],
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=self.registry,
        )
        self.in_flight = Gauge(
            "rayclip_queries_in_flight", "Queries admitted and not yet answered", registry=self.registry
        )
        self.build = Gauge(
            "rayclip_build_info",
            "The build served (1 for the served one)",
            ["model_version", "build_id"],
            registry=self.registry,
        )
        self.vectors = Gauge("rayclip_index_vectors", "Vectors in the build served", registry=self.registry)

    def observe_phase(self, phase: str, seconds: float) -> None:
        self.query_seconds.labels(phase).observe(seconds)

    def exposition(self, searcher: Searcher | None) -> bytes:
        from prometheus_client import generate_latest

        if searcher is not None:
            info = summary(searcher)
            self.build.clear()
            self.build.labels(info["model_version"], info["build_id"]).set(1)
            self.vectors.set(info["count"])
        return generate_latest(self.registry)


class _EncodeGate:
    """Admits at most `depth` queries that encode; the event loop alone counts, so no lock."""

    def __init__(self, depth: int, metrics: _Metrics) -> None:
        self.depth, self.metrics, self.admitted = depth, metrics, 0

    async def __call__(self):
        if self.admitted >= self.depth:
            raise HTTPException(
                status_code=503,
                detail=f"busy: {self.admitted} queries in flight (queue depth {self.depth}); retry shortly",
                headers={"Retry-After": str(RETRY_AFTER_S)},
            )
        self.admitted += 1
        self.metrics.in_flight.inc()
        try:
            yield
        finally:
            self.admitted -= 1
            self.metrics.in_flight.dec()


async def require_api_key(request: Request) -> None:
    """FastAPI dependency: when the app has an API key, the request must carry `Authorization: Bearer <key>`."""
    key = request.app.state.api_key
    if not key:
        return
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not _same(token.strip(), key):
        raise HTTPException(
            status_code=401,
            detail="missing or wrong API key: send Authorization: Bearer <key>",
            headers={"WWW-Authenticate": "Bearer"},
        )


def _same(given: str, key: str) -> bool:
    return hmac.compare_digest(given.encode(), key.encode())


async def _guard_api(request: Request) -> None:
    """The key guards the API, clip-retrieval's routes and the metrics; the pages, their assets and
    /healthz stay open.

    An <img> cannot send a header, so images also take the key from the page's same-site cookie.
    """
    path = request.url.path
    cookie = request.cookies.get(KEY_COOKIE)
    if path.startswith("/api/images/") and cookie and request.app.state.api_key:
        if _same(cookie, request.app.state.api_key):
            return
    if path.startswith(("/api/", "/metrics", *CLIP_BACK_PATHS)):
        await require_api_key(request)


def check_bind(host: str, api_key: str | None, allow_anonymous: bool) -> None:
    """Refuse to serve anonymously on anything but loopback, unless asked to in so many words."""
    if api_key or allow_anonymous or _is_loopback(host):
        return
    raise UserError(
        f"refusing to serve {host} without an API key: pass --api-key (or set ${API_KEY_ENV}), "
        "or --allow-anonymous to serve it to anyone who can reach it"
    )


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


def _payload(results: SearchResults, query: dict) -> dict:
    """The answer of every /api search: the build named is the one the results came from."""
    return {
        "query": query,
        "model_version": results.model_version,
        "build_id": results.build_id,
        "notes": results.notes,
        "results": [r.to_dict() for r in results],
    }


def create_app(
    data_dir: str | Path | None = None,
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
    """The service; api_key None means anonymous (bind it to loopback, see check_bind). The image
    index is read into RAM, or mapped (`mmap`, or over `max_index_memory`); a build kept in shards
    is searched here, or through `remote_shards(build, shard)` (Ray Serve's handles, ray_serve.py)."""
    root = storage.data_root(data_dir)
    metrics = _Metrics()
    residency = Residency(mmap, max_index_memory, remote_shards)
    service = QueryService(root, model_version, precision=precision, observe=metrics.observe_phase, residency=residency)
    encode_slot = Depends(_EncodeGate(queue_depth, metrics))

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
        dependencies=[Depends(_guard_api)],
        lifespan=load_before_listening,
    )
    app.state.api_key = api_key
    app.state.service = service
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    _add_limits_and_counts(app, metrics, max_upload_bytes + MULTIPART_OVERHEAD_BYTES)
    errors.install(app)

    def served() -> Searcher:
        """The served model_version's Searcher: /api/* names none, the server's start-up chose it."""
        try:
            return service.searcher()
        except UnknownModelVersionError as err:
            raise err.named_by(SERVED_BY) from None

    def find(
        terms: list[Term], k: int, where: str | None, collapse: float | None, over: str = SearchOptions.over
    ) -> SearchResults:
        return served().find([terms], SearchOptions(k=k, where=where, collapse=collapse, over=over))[0]

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def page() -> HTMLResponse:
        return HTMLResponse((STATIC_DIR / "index.html").read_text(encoding="utf-8"))

    @app.get("/healthz")
    def healthz() -> dict:
        """Up: when served by `rayclip serve`, the port opened after the model and index loaded."""
        return {"ok": True}

    @app.get("/api/defaults")
    def defaults() -> dict:
        """What the page starts from: SearchOptions' k, the cosine a collapse folds at, the largest k."""
        return {"k": SearchOptions.k, "collapse": DEFAULT_COLLAPSE, "max_k": MAX_K}

    @app.get("/api/status")
    def status() -> dict:
        """The build served, and this process's memory: resident private vs file-backed (mapped) bytes."""
        from ..store.status import process_memory

        return summary(served()) | {"memory": process_memory()}

    @app.get("/status", response_class=HTMLResponse, include_in_schema=False)
    def status_page() -> HTMLResponse:
        return HTMLResponse((STATIC_DIR / "status.html").read_text(encoding="utf-8"))

    @app.get("/api/overview")
    def overview() -> dict:
        """What the status page draws: the layers, builds (CURRENT marked, with eval), recent runs."""
        from ..store.status import status as layer_status

        return layer_status(root)

    @app.get("/metrics", include_in_schema=False)
    def prometheus_metrics() -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST

        return Response(metrics.exposition(service.cached()), media_type=CONTENT_TYPE_LATEST)

    @app.get("/api/search", dependencies=[encode_slot])
    def search_text(
        q: Annotated[str, Query(min_length=1, max_length=MAX_QUERY_CHARS)],
        k: TopK = SearchOptions.k,
        collapse: Collapse = None,
        where: Where = None,
        over: Over = SearchOptions.over,
    ) -> dict:
        results = find([Term("text", q)], k, where, collapse, over)
        echoed = {"q": q, "k": k, "collapse": collapse, "where": where}
        return _payload(results, echoed | ({"over": over} if over != SearchOptions.over else {}))

    @app.post("/api/search", dependencies=[encode_slot])
    def search_combined(query: CombinedQuery) -> dict:
        """rclip-style arithmetic: the weighted sum of text, image and stored-vector terms."""
        terms = [_term(term, max_upload_bytes) for term in query.terms]
        results = find(terms, query.k, query.where, query.collapse, query.over)
        return _payload(results, query.model_dump(exclude={"terms"}) | {"terms": len(terms)})

    @app.get("/api/search/similar", dependencies=[encode_slot])
    def search_similar(
        media_id: Annotated[str, Query(pattern=MEDIA_ID)],
        k: TopK = SearchOptions.k,
        collapse: Collapse = None,
        where: Where = None,
    ) -> dict:
        results = find([Term("media_id", media_id)], k, where, collapse)  # the indexed vector: no decode, no encode
        return _payload(results, {"media_id": media_id, "k": k, "collapse": collapse, "where": where})

    @app.post("/api/search/image", dependencies=[encode_slot])
    async def search_image(
        file: Annotated[UploadFile, File(description="an image")],
        k: TopK = SearchOptions.k,
        collapse: Collapse = None,
        where: Where = None,
    ) -> dict:
        data = await file.read(max_upload_bytes + 1)
        if len(data) > max_upload_bytes:
            raise ImageTooLargeError(f"image larger than {max_upload_bytes} bytes")
        # Decoding and encoding are CPU work: off the event loop, like the sync endpoints.
        results = await run_in_threadpool(functools.partial(find, [Term("image", data)], k, where, collapse))
        return _payload(results, {"upload": file.filename, "k": k, "collapse": collapse, "where": where})

    @app.get("/api/images/{media_id}")
    def image(media_id: str) -> StreamingResponse:
        if not re.match(MEDIA_ID, media_id):
            raise HTTPException(status_code=422, detail="media_id must be 64 lowercase hex characters")
        stored = catalog.find_object(root, media_id)
        if stored is None:
            raise HTTPException(status_code=404, detail=f"no image {media_id}")
        return StreamingResponse(
            _chunks(stored),
            media_type=CONTENT_TYPES.get(stored.suffix[1:], "application/octet-stream"),
            headers={"Content-Length": str(storage.size(stored)), "Cache-Control": IMAGE_CACHE},
        )

    _add_clip_back(app, service, encode_slot, max_upload_bytes, cors_origins, allow_url_queries, serve_images)
    return app


def _term(term: QueryTerm, max_bytes: int) -> Term:
    if term.text is not None:
        return Term("text", term.text, term.weight)
    if term.media_id is not None:
        return Term("media_id", term.media_id, term.weight)
    return Term("image", decode_base64(term.image, max_bytes, "an image term"), term.weight)


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
    # The app-wide key guard covers these routes too (_guard_api); the queue bounds their encodes.
    app.include_router(routes, dependencies=[encode_slot])
    if cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(cors_origins),
            allow_methods=["GET", "POST"],
            allow_headers=["*"],
            expose_headers=[clip_back.BUILD_HEADER, clip_back.IGNORED_HEADER],
        )


def _add_limits_and_counts(app: FastAPI, metrics: _Metrics, max_body_bytes: int) -> None:
    """Refuse oversized query strings (414) and declared bodies (413) before any work; count every answer."""

    @app.middleware("http")
    async def limits_and_counts(request: Request, call_next):
        started = time.perf_counter()
        declared = request.headers.get("content-length", "0")
        if len(request.scope.get("query_string", b"")) > MAX_QUERY_STRING_BYTES:
            response = JSONResponse(
                status_code=414, content={"detail": f"query string over {MAX_QUERY_STRING_BYTES} bytes"}
            )
        elif not declared.isdigit() or int(declared) > max_body_bytes:
            response = JSONResponse(status_code=413, content={"detail": f"request body over {max_body_bytes} bytes"})
        elif request.method in ("POST", "PUT", "PATCH") and "content-length" not in request.headers:
            response = JSONResponse(status_code=411, content={"detail": "a request body needs a Content-Length"})
        else:
            response = await call_next(request)
        route = request.scope.get("route")
        endpoint = route.path if route is not None else "unmatched"
        metrics.requests.labels(endpoint, str(response.status_code)).inc()
        if endpoint.startswith("/api/search"):
            metrics.query_seconds.labels("total").observe(time.perf_counter() - started)
        return response


def _chunks(stored: Location) -> Iterator[bytes]:
    """The object's bytes a chunk at a time (Starlette runs this in its thread pool); a client that
    goes away closes the generator, and with it the object."""
    with storage.open_input(stored) as f:
        while chunk := f.read(storage.CHUNK_BYTES):
            yield chunk
