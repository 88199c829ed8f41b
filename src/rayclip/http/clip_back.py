"""clip-retrieval's back-end protocol on rayclip: /indices-list, /knn-service, /metadata.

clip-retrieval's `ClipClient` and its web front speak this protocol (read from clip-retrieval
2.45's clip_back.py and clip_client.py); with these routes they become rayclip clients by a URL
change. An `indice_name` is a model_version with a published build, and an `id` is the faiss_id of
the build being served: ids are scoped to a build, so every response names it in
`X-Rayclip-Build-Id` (for /knn-service, the build the results and their ids came from, even when
another is published mid-query), and /metadata refuses (409) a `build_id` that is no longer served.

The Searchers are the query service's (query/service.py), shared with /api/*; the statuses of
bad images and missing indices are http/errors.py's, the same as /api/*'s.

`modality: "text"` searches the build's caption index (one vector per distinct caption), as
clip-retrieval searches its text index; each caption found yields the images that carry it, so every
`id` is still an image's faiss_id and /metadata answers for it.

The flags rayclip has no model for (safety, violence, mclip, aesthetic) are accepted and
ignored, and each response names the ones it ignored in `X-Rayclip-Ignored-Flags`.
"""

from __future__ import annotations

import ipaddress
import socket
import time
import urllib.parse
from collections.abc import Callable
from typing import Literal

import numpy as np
from fastapi import APIRouter, HTTPException, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from pydantic import BaseModel, Field, field_validator

from ..errors import UnknownModelVersionError
from ..images import ImageTooLargeError, decode_base64
from ..options import DEFAULT_COLLAPSE, SearchOptions, ServeOptions
from ..query.results import SearchResults
from ..query.searcher import Searcher
from ..query.service import QueryService
from ..query.terms import Term
from .errors import Body, one_line

MAX_RESULT_IDS = 10_000  # the most the clip-retrieval front asks for (its "download" button)
MAX_METADATA_IDS = 10_000
URL_TIMEOUT_S = 10.0  # clip-retrieval's own download timeout
MAX_REDIRECTS = 3
IGNORED_HEADER = "X-Rayclip-Ignored-Flags"
BUILD_HEADER = "X-Rayclip-Build-Id"
QUERY_FIELDS = ("text", "image", "image_url", "embedding_input")
NAMED_BY = "indice_name (/indices-list lists them)"  # how a clip-retrieval client names a model_version


class KnnQuery(Body):
    """The body clip-retrieval's ClipClient and front post; defaults are clip_back.py's."""

    text: str | None = Field(None, description="a text query")
    image: str | None = Field(None, description="a base64-encoded image")
    image_url: str | None = Field(None, description="an http(s) image URL (only with `serve --allow-url-queries`)")
    embedding_input: list[float] | None = Field(None, description="a query vector of the index's dimension")
    modality: Literal["image", "text"] = Field(
        "image",
        description="search the image index, or `text`: the caption index (results: images carrying each caption)",
    )
    num_images: int = Field(100, ge=1, le=MAX_RESULT_IDS, description="results that carry their metadata")
    num_result_ids: int | None = Field(
        None, ge=1, le=MAX_RESULT_IDS, description="results returned (default num_images); beyond num_images only id"
    )
    indice_name: str | None = Field(None, description="a model_version from /indices-list (default: the served one)")
    deduplicate: bool = Field(False, description="fold near-duplicate images into the best-ranked one")
    use_mclip: bool = Field(False, description="accepted and ignored")
    use_safety_model: bool = Field(False, description="accepted and ignored")
    use_violence_detector: bool = Field(False, description="accepted and ignored")
    aesthetic_score: int | None = Field(None, description="accepted and ignored")
    aesthetic_weight: float | None = Field(None, description="accepted and ignored")

    @field_validator("aesthetic_score", "aesthetic_weight", mode="before")
    @classmethod
    def _empty_is_none(cls, value):
        return None if value == "" else value  # the front sends "" for "no aesthetic score"

    def given(self) -> list[str]:
        """The query fields that were filled in ("" counts as absent, as in clip_back.py)."""
        return [name for name in QUERY_FIELDS if getattr(self, name) not in (None, "", [])]

    def ignored_flags(self) -> list[str]:
        flags = [f for f in ("use_mclip", "use_safety_model", "use_violence_detector") if getattr(self, f)]
        return flags + (["aesthetic_score", "aesthetic_weight"] if self.aesthetic_score is not None else [])


class KnnResult(BaseModel):
    id: int = Field(description="faiss_id in the build named by X-Rayclip-Build-Id")
    similarity: float = Field(description="cosine similarity")
    url: str | None = None
    caption: str | None = None
    media_id: str | None = None
    duplicates: int | None = Field(None, description="near-duplicates folded into this result (deduplicate)")
    caption_row: int | None = Field(
        None, description="modality text: the caption found, a row of the build's caption index"
    )


class MetadataQuery(Body):
    ids: list[int] = Field(max_length=MAX_METADATA_IDS)
    indice_name: str | None = None
    build_id: str | None = Field(None, description="409 when this is not the build served now")


class MetadataItem(BaseModel):
    id: int
    metadata: dict[str, str | None]


class _AnyJsonRoute(APIRoute):
    """Reads the body as JSON whatever its content type, and turns validation errors into one line.

    clip-retrieval's clients never say JSON: ClipClient posts a string with requests (no content
    type) and the front posts one with fetch() (text/plain). Its Flask back read them with
    get_json(force=True); FastAPI would refuse both.
    """

    def get_route_handler(self) -> Callable:
        handler = super().get_route_handler()

        async def json_route_handler(request: Request) -> Response:
            headers = [(k, v) for k, v in request.scope["headers"] if k != b"content-type"]
            scope = {**request.scope, "headers": [*headers, (b"content-type", b"application/json")]}
            try:
                return await handler(Request(scope, request.receive))
            except RequestValidationError as exc:
                raise HTTPException(422, one_line(exc)) from None

        return json_route_handler


def router(
    service: QueryService,
    *,
    max_image_bytes: int = ServeOptions().max_upload_bytes,
    allow_url_queries: bool = False,
    serve_images: bool = False,
) -> APIRouter:
    """The clip-retrieval routes over the service's Searchers; include it in an app that installs
    http/errors.py's handlers, with `dependencies=[...]` to put auth in front of them."""
    api = APIRouter(tags=["clip-retrieval"], route_class=_AnyJsonRoute)

    def searcher_of(name: str | None) -> Searcher:
        try:
            return service.searcher(name)
        except UnknownModelVersionError as err:
            raise err.named_by(NAMED_BY) from None

    def url_of(media_id: str, url: str | None, request: Request) -> str | None:
        return f"{str(request.base_url).rstrip('/')}/api/images/{media_id}" if serve_images else url

    @api.get("/indices-list", summary="model_versions with a published build")
    def indices_list() -> list[str]:
        return service.names()

    @api.post("/knn-service", summary="clip-retrieval's k-NN query", response_model_exclude_none=True)
    def knn_service(query: KnnQuery, request: Request, response: Response) -> list[KnnResult]:
        given = query.given()
        if len(given) != 1:
            raise HTTPException(
                422,
                f"give exactly one of {', '.join(QUERY_FIELDS)}"
                + (f"; got {' and '.join(given)}" if given else "; got none"),
            )
        searcher = searcher_of(query.indice_name)
        if query.image_url and not allow_url_queries:
            raise HTTPException(422, "image_url queries are off; start the server with --allow-url-queries")
        wanted = query.num_result_ids or query.num_images
        results = _search(searcher, query, wanted, max_image_bytes)
        response.headers[BUILD_HEADER] = results.build_id  # the build these faiss_ids are rows of
        if ignored := query.ignored_flags():
            response.headers[IGNORED_HEADER] = ", ".join(ignored)
        return [
            KnnResult(
                id=r.faiss_id,
                similarity=r.score,
                duplicates=r.duplicates if query.deduplicate else None,
                caption_row=r.caption_row,
                **(
                    {"media_id": r.media_id, "url": url_of(r.media_id, r.url, request), "caption": r.caption}
                    if i < query.num_images
                    else {}
                ),
            )
            for i, r in enumerate(results)
        ]

    @api.post("/metadata", summary="url and caption of ids from /knn-service (same build)")
    def metadata(query: MetadataQuery, request: Request, response: Response) -> list[MetadataItem]:
        served = searcher_of(query.indice_name).snapshot()  # id, mapping: one build
        response.headers[BUILD_HEADER] = served.build_id
        if query.build_id is not None and query.build_id != served.build_id:
            stale = f"build {query.build_id} is no longer served (now {served.build_id}); search again"
            raise HTTPException(409, stale, headers={BUILD_HEADER: served.build_id})
        count = len(served.mapping)
        if bad := [i for i in query.ids if not 0 <= i < count]:
            raise HTTPException(422, f"id {bad[0]} is not in build {served.build_id} (ids 0..{count - 1})")
        rows = served.mapping.rows(query.ids, ["media_id", "url", "caption"])
        for row in rows:
            row["url"] = url_of(row["media_id"], row["url"], request)
        return [{"id": i, "metadata": m} for i, m in zip(query.ids, rows)]

    return api


def _search(searcher: Searcher, query: KnnQuery, k: int, max_image_bytes: int) -> SearchResults:
    over = "captions" if query.modality == "text" else "images"  # clip-retrieval's text index: our caption index
    options = SearchOptions(k=k, collapse=DEFAULT_COLLAPSE if query.deduplicate else None, over=over)
    if query.text:
        term = Term("text", query.text)
    elif query.embedding_input:
        term = Term("vector", _query_vector(query.embedding_input, searcher.model.dim))
    elif query.image:
        term = Term("image", decode_base64(query.image, max_image_bytes))
    else:
        term = Term("image", fetch_image(query.image_url, max_image_bytes))
    return searcher.find([[term]], options)[0]


def _query_vector(values: list[float], dim: int | None) -> np.ndarray:
    vector = np.asarray(values, dtype=np.float32)
    if dim is not None and len(vector) != dim:
        raise HTTPException(422, f"embedding_input has {len(vector)} numbers; this index needs {dim}")
    norm = float(np.linalg.norm(vector))
    if not np.isfinite(norm) or norm == 0:
        raise HTTPException(422, "embedding_input must be finite and not all zero")
    return vector / norm  # cosine, like every other query


# ------------------------------------------------------------------ image_url (no SSRF)


def is_public_address(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """Only globally routable unicast: no loopback, private, link-local, shared, reserved or multicast."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        address = address.ipv4_mapped
    return address.is_global and not address.is_multicast


def fetch_image(
    url: str,
    max_bytes: int,
    timeout_s: float = URL_TIMEOUT_S,
    allowed: Callable[[ipaddress.IPv4Address | ipaddress.IPv6Address], bool] | None = None,
) -> bytes:
    """GET an http(s) image URL safely: every hop's host is resolved once, each address checked
    (`allowed`, default is_public_address), and the connection goes to the checked address, so DNS
    cannot rebind the name to another between the check and the connect."""
    import httpx

    allowed = allowed or is_public_address
    deadline = time.monotonic() + timeout_s
    with httpx.Client(timeout=timeout_s, follow_redirects=False, trust_env=False) as client:
        for _hop in range(MAX_REDIRECTS + 1):
            parts = urllib.parse.urlsplit(url)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise HTTPException(422, "image_url must be an http(s) URL with a host")
            address = _checked_address(parts, allowed)
            pinned = parts._replace(netloc=_netloc(address, parts.port)).geturl()
            headers = {"Host": parts.netloc.rsplit("@", 1)[-1], "Accept": "image/*"}
            try:
                with client.stream(
                    "GET", pinned, headers=headers, extensions={"sni_hostname": parts.hostname}
                ) as reply:
                    if reply.is_redirect and "location" in reply.headers:
                        url = urllib.parse.urljoin(url, reply.headers["location"])
                        continue
                    if reply.status_code != 200:
                        raise HTTPException(422, f"image_url answered HTTP {reply.status_code}")
                    return _read_limited(reply, max_bytes, deadline)
            except httpx.HTTPError as exc:
                raise HTTPException(422, f"image_url could not be fetched: {type(exc).__name__}") from None
    raise HTTPException(422, f"image_url redirected more than {MAX_REDIRECTS} times")


def _checked_address(
    parts: urllib.parse.SplitResult, allowed: Callable
) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    try:
        infos = socket.getaddrinfo(parts.hostname, parts.port or 0, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError):
        raise HTTPException(422, f"image_url host {parts.hostname!r} does not resolve") from None
    addresses = {ipaddress.ip_address(info[4][0].split("%")[0]) for info in infos}
    refused = sorted(str(a) for a in addresses if not allowed(a))
    if refused:  # one private answer is enough to refuse: the resolver chose the records, not us
        raise HTTPException(422, f"image_url host {parts.hostname!r} resolves to a non-public address ({refused[0]})")
    return min(addresses, key=str)


def _netloc(address, port: int | None) -> str:
    host = f"[{address}]" if address.version == 6 else str(address)
    return f"{host}:{port}" if port else host


def _read_limited(reply, max_bytes: int, deadline: float) -> bytes:
    declared = reply.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > max_bytes:
        raise ImageTooLargeError("image_url", max_bytes)
    chunks, size = [], 0
    for chunk in reply.iter_bytes():
        size += len(chunk)
        if size > max_bytes:
            raise ImageTooLargeError("image_url", max_bytes)
        if time.monotonic() > deadline:
            raise HTTPException(422, "image_url took too long to download")
        chunks.append(chunk)
    return b"".join(chunks)
