"""The JSON API, /api/*: search (text, combined terms, similar to a stored image, an uploaded
image), the search defaults the page starts from, the build served and the data root's overview,
and the stored images by media_id. Each search route asks the QueryService for the served
Searcher; results name the build they came from."""

from __future__ import annotations

import functools
import re
from collections.abc import Iterator
from typing import Annotated, Literal

from fastapi import APIRouter, File, HTTPException, Query, UploadFile
from fastapi.responses import StreamingResponse
from pydantic import Field, model_validator
from starlette.concurrency import run_in_threadpool

from ..errors import UnknownModelVersionError
from ..images import ImageTooLargeError, decode_base64
from ..options import COLLAPSE_RANGE, DEFAULT_COLLAPSE, SEARCH_OVER, SearchOptions
from ..query.filters import MAX_FILTER_CHARS
from ..query.results import SearchResults
from ..query.searcher import Searcher, summary
from ..query.service import QueryService
from ..query.terms import Term
from ..store import catalog, storage
from ..store.storage import Location
from .errors import Body

MAX_K = 200
MAX_QUERY_CHARS = 1000
COSINE = {"ge": COLLAPSE_RANGE[0], "le": COLLAPSE_RANGE[1]}  # a collapse threshold's bounds, as pydantic takes them
MEDIA_ID = r"^[0-9a-f]{64}$"
IMAGE_CACHE = "private, max-age=31536000, immutable"  # its name is the hash of its bytes; private: it may be keyed
# /api/* takes no model_version: the server's operator names the one served; a client can name one on /knn-service.
SERVED_BY = "`rayclip serve --model-version` when the server starts (or indice_name on /knn-service)"
CONTENT_TYPES = {
    "jpg": "image/jpeg",
    "png": "image/png",
    "webp": "image/webp",
    "gif": "image/gif",
    "bmp": "image/bmp",
    "tiff": "image/tiff",
}
# Module level: with postponed annotations FastAPI must be able to resolve the alias by name.
TopK = Annotated[int, Query(ge=1, le=MAX_K, description="number of results")]
Collapse = Annotated[
    float | None,
    Query(**COSINE, description=f"fold results within this cosine of a higher one (e.g. {DEFAULT_COLLAPSE})"),
]
Where = Annotated[
    str | None, Query(max_length=MAX_FILTER_CHARS, description="filter, e.g. width >= 512 AND caption LIKE '%dog%'")
]
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
    where: str | None = Field(None, max_length=MAX_FILTER_CHARS)
    collapse: float | None = Field(None, **COSINE)
    over: Literal[SEARCH_OVER] = SearchOptions.over


def router(service: QueryService, root: Location, encode_slot, max_upload_bytes: int) -> APIRouter:
    """The /api/* routes over the service; the ones that encode wait for `encode_slot` (admission.py)."""
    api = APIRouter()

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

    @api.get("/api/defaults")
    def defaults() -> dict:
        """What the page starts from: SearchOptions' k, the cosine a collapse folds at, the largest k."""
        return {"k": SearchOptions.k, "collapse": DEFAULT_COLLAPSE, "max_k": MAX_K}

    @api.get("/api/status")
    def status() -> dict:
        """The build served, and this process's memory: resident private vs file-backed (mapped) bytes."""
        from ..store.status import process_memory

        return summary(served()) | {"memory": process_memory()}

    @api.get("/api/overview")
    def overview() -> dict:
        """What the status page draws: the layers, builds (CURRENT marked, with eval), recent runs."""
        from ..store.status import status as layer_status

        return layer_status(root)

    @api.get("/api/search", dependencies=[encode_slot])
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

    @api.post("/api/search", dependencies=[encode_slot])
    def search_combined(query: CombinedQuery) -> dict:
        """rclip-style arithmetic: the weighted sum of text, image and stored-vector terms."""
        terms = [_term(term, max_upload_bytes) for term in query.terms]
        results = find(terms, query.k, query.where, query.collapse, query.over)
        return _payload(results, query.model_dump(exclude={"terms"}) | {"terms": len(terms)})

    @api.get("/api/search/similar", dependencies=[encode_slot])
    def search_similar(
        media_id: Annotated[str, Query(pattern=MEDIA_ID)],
        k: TopK = SearchOptions.k,
        collapse: Collapse = None,
        where: Where = None,
    ) -> dict:
        results = find([Term("media_id", media_id)], k, where, collapse)  # the indexed vector: no decode, no encode
        return _payload(results, {"media_id": media_id, "k": k, "collapse": collapse, "where": where})

    @api.post("/api/search/image", dependencies=[encode_slot])
    async def search_image(
        file: Annotated[UploadFile, File(description="an image")],
        k: TopK = SearchOptions.k,
        collapse: Collapse = None,
        where: Where = None,
    ) -> dict:
        data = await file.read(max_upload_bytes + 1)
        if len(data) > max_upload_bytes:
            raise ImageTooLargeError("image", max_upload_bytes)
        # Decoding and encoding are CPU work: off the event loop, like the sync endpoints.
        results = await run_in_threadpool(functools.partial(find, [Term("image", data)], k, where, collapse))
        return _payload(results, {"upload": file.filename, "k": k, "collapse": collapse, "where": where})

    @api.get("/api/images/{media_id}")
    def image(media_id: str) -> StreamingResponse:
        if not re.match(MEDIA_ID, media_id):
            raise HTTPException(status_code=422, detail="media_id must be 64 lowercase hex characters")
        stored = catalog.find_object(root, media_id)
        return StreamingResponse(
            _chunks(stored),
            media_type=CONTENT_TYPES.get(stored.suffix[1:], "application/octet-stream"),
            headers={"Content-Length": str(storage.size(stored)), "Cache-Control": IMAGE_CACHE},
        )

    return api


def _payload(results: SearchResults, query: dict) -> dict:
    """The answer of every /api search: the build named is the one the results came from."""
    return {
        "query": query,
        "model_version": results.model_version,
        "build_id": results.build_id,
        "notes": results.notes,
        "results": [r.to_dict() for r in results],
    }


def _term(term: QueryTerm, max_bytes: int) -> Term:
    if term.text is not None:
        return Term("text", term.text, term.weight)
    if term.media_id is not None:
        return Term("media_id", term.media_id, term.weight)
    return Term("image", decode_base64(term.image, max_bytes, "an image term"), term.weight)


def _chunks(stored: Location) -> Iterator[bytes]:
    """The object's bytes a chunk at a time (Starlette runs this in its thread pool); a client that
    goes away closes the generator, and with it the object."""
    with storage.open_input(stored) as f:
        while chunk := f.read(storage.CHUNK_BYTES):
            yield chunk
