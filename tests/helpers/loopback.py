"""An http.server handler served on 127.0.0.1 by a threaded server: the tests' image sites, recorders
and fronts."""

from __future__ import annotations

import contextlib
import http.server
import socket
import threading
from collections.abc import Callable, Iterator


def start(handler, port: int = 0, wrap: Callable[[socket.socket], socket.socket] | None = None, **attributes):
    """The server, serving on a daemon thread from now on (port 0: a free one). `attributes` are set
    on it (a handler reads them as self.server.<name>); `wrap` replaces its listening socket (TLS)."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), handler)
    server.daemon_threads = True
    for name, value in attributes.items():
        setattr(server, name, value)
    if wrap:
        server.socket = wrap(server.socket)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


@contextlib.contextmanager
def serving(handler, port: int = 0, **kwargs) -> Iterator[http.server.ThreadingHTTPServer]:
    """start(...), shut down and closed on the way out."""
    server = start(handler, port, **kwargs)
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


def url(server: http.server.HTTPServer) -> str:
    return f"http://127.0.0.1:{server.server_address[1]}"
