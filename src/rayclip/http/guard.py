"""Who may ask: off loopback an API key guards /api/*, clip-retrieval's routes and /metrics
(`require_api_key`, which other routers may attach too), and serving anonymously anywhere but
loopback is refused unless asked for in so many words (`check_bind`)."""

from __future__ import annotations

import hmac
import ipaddress

from fastapi import HTTPException, Request

from ..errors import UserError

API_KEY_ENV = "RAYCLIP_API_KEY"
KEY_COOKIE = "rayclip_api_key"  # set by the page (static/auth.js) for image requests only
CLIP_BACK_PATHS = ("/knn-service", "/metadata", "/indices-list")  # clip-retrieval's routes (clip_back.py)


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


async def guard_api(request: Request) -> None:
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
