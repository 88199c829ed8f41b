"""clip-retrieval 2.45's client and front against a rayclip server on loopback."""

from __future__ import annotations

import contextlib
import importlib.util
from dataclasses import dataclass
from pathlib import Path

import pytest

from helpers.ports import free_port
from helpers.serving import serving

# `make clip-front` unpacks clip-retrieval's wheel here (its front and its client), never installs it.
CLIP_RETRIEVAL = Path(__file__).resolve().parents[2] / ".cache" / "clip-retrieval"
NOT_FETCHED = "clip-retrieval 2.45's wheel is not unpacked; run `make clip-front` (make test does)"


@dataclass(frozen=True)
class Live:
    """A rayclip server listening on loopback, and the port its CORS rule lets a front be served from."""

    url: str
    front_port: int


@contextlib.contextmanager
def serving_live(root, serve_images: bool = False):
    """`rayclip serve`'s app on a loopback port, CORS open to a front on another (taken when it starts)."""
    from rayclip.http.app import create_app

    front_port = free_port()
    app = create_app(root, cors_origins=[f"http://127.0.0.1:{front_port}"], serve_images=serve_images)
    with serving(app) as url:
        yield Live(url, front_port)


def clip_client_module():
    """clip-retrieval 2.45's clip_client.py, loaded from the unpacked wheel (skips when it was not fetched)."""
    path = CLIP_RETRIEVAL / "clip_retrieval" / "clip_client.py"
    if not path.exists():
        pytest.skip(NOT_FETCHED)
    spec = importlib.util.spec_from_file_location("clip_client_2_45", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
