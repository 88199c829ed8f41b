"""A real server on a loopback port, and queries held inside FAISS, for the service's tests."""

from __future__ import annotations

import contextlib
import dataclasses
import threading
import time

from rayclip.query import searcher as searcher_module


@contextlib.contextmanager
def serving(app):
    """The app on a free loopback port under uvicorn, for real concurrent clients."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


@dataclasses.dataclass
class Hold:
    """Queries held inside FAISS: `entered` counts those that got there, `release` lets them go."""

    entered: threading.Semaphore
    release: threading.Event


@contextlib.contextmanager
def held_in_faiss(monkeypatch):
    """While inside, every image search waits in FAISS until hold.release is set (bounded: 60 s);
    the searcher's own search is put back on the way out, and anything still held is released."""
    hold, search = Hold(threading.Semaphore(0), threading.Event()), searcher_module._search

    def held(build, queries, k, allowed):
        hold.entered.release()
        assert hold.release.wait(60)
        return search(build, queries, k, allowed)

    monkeypatch.setattr(searcher_module, "_search", held)
    try:
        yield hold
    finally:
        hold.release.set()
        monkeypatch.setattr(searcher_module, "_search", search)
