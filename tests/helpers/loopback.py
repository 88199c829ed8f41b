"""An http.server handler served on 127.0.0.1 by a threaded server: the tests' image sites, recorders
and fronts."""

from __future__ import annotations

import contextlib
import http.server
import socket
import sys
import threading
from collections.abc import Callable, Iterator


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    quiet_departures = False  # set by start(): a client that leaves early is no error of the site's

    def handle_error(self, request, client_address) -> None:
        # An image site's client may leave before its answer (an ingest's --timeout on /slow.jpg, a
        # killed command): socketserver would print that traceback into whichever test runs then.
        if not (self.quiet_departures and isinstance(sys.exc_info()[1], ConnectionError)):
            super().handle_error(request, client_address)


def start(
    handler,
    port: int = 0,
    wrap: Callable[[socket.socket], socket.socket] | None = None,
    quiet_departures: bool = False,
    **attributes,
):
    """The server, serving on a daemon thread from now on (port 0: a free one). `attributes` are set
    on it (a handler reads them as self.server.<name>); `wrap` replaces its listening socket (TLS);
    with `quiet_departures`, a client that leaves before its answer is not reported."""
    server = _Server(("127.0.0.1", port), handler)
    server.quiet_departures = quiet_departures
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
