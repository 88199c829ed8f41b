"""What the server takes on: queries that encode are admitted only while fewer than `queue_depth`
are in flight (503 + Retry-After beyond: load shed, not queued), and a query string or a declared
body over its limit is refused before any work. Every answer is counted (metrics.py)."""

from __future__ import annotations

import time

from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse

from .metrics import Metrics

RETRY_AFTER_S = 1
MAX_QUERY_STRING_BYTES = 4096
MULTIPART_OVERHEAD_BYTES = 64 << 10  # a body may exceed the largest upload by this much (form headers)


class EncodeGate:
    """FastAPI dependency: admits at most `depth` queries that encode; the event loop alone counts, so no lock."""

    def __init__(self, depth: int, metrics: Metrics) -> None:
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


def add_limits_and_counts(app: FastAPI, metrics: Metrics, max_upload_bytes: int) -> None:
    """Refuse oversized query strings (414) and declared bodies (413: over the largest upload and its
    form headers) before any work; count every answer."""
    max_body_bytes = max_upload_bytes + MULTIPART_OVERHEAD_BYTES

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
