"""HTTP search service and its web page (FastAPI).

The Searcher is opened once, on the first request that needs it, and asked on every request
whether CURRENT moved (one small file read), so a build published later is served without a
restart. Images are only ever served from the content-addressed store, by a validated media_id.
"""

from __future__ import annotations

import base64
import binascii
import functools
import re
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated

from fastapi import FastAPI, File, HTTPException, Query, UploadFile
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field, model_validator
from starlette.concurrency import run_in_threadpool

from . import layout
from .errors import UserError
from .ingest import BadImageError, inspect_image
from .search import Searcher, SearchResults, Term

STATIC_DIR = Path(__file__).parent / "static"
MAX_QUERY_CHARS = 1000
MAX_K = 200
MEDIA_ID = r"^[0-9a-f]{64}$"
# Module level: with postponed annotations FastAPI must be able to resolve the alias by name.
TopK = Annotated[int, Query(ge=1, le=MAX_K, description="number of results")]
Collapse = Annotated[
    float | None, Query(ge=-1, le=1, description="fold results within this cosine of a higher one (e.g. 0.96)")
]
Where = Annotated[str | None, Query(max_length=1000, description="filter, e.g. width >= 512 AND caption LIKE '%dog%'")]


class QueryTerm(BaseModel):
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


class CombinedQuery(BaseModel):
    terms: list[QueryTerm] = Field(min_length=1, max_length=16)
    k: int = Field(10, ge=1, le=MAX_K)
    where: str | None = Field(None, max_length=1000)
    collapse: float | None = Field(None, ge=-1, le=1)


CONTENT_TYPES = {
    "jpg": "image/jpeg",
    "png": "image/png",
    "webp": "image/webp",
    "gif": "image/gif",
    "bmp": "image/bmp",
    "tiff": "image/tiff",
}


class _SearcherHolder:
    """Opens the Searcher once (503 until an index exists), then follows CURRENT."""

    def __init__(self, data_dir: Path, model_version: str | None, precision: str = "auto"):
        self.data_dir = data_dir
        self.model_version = model_version
        self.precision = precision
        self.searcher: Searcher | None = None
        self.lock = threading.Lock()

    def get(self) -> Searcher:
        try:
            with self.lock:
                if self.searcher is None:
                    self.searcher = Searcher.open(self.data_dir, self.model_version, precision=self.precision)
                else:
                    self.searcher.refresh()
                return self.searcher
        except UserError as err:
            raise HTTPException(status_code=503, detail=str(err)) from None


def _payload(searcher: Searcher, results: SearchResults, query: dict) -> dict:
    return {
        "query": query,
        "model_version": searcher.model_version,
        "build_id": searcher.info["build_id"],
        "notes": results.notes,
        "results": [r.to_dict() for r in results],
    }


def create_app(
    data_dir: str | Path | None = None,
    model_version: str | None = None,
    max_upload_bytes: int = 10 << 20,
    *,
    cors_origins: Sequence[str] = (),
    allow_url_queries: bool = False,
    serve_images: bool = False,
    precision: str = "auto",
) -> FastAPI:
    root = layout.data_root(data_dir)
    holder = _SearcherHolder(root, model_version, precision)
    app = FastAPI(title="rayclip", summary="Text→image and image→image search over a rayclip gold build.")
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    @app.exception_handler(UserError)
    async def user_error(_request, err: UserError) -> JSONResponse:
        return JSONResponse(status_code=422, content={"detail": str(err)})

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def page() -> HTMLResponse:
        return HTMLResponse((STATIC_DIR / "index.html").read_text(encoding="utf-8"))

    @app.get("/healthz")
    def healthz() -> dict:
        return {"ok": True}

    @app.get("/api/status")
    def status() -> dict:
        return holder.get().info

    @app.get("/api/search")
    def search_text(
        q: Annotated[str, Query(min_length=1, max_length=MAX_QUERY_CHARS)],
        k: TopK = 10,
        collapse: Collapse = None,
        where: Where = None,
    ) -> dict:
        if not q.strip():
            raise HTTPException(status_code=422, detail="the query is empty")
        searcher = holder.get()
        results = searcher.search_text(q, k, collapse=collapse, where=where)
        return _payload(searcher, results, {"q": q, "k": k, "collapse": collapse, "where": where})

    @app.post("/api/search")
    def search_combined(query: CombinedQuery) -> dict:
        """rclip-style arithmetic: the weighted sum of text, image and stored-vector terms."""
        terms = [_term(term, max_upload_bytes) for term in query.terms]
        searcher = holder.get()
        results = searcher.search(terms, query.k, where=query.where, collapse=query.collapse)
        return _payload(searcher, results, query.model_dump(exclude={"terms"}) | {"terms": len(terms)})

    @app.get("/api/search/similar")
    def search_similar(
        media_id: Annotated[str, Query(pattern=MEDIA_ID)], k: TopK = 10, collapse: Collapse = None, where: Where = None
    ) -> dict:
        searcher = holder.get()
        try:
            vector = searcher.stored_vector(media_id)  # the indexed vector: no decode, no encode
        except UserError as err:
            raise HTTPException(status_code=404, detail=str(err)) from None
        results = searcher.search_vectors(vector[None], k, collapse=collapse, where=where)[0]
        return _payload(searcher, results, {"media_id": media_id, "k": k, "collapse": collapse, "where": where})

    @app.post("/api/search/image")
    async def search_image(
        file: Annotated[UploadFile, File(description="an image")],
        k: TopK = 10,
        collapse: Collapse = None,
        where: Where = None,
    ) -> dict:
        data = await file.read(max_upload_bytes + 1)
        if len(data) > max_upload_bytes:
            raise HTTPException(status_code=413, detail=f"image larger than {max_upload_bytes} bytes")
        try:
            inspect_image(data)
        except BadImageError as bad:
            raise HTTPException(status_code=415, detail=f"not an image we can read: {bad}") from None
        searcher = holder.get()
        # Encoding is CPU work: off the event loop, like the sync endpoints.
        results = await run_in_threadpool(
            functools.partial(searcher.search_image, data, k, collapse=collapse, where=where)
        )
        return _payload(searcher, results, {"upload": file.filename, "k": k, "collapse": collapse, "where": where})

    @app.get("/api/images/{media_id}")
    def image(media_id: str) -> FileResponse:
        if not re.match(MEDIA_ID, media_id):
            raise HTTPException(status_code=422, detail="media_id must be 64 lowercase hex characters")
        path = _object_path(root, media_id)
        return FileResponse(path, media_type=CONTENT_TYPES.get(path.suffix[1:], "application/octet-stream"))

    _add_clip_back(app, holder, max_upload_bytes, cors_origins, allow_url_queries, serve_images)
    return app


def _term(term: QueryTerm, max_bytes: int) -> Term:
    if term.text is not None:
        return Term("text", term.text, term.weight)
    if term.media_id is not None:
        return Term("media_id", term.media_id, term.weight)
    try:
        data = base64.b64decode(term.image, validate=True)
    except (binascii.Error, ValueError):
        raise HTTPException(status_code=422, detail="an image term must be base64") from None
    if len(data) > max_bytes:
        raise HTTPException(status_code=413, detail=f"image larger than {max_bytes} bytes")
    return Term("image", data, term.weight)


def _add_clip_back(
    app: FastAPI,
    holder: _SearcherHolder,
    max_upload_bytes: int,
    cors_origins: Sequence[str],
    allow_url_queries: bool,
    serve_images: bool,
) -> None:
    """clip-retrieval's back-end routes (clip_back.py), and CORS so that its front, served from
    another origin, may call them."""
    from fastapi.middleware.cors import CORSMiddleware

    from . import clip_back

    def open_searcher(model_version: str) -> Searcher:
        # The model_version the page serves shares its Searcher: one model and index in memory.
        if model_version == holder.model_version or layout.gold_model_versions(holder.data_dir) == [model_version]:
            return holder.get()
        return Searcher.open(holder.data_dir, model_version, precision=holder.precision)

    routes = clip_back.router(
        holder.data_dir,
        holder.model_version,
        open_searcher=open_searcher,
        max_image_bytes=max_upload_bytes,
        allow_url_queries=allow_url_queries,
        serve_images=serve_images,
    )
    app.include_router(routes, dependencies=[])  # the API key dependency goes here, as for /api/*
    if cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(cors_origins),
            allow_methods=["GET", "POST"],
            allow_headers=["*"],
            expose_headers=[clip_back.BUILD_HEADER, clip_back.IGNORED_HEADER],
        )


def _object_path(root: Path, media_id: str) -> Path:
    """The stored object of a validated media_id; only ever a file inside bronze/objects."""
    matches = sorted(layout.objects_dir(root).glob(f"{media_id[:2]}/{media_id}.*"))
    if not matches:
        raise HTTPException(status_code=404, detail=f"no image {media_id}")
    return matches[0]
