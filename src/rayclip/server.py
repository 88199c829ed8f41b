"""HTTP search service and its web page (FastAPI).

The Searcher is opened once, on the first request that needs it, and asked on every request
whether CURRENT moved (one small file read), so a build published later is served without a
restart. Images are only ever served from the content-addressed store, by a validated media_id.
"""

from __future__ import annotations

import re
import threading
from pathlib import Path
from typing import Annotated

from fastapi import FastAPI, File, HTTPException, Query, UploadFile
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool

from . import layout
from .errors import UserError
from .ingest import BadImageError, inspect_image
from .search import Searcher, SearchResults

STATIC_DIR = Path(__file__).parent / "static"
MAX_QUERY_CHARS = 1000
MAX_K = 200
MEDIA_ID = r"^[0-9a-f]{64}$"
# Module level: with postponed annotations FastAPI must be able to resolve the alias by name.
TopK = Annotated[int, Query(ge=1, le=MAX_K, description="number of results")]
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
    def search_text(q: Annotated[str, Query(min_length=1, max_length=MAX_QUERY_CHARS)], k: TopK = 10) -> dict:
        if not q.strip():
            raise HTTPException(status_code=422, detail="the query is empty")
        searcher = holder.get()
        return _payload(searcher, searcher.search_text(q, k), {"q": q, "k": k})

    @app.get("/api/search/similar")
    def search_similar(media_id: Annotated[str, Query(pattern=MEDIA_ID)], k: TopK = 10) -> dict:
        searcher = holder.get()
        return _payload(
            searcher,
            searcher.search_image(_object_path(root, media_id).read_bytes(), k),
            {"media_id": media_id, "k": k},
        )

    @app.post("/api/search/image")
    async def search_image(file: Annotated[UploadFile, File(description="an image")], k: TopK = 10) -> dict:
        data = await file.read(max_upload_bytes + 1)
        if len(data) > max_upload_bytes:
            raise HTTPException(status_code=413, detail=f"image larger than {max_upload_bytes} bytes")
        try:
            inspect_image(data)
        except BadImageError as bad:
            raise HTTPException(status_code=415, detail=f"not an image we can read: {bad}") from None
        searcher = holder.get()
        # Encoding is CPU work: off the event loop, like the sync endpoints.
        results = await run_in_threadpool(searcher.search_image, data, k)
        return _payload(searcher, results, {"upload": file.filename, "k": k})

    @app.get("/api/images/{media_id}")
    def image(media_id: str) -> FileResponse:
        if not re.match(MEDIA_ID, media_id):
            raise HTTPException(status_code=422, detail="media_id must be 64 lowercase hex characters")
        path = _object_path(root, media_id)
        return FileResponse(path, media_type=CONTENT_TYPES.get(path.suffix[1:], "application/octet-stream"))

    return app


def _object_path(root: Path, media_id: str) -> Path:
    """The stored object of a validated media_id; only ever a file inside bronze/objects."""
    matches = sorted(layout.objects_dir(root).glob(f"{media_id[:2]}/{media_id}.*"))
    if not matches:
        raise HTTPException(status_code=404, detail=f"no image {media_id}")
    return matches[0]
