"""A throttling proxy in front of moto's S3 server: every request the pipeline makes to the store
passes through it, and a seeded share of them gets what a busy S3 answers instead of the real reply:
503 SlowDown, 500 InternalError, a connection reset without an answer, or the real answer cut short
(its connection closed before the Content-Length it announced, as a download whose connection breaks).
The share is spread evenly over each verb's requests (HEAD, GET, LIST, PUT, POST, DELETE: one in
1/share of each, from a seeded start) and the fault kinds go round in a seeded order over all the
spoilt requests, so a run with enough requests spoils every verb, and every kind on some verb,
whatever order its threads send them in.

Stdlib only (http.server + http.client). By default it forwards everything untouched; a test sets
`proxy.throttle(share, ...)` for the requests it wants spoilt and `proxy.clean()` after. Ray's
workers, started with the session, reach the store through the same proxy (the endpoint they
inherited), so a rule set here reaches them too.
"""

from __future__ import annotations

import dataclasses
import http.client
import http.server
import random
import socket
import struct
import threading
import time
import urllib.parse
from collections import Counter
from collections.abc import Callable

from helpers import loopback

S3_BUCKET = "rayclip-test"  # the one bucket on the tests' S3 server (conftest's s3_server)
# What S3 answers when it sheds load, and when it fails inside.
SLOW_DOWN = (503, "SlowDown", "Please reduce your request rate.")
INTERNAL = (500, "InternalError", "We encountered an internal error. Please try again.")
DENIED = (403, "AccessDenied", "Access Denied")  # not a fault: a refusal no retry changes (kind "denied")
# Nor is kind "short": a well-formed answer for half the object (a HEAD's Content-Length, a GET's body).
FAULTS = ("slowdown", "internal", "reset", "cut")
ANSWERS = {"slowdown": SLOW_DOWN, "internal": INTERNAL, "denied": DENIED}
CUT_PAUSE_S = 0.05  # between a cut answer's headers, its part of the body, and the close
HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "expect", "proxy-connection", "te", "upgrade"}


@dataclasses.dataclass
class Rule:
    share: float = 0.0  # of the matching requests, how many are spoilt
    methods: tuple[str, ...] = ("HEAD", "GET", "PUT", "POST", "DELETE")
    match: Callable[[str, str], bool] = lambda method, path: True  # (method, path) -> spoil it?
    kinds: tuple[str, ...] = FAULTS  # which faults, in turn (a seeded order) over all spoilt requests
    limit: int | None = None  # spoil no more than this many (then the store answers again)


def _error_body(code: str, message: str, path: str) -> bytes:
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f"<Error><Code>{code}</Code><Message>{message}</Message><Resource>{path}</Resource>"
        "<RequestId>0000000000000000</RequestId></Error>"
    ).encode()


class ThrottlingProxy:
    """Listens on `port` of 127.0.0.1 from its creation until stop(), and forwards to `upstream`
    (host, port), spoiling some requests."""

    def __init__(self, port: int, upstream: tuple[str, int], seed: int = 0) -> None:
        self.upstream = upstream
        self.rule = Rule()
        self.rng = random.Random(seed)
        self.matched: Counter = Counter()  # verb -> requests the rule matched since throttle()
        self.phase: dict[str, float] = {}  # verb -> its seeded start in the stride
        self.kinds: list[str] = []  # the rule's fault kinds in their seeded order
        self.lock = threading.Lock()
        self.local = threading.local()  # each handler thread's connection to the upstream server
        self.seen: Counter = Counter()  # method -> requests
        self.paths: Counter = Counter()  # (method, key(path)) -> requests, spoilt or not
        self.spoilt: Counter = Counter()  # (method, fault) -> requests answered with a fault
        self.log: list[tuple[str, str, str]] = []  # (method, path, fault) of each spoilt request
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as clients expect of S3

            def setup(self) -> None:
                super().setup()
                # Headers and body leave in separate writes: without this, Nagle meets delayed ACKs.
                self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

            def log_message(self, *args) -> None:
                pass

            def do_HEAD(self) -> None:  # noqa: N802 - http.server's names
                proxy._handle(self)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD  # noqa: N815

        self.server = loopback.start(Handler, port)

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def throttle(self, share: float, seed: int = 0, **rule) -> None:
        """Spoil `share` of the matching requests from now on (a fresh seeded draw)."""
        with self.lock:
            self.rule = Rule(share, **rule)
            self.rng = random.Random(seed)
            self.matched.clear()
            self.phase.clear()
            self.kinds = self.rng.sample(self.rule.kinds, len(self.rule.kinds))
            self.spoilt.clear()
            self.log.clear()

    def clean(self) -> None:
        self.throttle(0.0)

    def _draw(self, method: str, path: str) -> str | None:
        with self.lock:
            self.seen[method] += 1
            self.paths[method, key(path)] += 1
            rule = self.rule
            if not rule.share or method not in rule.methods or not rule.match(method, path):
                return None
            if not self._in_stride(verb(method, path)) or rule.limit == sum(self.spoilt.values()):
                return None
            fault = self.kinds[len(self.log) % len(self.kinds)]
            self.log.append((method, path, fault))
            self.spoilt[method, fault] += 1
            return fault

    def _in_stride(self, verb: str) -> bool:
        """Whether this verb's next request is spoilt: one in every 1/share of its requests, from a
        seeded start (so a verb with 1/share requests or more has at least one spoilt)."""
        share = self.rule.share
        if verb not in self.phase:  # drawn once, when the verb is first seen
            self.phase[verb] = self.rng.random()
        start = self.phase[verb]
        n = self.matched[verb]
        self.matched[verb] += 1
        return int((n + 1) * share + start) > int(n * share + start)

    def _handle(self, handler: http.server.BaseHTTPRequestHandler) -> None:
        method, path = handler.command, handler.path
        try:
            body = _read_body(handler)
        except EOFError:
            # The client died mid-request (a test's kill -9): S3 refuses an incomplete body
            # (IncompleteBody) and stores nothing, so nothing is forwarded.
            handler.close_connection = True
            return
        fault = self._draw(method, path)
        if fault == "reset":
            # RST instead of an answer: linger 0 and close, as a load balancer dropping the connection.
            handler.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            handler.close_connection = True
            handler.connection.close()
            return
        if fault in ANSWERS:
            status, code, message = ANSWERS[fault]
            payload = b"" if method == "HEAD" else _error_body(code, message, path)
            handler.send_response(status)
            handler.send_header("Content-Type", "application/xml")
            handler.send_header("Content-Length", str(len(payload)))
            handler.end_headers()
            handler.wfile.write(payload)
            return
        headers = {k: v for k, v in handler.headers.items() if k.lower() not in HOP_BY_HOP}
        if body is not None:
            headers["Content-Length"] = str(len(body))
        reply, data = self._forward(method, path, body, headers)
        handler.send_response_only(reply.status, reply.reason)
        for name, value in reply.getheaders():
            if name.lower() not in HOP_BY_HOP and not (name.lower() == "content-length" and method != "HEAD"):
                if fault == "short" and method == "HEAD" and name.lower() == "content-length":
                    value = str(int(value) // 2)
                if not (fault == "short" and name.lower().startswith("x-amz-checksum")):
                    handler.send_header(name, value)
        if fault == "short":  # a whole answer with half the object, as a bad copy or disk hands it back
            data = data[: len(data) // 2]
        if method != "HEAD":
            handler.send_header("Content-Length", str(len(data)))
        if fault == "cut":
            _cut_short(handler, b"" if method == "HEAD" else data)
            return
        handler.end_headers()
        if method != "HEAD":
            handler.wfile.write(data)

    def _forward(self, method: str, path: str, body: bytes | None, headers: dict) -> tuple:
        """(reply, its body) from the upstream server, on this thread's kept-alive connection."""
        for attempt in range(2):
            upstream = getattr(self.local, "upstream", None)
            if upstream is None:
                upstream = self.local.upstream = http.client.HTTPConnection(*self.upstream, timeout=60)
            try:
                upstream.request(method, path, body=body, headers=headers)
                reply = upstream.getresponse()
                return reply, reply.read()
            except (ConnectionError, http.client.HTTPException):
                upstream.close()
                self.local.upstream = None
                if attempt:
                    raise
        raise AssertionError("unreachable")


def verb(method: str, path: str) -> str:
    """The S3 verb of a request: LIST for a GET with a list-type query, else its HTTP method."""
    return "LIST" if method == "GET" and "list-type=" in path else method


def key(path: str) -> str:
    """A request's path without its query, unquoted: the same for every client's spelling of it."""
    return urllib.parse.unquote(path.split("?")[0])


def _cut_short(handler: http.server.BaseHTTPRequestHandler, data: bytes) -> None:
    """The real answer, its connection closed halfway: the full headers and half the body, or, for an
    answer without a body (HEAD, PUT), half its headers. The upstream has acted (a PUT is stored), so
    only the client's retry can tell. The headers go first and the close comes a moment after the
    last bytes, as on a real connection that breaks mid-download: the client has its answer before
    the body fails."""
    handler._headers_buffer.append(b"\r\n")  # http.server's buffer: status line and headers, unsent
    head = b"".join(handler._headers_buffer)
    handler._headers_buffer = []
    if data:
        handler.wfile.write(head)
        handler.wfile.flush()
        time.sleep(CUT_PAUSE_S)
        handler.wfile.write(data[: len(data) // 2])
    else:
        handler.wfile.write(head[: len(head) // 2])
    handler.wfile.flush()
    time.sleep(CUT_PAUSE_S)
    handler.close_connection = True
    handler.connection.shutdown(socket.SHUT_RDWR)


def _read_exactly(handler: http.server.BaseHTTPRequestHandler, size: int) -> bytes:
    data = handler.rfile.read(size)
    if len(data) < size:
        raise EOFError(f"the client sent {len(data)} of {size} bytes")
    return data


def _read_body(handler: http.server.BaseHTTPRequestHandler) -> bytes | None:
    """The request's body, whole (a chunked upload's chunks joined); EOFError when it was cut."""
    if handler.headers.get("Transfer-Encoding", "").lower() == "chunked":
        chunks = []
        while True:
            line = handler.rfile.readline()
            if not line:
                raise EOFError("the client left inside a chunked body")
            size = int(line.split(b";")[0].strip(), 16)
            if size == 0:
                while handler.rfile.readline() not in (b"\r\n", b"\n", b""):  # trailers
                    pass
                return b"".join(chunks)
            chunks.append(_read_exactly(handler, size))
            handler.rfile.readline()
    length = handler.headers.get("Content-Length")
    return _read_exactly(handler, int(length)) if length else None
